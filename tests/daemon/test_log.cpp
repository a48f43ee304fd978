// The log rate limit (log::RateLimiter): per kind and subject, the first lines of an interval pass, the rest are
// counted and summarised once the interval has ended.
#include <catch2/catch.hpp>

#include "dauth/daemon/log.hpp"

using dauth::daemon::log::Level;
using dauth::daemon::log::RateLimiter;

namespace {
constexpr auto kInterval = std::chrono::seconds(60);
RateLimiter::Clock::time_point at(int seconds) { return RateLimiter::Clock::time_point(std::chrono::seconds(seconds)); }
}  // namespace

TEST_CASE("rate limit: a burst passes per kind and subject and the rest is summarised when the interval ends",
          "[log]") {
  RateLimiter limiter({3, kInterval, 8});
  int passed = 0;
  for (int i = 0; i < 10; ++i) {
    const auto verdict = limiter.admit("refused", "CAE-x", Level::warning, at(100 + i));
    passed += verdict.pass ? 1 : 0;
    CHECK_FALSE(verdict.summary);
  }
  CHECK(passed == 3);
  // Another subject and another kind have their own bursts: a flood about one does not hide the others.
  CHECK(limiter.admit("refused", "CAE-y", Level::warning, at(110)).pass);
  CHECK(limiter.admit("failed", "CAE-x", Level::warning, at(110)).pass);

  // The next line after the interval passes, preceded by the count of what was suppressed.
  const auto next = limiter.admit("refused", "CAE-x", Level::warning, at(100 + 60));
  CHECK(next.pass);
  REQUIRE(next.summary);
  CHECK(next.summary->suppressed == 7);
  CHECK(next.summary->subject == "CAE-x");
  CHECK(next.summary->level == Level::warning);
  CHECK(dauth::daemon::log::summary_line(*next.summary).find("7 more refused lines about CAE-x suppressed") !=
        std::string::npos);
}

TEST_CASE("rate limit: expire() summarises ended intervals without a further line and forgets them", "[log]") {
  RateLimiter limiter({1, kInterval, 8});
  CHECK(limiter.admit("refused", "a", Level::warning, at(0)).pass);
  CHECK_FALSE(limiter.admit("refused", "a", Level::warning, at(1)).pass);
  CHECK_FALSE(limiter.admit("refused", "a", Level::notice, at(2)).pass);
  CHECK(limiter.admit("refused", "b", Level::warning, at(30)).pass);
  CHECK(limiter.expire(at(59)).empty());
  const auto ended = limiter.expire(at(60));
  REQUIRE(ended.size() == 1);  // "b" suppressed nothing, and its interval has not ended
  CHECK(ended[0].subject == "a");
  CHECK(ended[0].suppressed == 2);
  CHECK(ended[0].level == Level::warning);  // as urgent as the most urgent line it counts
  CHECK(limiter.expire(at(200)).empty());   // all forgotten: "b" had nothing to report
  CHECK(limiter.admit("refused", "a", Level::warning, at(201)).pass);
}

TEST_CASE("rate limit: subjects beyond the cap share one count", "[log]") {
  RateLimiter limiter({1, kInterval, 2});
  CHECK(limiter.admit("refused", "s1", Level::warning, at(0)).pass);
  CHECK(limiter.admit("refused", "s2", Level::warning, at(0)).pass);
  // s3 and s4 are "(other subjects)": one line passes for both, the rest is counted there.
  CHECK(limiter.admit("refused", "s3", Level::warning, at(0)).pass);
  CHECK_FALSE(limiter.admit("refused", "s4", Level::warning, at(0)).pass);
  CHECK(limiter.admit("failed", "s5", Level::warning, at(0)).pass);  // the cap is per kind
  const auto ended = limiter.expire(at(60));
  REQUIRE(ended.size() == 1);
  CHECK(ended[0].subject == "(other subjects)");
  CHECK(ended[0].suppressed == 1);
}

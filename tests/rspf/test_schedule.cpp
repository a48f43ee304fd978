// Renewal at 2/3 of the lifetime and exponential backoff, both with ±10 % jitter (PROTOCOL.md §3.7).
#include <catch2/catch.hpp>

#include "dauth/rspf/schedule.hpp"

using namespace std::chrono_literals;
namespace rspf = dauth::rspf;

namespace {
rspf::JitterSource fixed(double value) {
  return [value] { return value; };
}
}  // namespace

TEST_CASE("renewal happens at 2/3 of the lifetime, jittered by at most 10 %", "[schedule]") {
  REQUIRE(rspf::renewal_delay(3000, fixed(0.0)) == 2000s);
  REQUIRE(rspf::renewal_delay(3000, fixed(1.0)) == 2200s);
  REQUIRE(rspf::renewal_delay(3000, fixed(-1.0)) == 1800s);
  REQUIRE(rspf::renewal_delay(3000, fixed(7.0)) == 2200s);  // out-of-range jitter is clamped
  REQUIRE(rspf::renewal_delay(0, fixed(0.0)) == 1s);        // never a busy loop
  REQUIRE(rspf::renewal_delay(-5, fixed(0.0)) == 1s);
}

TEST_CASE("backoff doubles from 1 s to a 5 min cap and resets", "[schedule]") {
  rspf::Backoff backoff(fixed(0.0));
  const std::chrono::milliseconds expected[] = {1s, 2s, 4s, 8s, 16s, 32s, 64s, 128s, 256s, 300s, 300s};
  for (auto want : expected) REQUIRE(backoff.next() == want);
  for (int i = 0; i < 100; ++i) REQUIRE(backoff.next() == 300s);
  backoff.reset();
  REQUIRE(backoff.next() == 1s);
}

TEST_CASE("random jitter stays within ±10 % and actually varies", "[schedule]") {
  const auto jitter = rspf::random_jitter();
  std::chrono::milliseconds lowest = 1h, highest = 0ms;
  for (int i = 0; i < 2000; ++i) {
    rspf::Backoff backoff(jitter);
    const auto delay = backoff.next();
    REQUIRE(delay >= 900ms);
    REQUIRE(delay <= 1100ms);
    lowest = std::min(lowest, delay);
    highest = std::max(highest, delay);
  }
  REQUIRE(lowest < 950ms);  // 2000 uniform draws all in one half has probability 2^-1999
  REQUIRE(highest > 1050ms);
}

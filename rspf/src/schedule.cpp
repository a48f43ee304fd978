#include "dauth/rspf/schedule.hpp"

#include <algorithm>
#include <cmath>

#include "dauth/secret.hpp"

namespace dauth::rspf {

namespace {
std::chrono::milliseconds jittered(double base_ms, const JitterSource& jitter) {
  const double factor = 1.0 + kJitterFraction * std::clamp(jitter(), -1.0, 1.0);
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(base_ms * factor)));
}
}  // namespace

JitterSource random_jitter() {
  return [] {
    constexpr std::uint32_t kSteps = 1u << 20;
    return 2.0 * static_cast<double>(random_uniform(kSteps + 1)) / kSteps - 1.0;
  };
}

std::chrono::milliseconds renewal_delay(std::int64_t lifetime_s, const JitterSource& jitter) {
  const double base_ms = static_cast<double>(std::max<std::int64_t>(lifetime_s, 0)) * 1000.0 * 2.0 / 3.0;
  return std::max(jittered(base_ms, jitter), std::chrono::milliseconds(1000));
}

std::chrono::milliseconds with_jitter(std::chrono::milliseconds interval, const JitterSource& jitter) {
  return jittered(static_cast<double>(interval.count()), jitter);
}

Backoff::Backoff(JitterSource jitter) : jitter_(std::move(jitter)) {}

std::chrono::milliseconds Backoff::next() {
  const auto max_ms = static_cast<double>(std::chrono::milliseconds(kBackoffMaximum).count());
  const double base_ms = std::min(max_ms, 1000.0 * std::ldexp(1.0, static_cast<int>(std::min(attempts_, 20u))));
  ++attempts_;
  return jittered(base_ms, jitter_);
}

}  // namespace dauth::rspf

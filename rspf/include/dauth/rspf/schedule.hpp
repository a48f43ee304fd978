// When the Enrolee renews and how it retries (PROTOCOL.md §3.7): renew at 2/3 of the lifetime ± 10 % jitter; retry
// failures with exponential backoff from 1 s doubling to 5 min, ± 10 % jitter, so that a fleet that lost its MEF
// does not come back in lockstep.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>

namespace dauth::rspf {

// A jitter source returns a value in [-1, 1]; the default draws uniformly from libsodium's CSPRNG.
using JitterSource = std::function<double()>;
JitterSource random_jitter();

inline constexpr double kJitterFraction = 0.10;
inline constexpr std::chrono::seconds kBackoffInitial{1};
inline constexpr std::chrono::seconds kBackoffMaximum{300};

// A live MEF subscription (mef_subscription.hpp) is renewed this often, ± 10 %: how soon a subscriber notices an
// MEF that crashed without close_notify, and so how late a revocation can arrive after such a crash.
inline constexpr std::chrono::seconds kSubscriptionRefresh{60};
// interval ± kJitterFraction: every repeated delay (a subscription's renewal, a proxy retry) goes through here.
std::chrono::milliseconds with_jitter(std::chrono::milliseconds interval, const JitterSource& jitter);

// Delay from enrolment until renewal: 2/3 of lifetime_s, ± 10 %; at least 1 s.
std::chrono::milliseconds renewal_delay(std::int64_t lifetime_s, const JitterSource& jitter);

class Backoff {
 public:
  explicit Backoff(JitterSource jitter = random_jitter());
  // The delay before the next attempt: 1 s, 2 s, 4 s … capped at 300 s, each ± 10 %.
  std::chrono::milliseconds next();
  void reset() { attempts_ = 0; }
  unsigned attempts() const { return attempts_; }

 private:
  JitterSource jitter_;
  unsigned attempts_ = 0;
};

}  // namespace dauth::rspf

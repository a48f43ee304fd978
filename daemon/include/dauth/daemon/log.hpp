// Logging to stderr with sd-daemon(3) "<N>" priority prefixes, which journald turns into syslog priorities.
// One line per message (embedded newlines are replaced so that a message cannot forge another entry).
// Never pass key material: log KeIDs, PSK identities and SecretBuffer::fingerprint() only (docs/conventions.md §9).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dauth::daemon::log {

// syslog(3) priorities, as journald expects them.
enum class Level : int { error = 3, warning = 4, notice = 5, info = 6, debug = 7 };

std::string_view to_string(Level level) noexcept;
// "error", "warning", "notice", "info", "debug"; std::nullopt for anything else.
std::optional<Level> level_from_string(std::string_view name) noexcept;

// Messages less important than this are dropped. Default: info.
void set_threshold(Level level) noexcept;
Level threshold() noexcept;

void write(Level level, std::string_view message);
inline void error(std::string_view m) { write(Level::error, m); }
inline void warning(std::string_view m) { write(Level::warning, m); }
inline void notice(std::string_view m) { write(Level::notice, m); }
inline void info(std::string_view m) { write(Level::info, m); }
inline void debug(std::string_view m) { write(Level::debug, m); }

// Lines about events a peer can cause (refused handshakes, refused requests, failed enrolments) go through a rate
// limit, so that a flood cannot bury everything else in the journal: per kind of event and subject (an AE-ID, KeID,
// identity or address), the first kBurst lines of an interval pass and the rest are counted; when the interval has
// ended (the next line of that kind and subject, or flush_suppressed()) one line says how many were suppressed.
// Subjects beyond kMaxSubjects per interval share one "(other subjects)" count, so memory stays bounded too.
class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  struct Limits {
    std::size_t burst;
    Clock::duration interval;
    std::size_t max_subjects;
  };
  explicit RateLimiter(Limits limits) : limits_(limits) {}

  struct Summary {
    std::string kind;
    std::string subject;
    Level level;
    std::uint64_t suppressed;
  };
  struct Verdict {
    bool pass = false;
    std::optional<Summary> summary;  // the ended interval's suppressed lines: written before this line
  };
  Verdict admit(const std::string& kind, const std::string& subject, Level level, Clock::time_point now);
  // Ends every interval that is over at `now`: the summaries of those that suppressed lines; all are forgotten.
  std::vector<Summary> expire(Clock::time_point now);

 private:
  struct Window {
    Clock::time_point start;
    std::size_t passed = 0;
    std::uint64_t suppressed = 0;
    Level level = Level::info;
  };
  Limits limits_;
  std::map<std::pair<std::string, std::string>, Window> windows_;
};

inline constexpr std::size_t kBurst = 5;
inline constexpr std::chrono::seconds kLimitInterval{60};
inline constexpr std::size_t kMaxSubjects = 64;

// "log: 37 more <kind> lines about <subject> suppressed in the last 60 s (at most 5 each)".
std::string summary_line(const RateLimiter::Summary& summary);

// write() through the daemon's RateLimiter (kBurst per kLimitInterval per kind and subject). Level::error lines
// pass always: errors of the daemon itself are never suppressed.
void write_limited(Level level, const std::string& kind, const std::string& subject, std::string_view message);
// Writes the summaries of the intervals that have ended (all of them with ended_or_not: at exit); the daemon calls it
// from a timer, so that the count of a flood that stopped is not held back until its next line.
void flush_suppressed(bool ended_or_not = false);

}  // namespace dauth::daemon::log

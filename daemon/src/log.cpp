#include "dauth/daemon/log.hpp"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <mutex>

namespace dauth::daemon::log {

namespace {
Level g_threshold = Level::info;

struct LevelName {
  Level level;
  std::string_view name;
};
constexpr std::array<LevelName, 5> kLevelNames = {{
    {Level::error, "error"},
    {Level::warning, "warning"},
    {Level::notice, "notice"},
    {Level::info, "info"},
    {Level::debug, "debug"},
}};
}  // namespace

std::string_view to_string(Level level) noexcept {
  for (const auto& entry : kLevelNames) {
    if (entry.level == level) return entry.name;
  }
  return "unknown";
}

std::optional<Level> level_from_string(std::string_view name) noexcept {
  for (const auto& entry : kLevelNames) {
    if (entry.name == name) return entry.level;
  }
  return std::nullopt;
}

void set_threshold(Level level) noexcept { g_threshold = level; }
Level threshold() noexcept { return g_threshold; }

void write(Level level, std::string_view message) {
  if (static_cast<int>(level) > static_cast<int>(g_threshold)) return;
  std::string line = "<" + std::to_string(static_cast<int>(level)) + ">";
  line.reserve(line.size() + message.size() + 1);
  for (const char c : message) line += (c == '\n' || c == '\r') ? ' ' : c;
  line += '\n';
  // One write(2) per line so that lines from concurrent writers (tests, children) do not interleave.
  std::size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(STDERR_FILENO, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // stderr gone: nothing better to do than drop the line
    done += static_cast<std::size_t>(n);
  }
}

RateLimiter::Verdict RateLimiter::admit(const std::string& kind, const std::string& subject, Level level,
                                        Clock::time_point now) {
  auto key = std::make_pair(kind, subject);
  auto it = windows_.find(key);
  if (it == windows_.end()) {
    std::size_t of_kind = 0;
    for (const auto& [k, window] : windows_) of_kind += k.first == kind ? 1 : 0;
    if (of_kind >= limits_.max_subjects) key.second = "(other subjects)";
    it = windows_.try_emplace(key, Window{now, 0, 0, level}).first;
  }
  Window& window = it->second;
  Verdict verdict;
  if (now - window.start >= limits_.interval) {
    if (window.suppressed > 0) verdict.summary = Summary{kind, key.second, window.level, window.suppressed};
    window = Window{now, 0, 0, level};
  }
  window.level = std::min(window.level, level);  // the summary is as urgent as the most urgent line it counts
  if (window.passed < limits_.burst) {
    ++window.passed;
    verdict.pass = true;
  } else {
    ++window.suppressed;
  }
  return verdict;
}

std::vector<RateLimiter::Summary> RateLimiter::expire(Clock::time_point now) {
  std::vector<Summary> ended;
  for (auto it = windows_.begin(); it != windows_.end();) {
    if (now - it->second.start < limits_.interval) {
      ++it;
      continue;
    }
    if (it->second.suppressed > 0) {
      ended.push_back(Summary{it->first.first, it->first.second, it->second.level, it->second.suppressed});
    }
    it = windows_.erase(it);
  }
  return ended;
}

std::string summary_line(const RateLimiter::Summary& summary) {
  return "log: " + std::to_string(summary.suppressed) + " more " + summary.kind + " lines about " + summary.subject +
         " suppressed in the last " + std::to_string(kLimitInterval.count()) + " s (at most " +
         std::to_string(kBurst) + " each)";
}

namespace {
std::mutex g_limiter_mutex;
RateLimiter g_limiter({kBurst, kLimitInterval, kMaxSubjects});
}  // namespace

void write_limited(Level level, const std::string& kind, const std::string& subject, std::string_view message) {
  if (level == Level::error) return write(level, message);
  if (static_cast<int>(level) > static_cast<int>(g_threshold)) return;
  RateLimiter::Verdict verdict;
  {
    const std::lock_guard<std::mutex> lock(g_limiter_mutex);
    verdict = g_limiter.admit(kind, subject, level, RateLimiter::Clock::now());
  }
  if (verdict.summary) write(verdict.summary->level, summary_line(*verdict.summary));
  if (verdict.pass) write(level, message);
}

void flush_suppressed(bool ended_or_not) {
  std::vector<RateLimiter::Summary> ended;
  {
    const std::lock_guard<std::mutex> lock(g_limiter_mutex);
    ended = g_limiter.expire(ended_or_not ? RateLimiter::Clock::time_point::max() : RateLimiter::Clock::now());
  }
  for (const auto& summary : ended) write(summary.level, summary_line(summary));
}

}  // namespace dauth::daemon::log

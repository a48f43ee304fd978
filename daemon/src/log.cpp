#include "dauth/daemon/log.hpp"

#include <unistd.h>

#include <array>
#include <cerrno>

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

}  // namespace dauth::daemon::log

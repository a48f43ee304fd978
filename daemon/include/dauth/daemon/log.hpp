// Logging to stderr with sd-daemon(3) "<N>" priority prefixes, which journald turns into syslog priorities.
// One line per message (embedded newlines are replaced so that a message cannot forge another entry).
// Never pass key material: log KeIDs, PSK identities and SecretBuffer::fingerprint() only (docs/conventions.md §9).
#pragma once

#include <optional>
#include <string>
#include <string_view>

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

}  // namespace dauth::daemon::log

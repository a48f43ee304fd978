#include "dauth/daemon/systemd_notify.hpp"

#include <systemd/sd-daemon.h>
#include <time.h>

#include <cstring>

#include "dauth/daemon/log.hpp"

namespace dauth::daemon {

namespace {
// STATUS= is one line; a newline would start a new assignment.
std::string one_line(std::string_view text) {
  std::string out(text);
  for (char& c : out) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return out;
}
}  // namespace

SystemdNotifier::SystemdNotifier() {
  std::uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
    watchdog_usec_ = usec;
    // Half the timeout, but at least 1 ms so that a tiny WATCHDOG_USEC cannot make a busy loop.
    const auto half = std::chrono::milliseconds(usec / 2000);
    watchdog_interval_ = half.count() > 0 ? half : std::chrono::milliseconds(1);
  }
}

void SystemdNotifier::send(const std::string& message) {
  const int rc = sd_notify(0, message.c_str());
  if (rc > 0) {
    ++sent_;
    return;
  }
  if (rc < 0) {
    ++failures_;
    if (!failure_logged_) {
      failure_logged_ = true;  // once: a broken NOTIFY_SOCKET must not flood the journal with watchdog pings
      log::warning("sd_notify failed (" + std::string(std::strerror(-rc)) +
                   "); continuing without service manager notifications");
    }
  }
}

void SystemdNotifier::ready(std::string_view status) { send("READY=1\nSTATUS=" + one_line(status)); }

void SystemdNotifier::status(std::string_view status) { send("STATUS=" + one_line(status)); }

void SystemdNotifier::reloading() {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  const auto usec = static_cast<std::uint64_t>(now.tv_sec) * 1000000u + static_cast<std::uint64_t>(now.tv_nsec) / 1000u;
  send("RELOADING=1\nMONOTONIC_USEC=" + std::to_string(usec) + "\nSTATUS=reloading configuration");
}

void SystemdNotifier::stopping(std::string_view status) { send("STOPPING=1\nSTATUS=" + one_line(status)); }

void SystemdNotifier::watchdog() { send("WATCHDOG=1"); }

}  // namespace dauth::daemon

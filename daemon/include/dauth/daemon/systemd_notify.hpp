// sd_notify(3) for a Type=notify service: READY=1 once sockets are bound and keys are loaded, STATUS= lines,
// RELOADING=1 around a reload, STOPPING=1 on shutdown, WATCHDOG=1 pings.
//
// Outside systemd (no $NOTIFY_SOCKET) every call is a no-op. A failed notification is logged once per kind and
// otherwise ignored: it must never stop the daemon (a watchdog ping that cannot be sent is systemd's problem to
// notice, not a reason to stop serving peers).
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dauth::daemon {

class SystemdNotifier {
 public:
  // Reads $WATCHDOG_USEC/$WATCHDOG_PID (sd_watchdog_enabled) once, at construction.
  SystemdNotifier();

  void ready(std::string_view status);
  void status(std::string_view status);
  // RELOADING=1 with MONOTONIC_USEC= (systemd >= 253 requires it for Type=notify-reload; older ones ignore it).
  void reloading();
  void stopping(std::string_view status);
  void watchdog();

  // How often to ping: half of WATCHDOG_USEC (sd_watchdog_enabled(3) recommends pinging at half the timeout);
  // nullopt when systemd does not expect pings.
  std::optional<std::chrono::milliseconds> watchdog_interval() const { return watchdog_interval_; }
  std::uint64_t watchdog_usec() const { return watchdog_usec_; }

  std::uint64_t sent() const { return sent_; }
  std::uint64_t failures() const { return failures_; }

 private:
  void send(const std::string& message);

  std::optional<std::chrono::milliseconds> watchdog_interval_;
  std::uint64_t watchdog_usec_ = 0;
  std::uint64_t sent_ = 0;
  std::uint64_t failures_ = 0;
  bool failure_logged_ = false;
};

}  // namespace dauth::daemon

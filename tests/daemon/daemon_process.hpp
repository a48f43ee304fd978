// Helpers for the daemon tests: a real dauthd child process, a real sd_notify datagram listener, and a raw
// control-socket client. Waits have generous limits that only turn a hang into a failure; nothing asserts on time.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "dauth/unique_fd.hpp"

namespace dauth::test {

inline constexpr std::chrono::seconds kHangLimit{30};

class DaemonProcess {
 public:
  // Starts argv with the extra environment entries ("NAME=value"); stdout and stderr go to log_file.
  // with_watchdog_pid: also sets WATCHDOG_PID to the child's own pid (sd_watchdog_enabled(3) checks it).
  DaemonProcess(const std::vector<std::string>& argv, const std::vector<std::string>& environment,
                const std::filesystem::path& log_file, bool with_watchdog_pid = false);
  ~DaemonProcess();  // SIGKILL and reap if still running
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;

  pid_t pid() const { return pid_; }
  void signal(int number) const;
  // Exit status (128 + signal if killed), or nullopt if it did not exit within the limit (then it is killed).
  std::optional<int> wait(std::chrono::seconds limit = kHangLimit);

 private:
  pid_t pid_ = -1;
};

// An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET.
class NotifyListener {
 public:
  explicit NotifyListener(std::filesystem::path path);
  ~NotifyListener();
  NotifyListener(const NotifyListener&) = delete;
  NotifyListener& operator=(const NotifyListener&) = delete;

  std::string environment() const { return "NOTIFY_SOCKET=" + path_.string(); }
  // Receives datagrams until one contains `line` as a whole line; returns that datagram, or nullopt at the limit.
  std::optional<std::string> wait_for(const std::string& line, std::chrono::seconds limit = kHangLimit);
  // Every datagram received so far, in order.
  const std::vector<std::string>& received() const { return received_; }

 private:
  std::filesystem::path path_;
  dauth::UniqueFd fd_;
  std::vector<std::string> received_;
  std::size_t consumed_ = 0;
};

// Connects to a control socket, sends `bytes` as is, and returns everything read until the daemon closes the
// connection or one reply line arrived (stop_after_line). Empty if the socket cannot be reached.
std::string control_exchange(const std::filesystem::path& socket, const std::string& bytes,
                             bool stop_after_line = true);

// True once something accepts connections on the socket (polled up to the limit).
bool wait_for_control_socket(const std::filesystem::path& socket, std::chrono::seconds limit = kHangLimit);

}  // namespace dauth::test

// A child process the test keeps running while it drives its own Nodes (tests/support's run_command waits, which
// would starve the in-process MEF of its loop). stdout+stderr go to a pipe the test reads line by line.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "dauth/unique_fd.hpp"

namespace dauth::test {

class ChildProcess {
 public:
  explicit ChildProcess(const std::vector<std::string>& argv) {
    // Built before fork: the child may only make async-signal-safe calls until exec.
    std::vector<char*> args;
    for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      ::dup2(fds[1], STDOUT_FILENO);
      ::dup2(fds[1], STDERR_FILENO);
      const int null = ::open("/dev/null", O_RDONLY);
      if (null >= 0) ::dup2(null, STDIN_FILENO);
      ::execvp(args[0], args.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_.reset(fds[0]);
  }
  ~ChildProcess() {
    if (running()) {
      ::kill(pid_, SIGKILL);
      (void)wait(std::chrono::milliseconds(5000));
    }
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  bool running() { return !exit_code_ && !poll_exit(); }
  void kill_with(int signal) { ::kill(pid_, signal); }

  // The next output line (without '\n'), or nullopt when none came within max or the output ended.
  std::optional<std::string> read_line(std::chrono::milliseconds max) {
    const auto end = std::chrono::steady_clock::now() + max;
    for (;;) {
      if (auto newline = buffer_.find('\n'); newline != std::string::npos) {
        std::string line = buffer_.substr(0, newline);
        buffer_.erase(0, newline + 1);
        return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      if (!read_some(static_cast<int>(left.count()))) return std::nullopt;
    }
  }

  // Reads what the child wrote so far without waiting; everything read is kept in output().
  void drain() {
    while (read_some(0)) {
    }
  }
  const std::string& output() const { return all_; }

  // Waits up to max for the exit; the exit code or 128 + signal.
  std::optional<int> wait(std::chrono::milliseconds max) {
    const auto end = std::chrono::steady_clock::now() + max;
    while (!exit_code_ && !poll_exit() && std::chrono::steady_clock::now() < end) {
      drain();
      ::usleep(5000);
    }
    return exit_code_;
  }

 private:
  bool poll_exit() {
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return true;
    }
    return false;
  }
  bool read_some(int timeout_ms) {
    pollfd p{out_.get(), POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return false;
    char chunk[4096];
    const ssize_t n = ::read(out_.get(), chunk, sizeof chunk);
    if (n <= 0) return false;
    buffer_.append(chunk, static_cast<std::size_t>(n));
    all_.append(chunk, static_cast<std::size_t>(n));
    return true;
  }

  pid_t pid_ = -1;
  dauth::UniqueFd out_;
  std::string buffer_;
  std::string all_;
  std::optional<int> exit_code_;
};

}  // namespace dauth::test

#include "impair_relay_process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <thread>

#ifndef DAUTH_IMPAIR_RELAY_PATH
#error "DAUTH_IMPAIR_RELAY_PATH must name the dauth_impair_relay executable (tests/CMakeLists.txt sets it)"
#endif

extern char** environ;

namespace dauth::test {

namespace {

constexpr const char* kRelayName = "dauth_impair_relay";
// Enough of the relay's stderr to explain a failure; older text is dropped.
constexpr std::size_t kKeptErrorText = 4096;

// The shortest text that reads back as the same double, so that the relay gets exactly the profile's value.
std::string number_text(double value) {
  char text[32];
  const auto result = std::to_chars(text, text + sizeof text, value);
  return std::string(text, result.ptr);
}

std::string errno_text(const std::string& what) { return what + ": " + std::strerror(errno); }

}  // namespace

bool DirectionImpairment::operator==(const DirectionImpairment& other) const {
  return loss == other.loss && ge_p == other.ge_p && ge_r == other.ge_r && ge_loss_bad == other.ge_loss_bad &&
         ge_loss_good == other.ge_loss_good && delay_ms == other.delay_ms && jitter_ms == other.jitter_ms &&
         reorder == other.reorder && reorder_delay_ms == other.reorder_delay_ms && duplicate == other.duplicate &&
         mtu == other.mtu;
}

std::vector<std::string> ImpairProfile::arguments() const {
  std::vector<std::string> arguments;
  // One row per relay option: its name, its value in each direction and whether that value is the default.
  struct Field {
    const char* name;
    std::optional<double> up_value;
    std::optional<double> down_value;
  };
  const DirectionImpairment defaults;
  const auto unless_default = [](double value, double default_value) {
    return value == default_value ? std::nullopt : std::optional<double>(value);
  };
  const auto fields_of = [&](const DirectionImpairment& d) {
    return std::vector<std::optional<double>>{
        unless_default(d.loss, defaults.loss),
        unless_default(d.ge_p, defaults.ge_p),
        unless_default(d.ge_r, defaults.ge_r),
        unless_default(d.ge_loss_bad, defaults.ge_loss_bad),
        unless_default(d.ge_loss_good, defaults.ge_loss_good),
        unless_default(d.delay_ms, defaults.delay_ms),
        unless_default(d.jitter_ms, defaults.jitter_ms),
        unless_default(d.reorder, defaults.reorder),
        d.reorder_delay_ms,
        unless_default(d.duplicate, defaults.duplicate),
        unless_default(d.mtu, defaults.mtu),
    };
  };
  static const char* const kNames[] = {"loss",   "ge-p",    "ge-r",          "ge-loss-bad", "ge-loss-good", "delay",
                                       "jitter", "reorder", "reorder-delay", "duplicate",   "mtu"};
  const auto up_fields = fields_of(up);
  const auto down_fields = fields_of(down);
  for (std::size_t i = 0; i < up_fields.size(); ++i) {
    const auto& up_value = up_fields[i];
    const auto& down_value = down_fields[i];
    const std::string name = kNames[i];
    if (up_value == down_value) {
      if (up_value) arguments.insert(arguments.end(), {"--" + name, number_text(*up_value)});
      continue;
    }
    // The default of a field is the relay's default too, so a field set in one direction only needs one option.
    if (up_value) arguments.insert(arguments.end(), {"--up-" + name, number_text(*up_value)});
    if (down_value) arguments.insert(arguments.end(), {"--down-" + name, number_text(*down_value)});
  }
  const ImpairProfile default_profile;
  if (mapping_timeout_s != default_profile.mapping_timeout_s) {
    arguments.insert(arguments.end(), {"--mapping-timeout", std::to_string(mapping_timeout_s)});
  }
  if (max_seconds != default_profile.max_seconds) {
    arguments.insert(arguments.end(), {"--max-seconds", std::to_string(max_seconds)});
  }
  return arguments;
}

ImpairProfile ImpairProfile::none() { return ImpairProfile{}; }

ImpairProfile ImpairProfile::lossy(double loss, int delay_ms, int jitter_ms) {
  ImpairProfile profile;
  profile.up.loss = loss;
  profile.up.delay_ms = delay_ms;
  profile.up.jitter_ms = jitter_ms;
  profile.down = profile.up;
  return profile;
}

ImpairProfile ImpairProfile::bursty(double average_loss, double mean_burst) {
  if (!(average_loss >= 0 && average_loss < 1) || !(mean_burst >= 1)) {
    throw std::invalid_argument("ImpairProfile::bursty(" + number_text(average_loss) + ", " + number_text(mean_burst) +
                                "): average_loss must be 0 <= loss < 1 and mean_burst at least 1 datagram");
  }
  // The bad state's stationary share p / (p + r) is the average loss; its mean stay is 1 / r datagrams.
  const double ge_r = 1 / mean_burst;
  const double ge_p = ge_r * average_loss / (1 - average_loss);
  if (ge_p > 1) {
    throw std::invalid_argument("ImpairProfile::bursty(" + number_text(average_loss) + ", " + number_text(mean_burst) +
                                "): needs a good->bad probability of " + number_text(ge_p) +
                                " > 1; use longer bursts or less loss");
  }
  ImpairProfile profile;
  profile.up.ge_p = ge_p;
  profile.up.ge_r = ge_r;
  profile.down = profile.up;
  return profile;
}

namespace {

// A pipe whose both ends close on exec: only the ends dup2()ed onto the child's 0, 1, 2 survive into it, so no
// other child (another relay) keeps this relay's stdin open and its EOF comes when we close our end.
struct Pipe {
  int read_end = -1;
  int write_end = -1;
};

Pipe make_pipe() {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error(errno_text("pipe2"));
  return Pipe{fds[0], fds[1]};
}

}  // namespace

ImpairRelay::ImpairRelay(std::uint16_t upstream_port, std::uint64_t seed, const ImpairProfile& profile) {
  std::vector<std::string> argv = {DAUTH_IMPAIR_RELAY_PATH,
                                   "--listen",
                                   "127.0.0.1:0",
                                   "--upstream",
                                   "127.0.0.1:" + std::to_string(upstream_port),
                                   "--seed",
                                   std::to_string(seed)};
  const std::vector<std::string> impairments = profile.arguments();
  argv.insert(argv.end(), impairments.begin(), impairments.end());

  const Pipe input = make_pipe();
  PipeEnd child_input(input.read_end);
  to_relay_ = PipeEnd(input.write_end);
  const Pipe output = make_pipe();
  from_relay_ = PipeEnd(output.read_end);
  PipeEnd child_output(output.write_end);
  const Pipe errors = make_pipe();
  relay_errors_ = PipeEnd(errors.read_end);
  PipeEnd child_errors(errors.write_end);

  // posix_spawn rather than fork: safe in a process with threads (the tests run servers in threads), and it
  // reports a failed exec as its own error.
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, child_input.get(), STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, child_output.get(), STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, child_errors.get(), STDERR_FILENO);
  // The relay starts with no blocked signals and default dispositions (the test main ignores SIGPIPE).
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t none;
  sigemptyset(&none);
  sigset_t defaults;
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGPIPE);
  sigaddset(&defaults, SIGTERM);
  sigaddset(&defaults, SIGINT);
  posix_spawnattr_setsigmask(&attributes, &none);
  posix_spawnattr_setsigdefault(&attributes, &defaults);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  std::vector<char*> args;
  for (auto& argument : argv) args.push_back(argument.data());
  args.push_back(nullptr);
  const int spawn_error = ::posix_spawn(&pid_, args[0], &actions, &attributes, args.data(), environ);
  posix_spawnattr_destroy(&attributes);
  posix_spawn_file_actions_destroy(&actions);
  if (spawn_error != 0) {
    pid_ = -1;
    throw std::runtime_error(std::string(kRelayName) + ": cannot start " + argv[0] + ": " + std::strerror(spawn_error));
  }
  // Our copies of the child's ends go, so that its exit shows as EOF here and our close as EOF there.
  child_input.reset();
  child_output.reset();
  child_errors.reset();

  // The destructor does not run when the constructor throws: stop the relay on every failure path here.
  try {
    const std::optional<std::string> line = read_line("its listening line", kAnswerLimit);
    const std::string prefix = "listening 127.0.0.1:";
    if (!line) throw std::runtime_error(describe_exit("exited before listening"));
    if (line->compare(0, prefix.size(), prefix) != 0) {
      throw std::runtime_error(std::string(kRelayName) + ": expected '" + prefix + "PORT', got '" + *line + "'");
    }
    const char* first = line->data() + prefix.size();
    const char* last = line->data() + line->size();
    const auto parsed = std::from_chars(first, last, port_);
    if (parsed.ec != std::errc() || parsed.ptr != last || port_ == 0) {
      throw std::runtime_error(std::string(kRelayName) + ": no port in its listening line '" + *line + "'");
    }
  } catch (...) {
    stop();
    throw;
  }
}

ImpairRelay::~ImpairRelay() { stop(); }

int ImpairRelay::stop() {
  if (pid_ <= 0) return -1;
  to_relay_.reset();  // EOF on the relay's stdin: it exits
  const auto deadline = std::chrono::steady_clock::now() + kExitLimit;
  int status = 0;
  for (;;) {
    const pid_t reaped = ::waitpid(pid_, &status, WNOHANG);
    if (reaped == pid_ || (reaped < 0 && errno != EINTR)) break;
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(pid_, SIGKILL);
      while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  pid_ = -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string ImpairRelay::describe_exit(const std::string& what) {
  // Once it has exited, everything it wrote to stderr is in the pipe: the reason is complete.
  const int status = stop();
  drain_stderr();
  std::string reason = error_text_;
  while (!reason.empty() && reason.back() == '\n') reason.pop_back();
  return std::string(kRelayName) + " " + what + " (exit status " + std::to_string(status) + ")" +
         (reason.empty() ? std::string() : ": " + reason);
}

void ImpairRelay::drain_stderr() {
  for (;;) {
    pollfd ready{relay_errors_.get(), POLLIN, 0};
    if (::poll(&ready, 1, 0) <= 0 || !(ready.revents & (POLLIN | POLLHUP))) return;
    char chunk[1024];
    const ssize_t size = ::read(relay_errors_.get(), chunk, sizeof chunk);
    if (size <= 0) return;
    error_text_.append(chunk, static_cast<std::size_t>(size));
    if (error_text_.size() > kKeptErrorText) error_text_.erase(0, error_text_.size() - kKeptErrorText);
  }
}

std::optional<std::string> ImpairRelay::read_line(const std::string& waiting_for, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  bool errors_open = true;
  for (;;) {
    const auto newline = pending_output_.find('\n');
    if (newline != std::string::npos) {
      std::string line = pending_output_.substr(0, newline);
      pending_output_.erase(0, newline + 1);
      return line;
    }
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      drain_stderr();
      throw std::runtime_error(std::string(kRelayName) + ": no " + waiting_for + " within " +
                               std::to_string(limit.count()) + " ms" +
                               (error_text_.empty() ? std::string() : "; its stderr: " + error_text_));
    }
    // Both pipes at once: a relay blocked on a full stderr pipe would never answer on stdout.
    pollfd fds[2] = {{from_relay_.get(), POLLIN, 0}, {errors_open ? relay_errors_.get() : -1, POLLIN, 0}};
    if (::poll(fds, 2, static_cast<int>(left.count())) < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(errno_text("poll"));
    }
    if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      char chunk[1024];
      const ssize_t size = ::read(relay_errors_.get(), chunk, sizeof chunk);
      if (size > 0) {
        error_text_.append(chunk, static_cast<std::size_t>(size));
        if (error_text_.size() > kKeptErrorText) error_text_.erase(0, error_text_.size() - kKeptErrorText);
      } else {
        errors_open = false;
      }
    }
    if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
      char chunk[1024];
      const ssize_t size = ::read(from_relay_.get(), chunk, sizeof chunk);
      if (size > 0) {
        pending_output_.append(chunk, static_cast<std::size_t>(size));
      } else if (size == 0 || errno != EINTR) {
        return std::nullopt;
      }
    }
  }
}

std::string ImpairRelay::command(const std::string& line) {
  if (pid_ <= 0 || !to_relay_.valid()) throw std::runtime_error(std::string(kRelayName) + ": not running");
  const std::string text = line + "\n";
  // A relay that died closes its stdin: block SIGPIPE around the write so that the caller gets an exception,
  // not a signal (benchmarks may not ignore SIGPIPE), and swallow the SIGPIPE that write raised.
  sigset_t pipe_signal;
  sigemptyset(&pipe_signal);
  sigaddset(&pipe_signal, SIGPIPE);
  sigset_t old_mask;
  ::pthread_sigmask(SIG_BLOCK, &pipe_signal, &old_mask);
  sigset_t pending;
  sigpending(&pending);
  const bool was_pending = sigismember(&pending, SIGPIPE) == 1;
  std::size_t done = 0;
  int write_error = 0;
  while (done < text.size()) {
    const ssize_t written = ::write(to_relay_.get(), text.data() + done, text.size() - done);
    if (written < 0 && errno == EINTR) continue;
    if (written < 0) {
      write_error = errno;
      break;
    }
    done += static_cast<std::size_t>(written);
  }
  if (write_error == EPIPE && !was_pending) {
    const timespec no_wait{0, 0};
    ::sigtimedwait(&pipe_signal, nullptr, &no_wait);
  }
  ::pthread_sigmask(SIG_SETMASK, &old_mask, nullptr);
  if (write_error != 0) {
    throw std::runtime_error(describe_exit("did not take the command '" + line + "': " + std::strerror(write_error)));
  }
  const std::optional<std::string> answer = read_line("answer to '" + line + "'", kAnswerLimit);
  if (!answer) throw std::runtime_error(describe_exit("exited instead of answering '" + line + "'"));
  return *answer;
}

namespace {
void expect_ok(const std::string& line, const std::string& answer) {
  if (answer != "ok") throw std::runtime_error(std::string(kRelayName) + ": " + line + ": " + answer);
}
}  // namespace

void ImpairRelay::partition(bool on) {
  const std::string line = on ? "partition on" : "partition off";
  expect_ok(line, command(line));
}

void ImpairRelay::rebind() { expect_ok("rebind", command("rebind")); }

void ImpairRelay::set(const std::string& what, const std::string& value) {
  const std::string line = "set " + what + " " + value;
  expect_ok(line, command(line));
}

std::map<std::string, std::uint64_t> ImpairRelay::stats() {
  const std::string answer = command("stats");
  std::map<std::string, std::uint64_t> counters;
  std::istringstream pairs(answer);
  for (std::string pair; pairs >> pair;) {
    const auto equals = pair.find('=');
    std::uint64_t value = 0;
    const char* first = pair.data() + (equals == std::string::npos ? 0 : equals + 1);
    const char* last = pair.data() + pair.size();
    const auto parsed = std::from_chars(first, last, value);
    if (equals == std::string::npos || equals == 0 || parsed.ec != std::errc() || parsed.ptr != last) {
      throw std::runtime_error(std::string(kRelayName) + ": stats: '" + pair + "' is not key=count in '" + answer +
                               "'");
    }
    counters[pair.substr(0, equals)] = value;
  }
  return counters;
}

}  // namespace dauth::test

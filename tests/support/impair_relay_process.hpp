// ImpairRelay: dauth_impair_relay (docs/impairment-relay.md) as a child process between a test's or benchmark's
// UDP clients and one UDP server on 127.0.0.1, steered over the relay's stdin/stdout. No Catch2 and no dauth
// library here, so that bench/ can use it as well as the tests.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dauth/unique_fd.hpp"

namespace dauth::test {

// What the relay does to one direction; the defaults impair nothing. Units and ranges are the relay's options
// (docs/impairment-relay.md): probabilities 0–1, times in milliseconds 0–60000, mtu 0 or 68–65535.
struct DirectionImpairment {
  double loss = 0;  // independent loss; must stay 0 when ge_p > 0
  double ge_p = 0;  // Gilbert–Elliott good->bad per datagram; 0: off
  double ge_r = 0;  // Gilbert–Elliott bad->good per datagram (mean burst 1/ge_r); needed when ge_p > 0
  double ge_loss_bad = 1.0;
  double ge_loss_good = 0;
  double delay_ms = 0;
  double jitter_ms = 0;                    // uniform in delay ± jitter, never below 0
  double reorder = 0;                      // probability of being held back reorder_delay_ms more
  std::optional<double> reorder_delay_ms;  // unset: the relay's default, 2 × delay + 10
  double duplicate = 0;                    // probability of a second copy
  int mtu = 0;                             // path MTU in bytes; 0: no limit

  bool operator==(const DirectionImpairment& other) const;
  bool operator!=(const DirectionImpairment& other) const { return !(*this == other); }
};

struct ImpairProfile {
  DirectionImpairment up;    // client -> server
  DirectionImpairment down;  // server -> client
  int mapping_timeout_s = 300;
  int max_seconds = 3600;  // the relay exits by itself after this long

  // The relay's options for this profile, without --listen, --upstream and --seed: --X where both directions
  // agree, --up-X / --down-X where they differ; values at their default are left out.
  std::vector<std::string> arguments() const;

  // Nothing impaired: the relay only forwards (and can still partition and rebind).
  static ImpairProfile none();
  // Independent loss, delay and jitter, the same in both directions.
  static ImpairProfile lossy(double loss, int delay_ms, int jitter_ms);
  // Gilbert–Elliott loss in both directions with every datagram lost in the bad state and none in the good one:
  // ge_r = 1 / mean_burst, ge_p = ge_r × average_loss / (1 − average_loss), so that the stationary share of the
  // bad state is average_loss. Throws std::invalid_argument unless 0 <= average_loss < 1, mean_burst >= 1 and the
  // resulting ge_p <= 1.
  static ImpairProfile bursty(double average_loss, double mean_burst);
};

class ImpairRelay {
 public:
  // How long the constructor waits for the "listening" line, and each command for its answer.
  static constexpr std::chrono::seconds kAnswerLimit{5};
  // How long the destructor waits for the relay to exit after closing its stdin, before SIGKILL.
  static constexpr std::chrono::seconds kExitLimit{2};

  // Starts dauth_impair_relay listening on 127.0.0.1 (a free port) towards 127.0.0.1:upstream_port with the
  // given seed and profile, and waits for its "listening" line. Throws std::runtime_error when the relay cannot
  // be started, exits first (the message carries the relay's own error, e.g. an option out of range) or does not
  // answer within kAnswerLimit.
  ImpairRelay(std::uint16_t upstream_port, std::uint64_t seed, const ImpairProfile& profile);
  // Closes the relay's stdin (it exits on EOF), waits up to kExitLimit, then SIGKILL; always reaps it.
  ~ImpairRelay();
  ImpairRelay(const ImpairRelay&) = delete;
  ImpairRelay& operator=(const ImpairRelay&) = delete;

  // The relay's port on 127.0.0.1: clients send here instead of to the server.
  std::uint16_t port() const { return port_; }
  pid_t pid() const { return pid_; }

  // While on, every datagram in both directions is dropped, including those already delayed in the relay.
  void partition(bool on);
  // Every client gets a new upstream socket on a new port; the server's replies to the old ports are lost.
  void rebind();
  // The relay's counters ("up_received", "down_dropped_loss", ... as in docs/impairment-relay.md).
  std::map<std::string, std::uint64_t> stats();
  // A run-time change, e.g. set("up-loss", "0.3"). Throws std::runtime_error with the relay's reason when it
  // refuses the value; the old value then stays in force.
  void set(const std::string& what, const std::string& value);
  // Sends one control line and returns the relay's one-line answer (without the newline).
  std::string command(const std::string& line);

 private:
  // Owns one pipe end; closes it exactly once.
  using PipeEnd = dauth::UniqueFd;

  // The next line on the relay's stdout, or nullopt when the relay closed it (exited). Throws after `limit`.
  std::optional<std::string> read_line(const std::string& waiting_for, std::chrono::milliseconds limit);
  // Drains whatever the relay wrote to stderr (kept for error messages) without blocking.
  void drain_stderr();
  // Stops the relay (EOF on stdin, then SIGKILL after kExitLimit) and returns its exit status (128 + signal).
  int stop();
  std::string describe_exit(const std::string& what);

  pid_t pid_ = -1;
  std::uint16_t port_ = 0;
  PipeEnd to_relay_;      // its stdin
  PipeEnd from_relay_;    // its stdout: one answer line per command
  PipeEnd relay_errors_;  // its stderr
  std::string pending_output_;
  std::string error_text_;  // the last few KiB of its stderr
};

}  // namespace dauth::test

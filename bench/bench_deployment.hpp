// The deployment the benchmarks that start real dauthd processes share (bench_proxy, bench_impaired): an MEF
// dauthd and two gateway dauthds on 127.0.0.1 with fresh pre-provisioned PSKs, state directories and ports in a
// temporary directory, AE "meter" on gateway A, AE "valve" on gateway B served by coap-server-notls; plus the
// process helpers they need. Every child process dies with the benchmark (no orphans on a shared machine).
// Set-up failures throw std::runtime_error; nothing here asserts on measurements.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "loopback_ports.hpp"  // every port a benchmark names comes from there

namespace dauth::bench {

// `bytes` random bytes from /dev/urandom as lower-case hex and a newline (dauthd's key-file format).
std::string random_hex(std::size_t bytes);

// Writes `text` to `path` with mode 0600 (dauthd refuses key files others may read).
void write_private(const std::filesystem::path& path, const std::string& text);

// Starts argv[0] (looked up in PATH) with stdout and stderr to `log`; the child gets SIGKILL if we die.
pid_t spawn(const std::vector<std::string>& argv, const std::filesystem::path& log);

// One control-protocol request (docs/control-protocol.md); the reply line, or "" if the socket is not there yet.
std::string control(const std::filesystem::path& socket_path, const std::string& request);

struct CommandResult {
  int exit_code = -1;  // 128 + signal when killed
  std::string output;  // stdout and stderr together
  double seconds = 0;  // wall clock from fork to exit
};

// Runs argv to completion (stdin /dev/null) and times it.
CommandResult run_command(const std::vector<std::string>& argv);

// Nearest-rank percentile, p in [0, 1]; `values` must not be empty.
double percentile(std::vector<double> values, double p);

struct DeploymentOptions {
  std::string dauthd_path;
  std::string name = "bench";  // the temporary directory is /tmp/dauth-<name>-XXXXXX
  std::string nstart;          // peer.nstart and peer.local_nstart of both gateways; "": dauthd's defaults
};

// Configs are written by the constructor; edit them with replace_in_config() before starting a node. Node names:
// "mef", "a", "b"; port names: "mef", "a_peer", "a_local", "b_peer", "b_local", "valve". Logs are <dir>/<node>.log.
// With BENCH_KEEP_DIR set in the environment the directory is kept (and named on stderr) for reading the logs.
struct Deployment {
  explicit Deployment(const DeploymentOptions& options);
  ~Deployment();  // SIGTERM to every child, waits for them, removes the directory
  Deployment(const Deployment&) = delete;
  Deployment& operator=(const Deployment&) = delete;

  // "127.0.0.1:<port>" of a port name.
  std::string address(const std::string& port_name) const;
  std::filesystem::path control_socket(const std::string& node) const { return dir / node / "control"; }
  // Replaces every `from` in the node's config file by `to`; throws if `from` does not occur.
  void replace_in_config(const std::string& node, const std::string& from, const std::string& to);

  // Starts dauthd with <dir>/<node>.toml and waits (10 s at most) until it answers "status".
  void start_dauthd(const std::string& node);
  // Starts coap-server-notls on the valve port (no readiness wait: it is up long before an enrolment is done).
  void start_valve();
  // Polls enrol.status until the AE is enrolled; throws after `limit_seconds`.
  void wait_enrolled(const std::string& node, const std::string& ae_id, int limit_seconds = 60);
  // The MEF, the valve, gateways B and A, and waits until valve and meter are enrolled.
  void start();

  std::filesystem::path dir;
  std::map<std::string, std::uint16_t> ports;
  std::map<std::string, pid_t> children;
  std::string dauthd_path;
  bool keep_dir = false;
};

}  // namespace dauth::bench

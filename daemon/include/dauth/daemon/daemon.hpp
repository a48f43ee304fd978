// The Daemon object (docs/conventions.md §16): holds its components as members in dependency order, so that set-up is
// the order of start() and tear-down is the reverse, by RAII. Every registration (signal, timer, control verb) is a
// member whose destruction removes it.
//
// Roles: the key store, the MEF, the Enrolees and the Peer role (proxy path) live in one Roles object
// (daemon/src/roles.hpp), started after the control socket. A verb whose role is not configured answers
//   {"ok": false, "error": "<verb>: no <role> role configured ([<section>])", "code": "unsupported"}
// (docs/control-protocol.md, dauthctl(1)).
#pragma once

#include <chrono>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "dauth/daemon/config.hpp"
#include "dauth/daemon/control_socket.hpp"
#include "dauth/daemon/event_loop.hpp"
#include "dauth/daemon/systemd_notify.hpp"
#include "dauth/error.hpp"

namespace dauth::daemon {

// The project version, as dauthd --version and the status verb print it.
std::string_view version() noexcept;

class Roles;

class Daemon {
 public:
  // Sets everything up from an already validated configuration and its loaded secrets, binds the control
  // socket and sends READY=1. The caller must have blocked SIGHUP, SIGTERM and SIGINT (block_daemon_signals()).
  static Result<std::unique_ptr<Daemon>> start(std::filesystem::path config_path, Config config,
                                               LoadedSecrets secrets);
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // Runs the event loop until SIGTERM or SIGINT has been handled: STOPPING=1, new requests get 5.03, accepted
  // requests and running enrolments finish (at most daemon.shutdown_timeout; a second signal cuts it short), then
  // the roles are torn down (close_notify on every DTLS session) and run() returns.
  Result<void> run();

  // SIGHUP: parse and validate the file again, load its secrets, then swap. A bad file or an unloadable key
  // keeps the running configuration and reports the reason (log, STATUS=, status verb). Live sessions stay.
  // All or nothing, and it says what it did: every changed key is applied (reload rule live) or, its running
  // value kept, listed as needing a restart (logged "needs a restart: KEY", status restart_pending, until a
  // restart or until the file has the running value again).
  Result<void> reload();

  nlohmann::json status_json() const;
  // The running configuration (the one the roles were built from, with the reloads applied since).
  const Config& config() const { return config_; }
  nlohmann::json stats_json() const;

 private:
  Daemon(std::filesystem::path config_path, Config config, LoadedSecrets secrets);
  Result<void> set_up();
  Result<void> register_verbs();
  void shut_down(const std::string& reason);
  void check_drain();
  void finish(const std::string& how);
  nlohmann::json key_store_sealed_with() const;

  // ----- members in dependency order: later ones use earlier ones, and are destroyed first -----
  std::filesystem::path config_path_;
  Config config_;
  LoadedSecrets secrets_;
  SystemdNotifier notifier_;
  std::unique_ptr<EventLoop> loop_;
  EventLoop::Registration signal_watch_;
  EventLoop::Registration watchdog_timer_;
  EventLoop::Registration suppressed_flush_timer_;  // log::flush_suppressed()
  std::unique_ptr<ControlServer> control_;
  std::vector<ControlServer::VerbRegistration> verbs_;
  // The key store, transport Nodes and role objects; torn down before the verbs, the control socket and the loop.
  std::unique_ptr<Roles> roles_;
  // SIGTERM drain: polls Roles::idle() until the in-flight work is done or daemon.shutdown_timeout has passed.
  EventLoop::Registration drain_timer_;
  std::chrono::steady_clock::time_point drain_deadline_;
  bool drain_idle_seen_ = false;

  std::time_t started_at_ = 0;
  std::time_t config_loaded_at_ = 0;
  std::uint64_t reloads_ = 0;
  std::uint64_t reload_failures_ = 0;
  std::optional<std::string> last_reload_error_;
  std::time_t last_reload_at_ = 0;
  std::vector<std::string> last_reload_applied_;  // config names the last successful reload applied
  RestartValues running_restart_values_;          // taken at start: what the running daemon was built from
  std::vector<std::string> restart_pending_;      // config names whose new value waits for a restart
  bool stopping_ = false;
};

// Blocks the signals the daemon takes through its signalfd; call first thing in main, before any thread exists.
Result<void> block_daemon_signals();

// For a process that holds keys: no core dumps (RLIMIT_CORE = 0) and not dumpable (no ptrace by the same uid,
// no /proc/<pid>/mem for others). docs/conventions.md §11: libcoap keeps unwiped copies of session PSKs on the heap.
Result<void> harden_process();

}  // namespace dauth::daemon

#include "dauth/daemon/daemon.hpp"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/daemon/check_config.hpp"
#include "dauth/crypto/keystore.hpp"
#include "dauth/daemon/log.hpp"
#include "metrics.hpp"
#include "roles.hpp"
#include "verbs/verbs.hpp"

#ifndef DAUTH_VERSION
#define DAUTH_VERSION "unknown"
#endif

namespace dauth::daemon {

namespace {

std::time_t now() { return std::time(nullptr); }

}  // namespace

std::string_view version() noexcept { return DAUTH_VERSION; }

Result<void> block_daemon_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGHUP);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) != 0) {
    return make_error(Errc::internal, std::string("sigprocmask: ") + std::strerror(errno));
  }
  // A control client that disconnects early must not kill us: send() uses MSG_NOSIGNAL, this covers the rest.
  ::signal(SIGPIPE, SIG_IGN);
  return ok_result();
}

Result<void> harden_process() {
  const rlimit no_core{0, 0};
  if (::setrlimit(RLIMIT_CORE, &no_core) != 0) {
    return make_error(Errc::internal, std::string("setrlimit(RLIMIT_CORE, 0): ") + std::strerror(errno));
  }
#if !defined(__SANITIZE_ADDRESS__)
  // Not under AddressSanitizer: LeakSanitizer ptrace()s the process at exit, which PR_SET_DUMPABLE=0 forbids.
  if (::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
    return make_error(Errc::internal, std::string("prctl(PR_SET_DUMPABLE, 0): ") + std::strerror(errno));
  }
#endif
  return ok_result();
}

Daemon::Daemon(std::filesystem::path config_path, Config config, LoadedSecrets secrets)
    : config_path_(std::move(config_path)), config_(std::move(config)), secrets_(std::move(secrets)) {}

Daemon::~Daemon() = default;

Result<std::unique_ptr<Daemon>> Daemon::start(std::filesystem::path config_path, Config config,
                                              LoadedSecrets secrets) {
  std::unique_ptr<Daemon> daemon(new Daemon(std::move(config_path), std::move(config), std::move(secrets)));
  if (auto r = daemon->set_up(); !r) return std::move(r).error();
  return daemon;
}

// The set-up list (docs/conventions.md §16, chrony's X_Initialise() calls): each step uses only the ones above it, and
// the members that hold them are declared in this order, so tear-down is this list reversed.
Result<void> Daemon::set_up() {
  started_at_ = now();
  config_loaded_at_ = started_at_;
  running_restart_values_ = restart_values(config_);
  log::set_threshold(config_.daemon.log_level);

  if (auto r = check_state_directory(config_); !r) return r;

  auto loop = EventLoop::create();
  if (!loop) return std::move(loop).error();
  loop_ = std::move(loop).value();

  auto signals = loop_->on_signals({SIGHUP, SIGTERM, SIGINT}, [this](const signalfd_siginfo& info) {
    if (info.ssi_signo == SIGHUP) {
      (void)reload();  // reload() logs and reports its own outcome
    } else {
      shut_down(info.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
    }
  });
  if (!signals) return std::move(signals).error();
  signal_watch_ = std::move(signals).value();

  auto control = ControlServer::open(*loop_, {config_.daemon.control_socket, config_.daemon.control_group,
                                              config_.daemon.max_control_clients});
  if (!control) return std::move(control).error();
  control_ = std::move(control).value();
  if (auto r = register_verbs(); !r) return r;

  if (config_.enrolee || config_.mef || config_.peer) {
    auto roles = Roles::start(*loop_, config_, secrets_);
    if (!roles) return std::move(roles).error();
    roles_ = std::move(roles).value();
  }

  if (const auto interval = notifier_.watchdog_interval()) {
    auto timer = loop_->add_timer(*interval, *interval, [this] { notifier_.watchdog(); });
    if (!timer) return std::move(timer).error();
    watchdog_timer_ = std::move(timer).value();
    log::info("watchdog: WATCHDOG_USEC=" + std::to_string(notifier_.watchdog_usec()) + ", pinging every " +
              std::to_string(interval->count()) + " ms");
  }

  // The "N more suppressed" line of a flood that stopped comes when its interval ends, not with its next line.
  auto flush = loop_->add_timer(log::kLimitInterval, log::kLimitInterval, [] { log::flush_suppressed(); });
  if (!flush) return std::move(flush).error();
  suppressed_flush_timer_ = std::move(flush).value();

  log::notice("dauthd " + std::string(version()) + " started: config " + config_.source + ", roles " +
              config_.roles() + ", control socket " + control_->path().string() + ", " +
              std::to_string(secrets_.size()) + " key(s) loaded");
  notifier_.ready("running; roles: " + config_.roles());
  return ok_result();
}

// One registration per row of the verb table (verbs/verbs.hpp); each removal is its VerbRegistration in verbs_,
// destroyed before control_.
Result<void> Daemon::register_verbs() {
  for (const ControlVerb& verb : control_verbs()) {
    auto registration = control_->add_verb(
        verb.name,
        [this, &verb](const ControlRequest& request) -> Result<nlohmann::json> {
          VerbContext context{*this, roles_.get()};
          return run_control_verb(verb, context, request);
        },
        verb.max_fds);
    if (!registration) return std::move(registration).error();
    verbs_.push_back(std::move(registration).value());
  }
  return ok_result();
}

Result<void> Daemon::run() {
  auto r = loop_->run();
  if (!r) {
    log::error(r.error().message);
    return r;
  }
  // Tear the roles down here, not in ~Daemon: the Nodes close their DTLS sessions (close_notify) and the key
  // store's last writes are already fsync'ed (KeyStore::put), so the store on disk is consistent at exit.
  roles_.reset();
  log::flush_suppressed(/*ended_or_not=*/true);  // what a flood left uncounted is in the journal before we go
  log::notice("dauthd stopped");
  return ok_result();
}

void Daemon::shut_down(const std::string& reason) {
  if (stopping_) {
    finish(reason + " during the drain: exiting now");
    return;
  }
  stopping_ = true;
  // New control connections are refused from now on; the watchdog keeps pinging while the drain runs.
  control_->stop_accepting();
  if (roles_) roles_->begin_drain();
  const std::size_t pending = roles_ ? roles_->pending().size() : 0;
  const std::string status = "stopping on " + reason + ": " + std::to_string(pending) +
                             " request(s)/enrolment(s) in flight, waiting at most " +
                             std::to_string(config_.daemon.shutdown_timeout) + " s";
  log::notice(status);
  notifier_.stopping(status);
  drain_deadline_ = std::chrono::steady_clock::now() + std::chrono::seconds(config_.daemon.shutdown_timeout);
  // Polled: completions arrive through many paths (Responders, Enrolee callbacks); 20 ms is well below any
  // request's own time scale and only runs during the drain.
  auto timer = loop_->add_timer(std::chrono::milliseconds(1), std::chrono::milliseconds(20), [this] { check_drain(); });
  if (!timer) {
    finish("cannot arm the drain timer (" + timer.error().message + "): exiting now");
    return;
  }
  drain_timer_ = std::move(timer).value();
}

void Daemon::check_drain() {
  // Idle on two polls in a row: an answer given in this round is sent by the transport on its next round (a
  // separate response goes through libcoap's async queue), so it leaves before the Nodes are destroyed.
  const bool idle = !roles_ || roles_->idle();
  if (idle && drain_idle_seen_) {
    finish("drain complete");
    return;
  }
  drain_idle_seen_ = idle;
  if (!idle && std::chrono::steady_clock::now() >= drain_deadline_) {
    finish("daemon.shutdown_timeout (" + std::to_string(config_.daemon.shutdown_timeout) + " s) reached");
  }
}

void Daemon::finish(const std::string& how) {
  const auto abandoned = roles_ ? roles_->pending() : std::vector<std::string>{};
  if (abandoned.empty()) {
    log::notice(how + "; closing the sessions");
  } else {
    log::warning(how + "; abandoning " + std::to_string(abandoned.size()) + " unfinished:");
    for (const auto& what : abandoned) log::warning("abandoned: " + what);
  }
  drain_timer_.reset();
  watchdog_timer_.reset();
  // The requests still waiting get 5.03 now instead of a timeout at the local AE (or the peer). A deferred answer
  // leaves on the transport's next rounds, so the loop runs a little longer (kFinalFlush) before it stops.
  const std::size_t answered = roles_ ? roles_->abandon_in_flight() : 0;
  if (answered == 0) {
    loop_->stop();
    return;
  }
  log::notice("answered " + std::to_string(answered) + " abandoned request(s) with 5.03");
  constexpr std::chrono::milliseconds kFinalFlush(200);
  auto timer = loop_->add_timer(kFinalFlush, std::chrono::milliseconds(0), [this] { loop_->stop(); });
  if (!timer) {
    loop_->stop();
    return;
  }
  drain_timer_ = std::move(timer).value();
}

Result<void> Daemon::reload() {
  notifier_.reloading();
  log::info("reloading configuration from " + config_path_.string());
  const auto fail = [this](const Error& error) -> Result<void> {
    ++reload_failures_;
    last_reload_at_ = now();
    last_reload_error_ = error.message;
    // One log line per config error, so each keeps its file:line.
    std::string message = error.message;
    std::size_t start = 0;
    while (start <= message.size()) {
      const auto end = message.find('\n', start);
      log::error("reload refused, keeping the running configuration: " +
                 message.substr(start, end == std::string::npos ? std::string::npos : end - start));
      if (end == std::string::npos) break;
      start = end + 1;
    }
    notifier_.ready("running; last reload failed, old configuration kept");
    return make_error(error.code, error.message);
  };

  auto config = load_config(config_path_);
  if (!config) return fail(config.error());
  auto secrets = load_secrets(*config);
  if (!secrets) return fail(secrets.error());

  // Each changed key by its reload rule (config_schema.cpp): the live ones are applied below, the others keep
  // their running value and are named.
  auto applied = live_changes(config_, *config);
  auto pending = restart_pending(running_restart_values_, restart_values(*config));
  // PKCS#11 logs a process into a token once: while logged in, the token never sees a new PIN, so the reload
  // cannot try it (load_secrets' key checks pass without asking). It waits for the restart, which tries it;
  // dauthd --check-config, a process of its own, tries it at once.
  const auto& running_pin = secrets_.pkcs11_pin();
  const auto& new_pin = secrets->pkcs11_pin();
  if (running_pin && new_pin && !running_pin->equals(*new_pin)) {
    const std::string key = config->daemon.pkcs11_pin_file.empty() ? "daemon.pkcs11_pin_credential"
                                                                   : "daemon.pkcs11_pin_file";
    pending.erase(std::remove(pending.begin(), pending.end(), key), pending.end());  // named once, with the why
    pending.push_back(key + " (a new PIN)");
  }
  // New policy, peer addresses, local AEs' sources and endpoints, key tables; live sessions continue.
  if (roles_) {
    if (auto r = roles_->reload(*config, *secrets); !r) return fail(r.error());
  }
  config_ = std::move(config).value();
  secrets_ = std::move(secrets).value();
  log::set_threshold(config_.daemon.log_level);
  ++reloads_;
  config_loaded_at_ = now();
  last_reload_at_ = config_loaded_at_;
  last_reload_error_.reset();
  last_reload_applied_ = std::move(applied);
  restart_pending_ = std::move(pending);
  const auto listed = [](const std::vector<std::string>& names) {
    std::string text;
    for (const auto& name : names) text += (text.empty() ? "" : ", ") + name;
    return text.empty() ? std::string("none") : text;
  };
  log::notice("configuration reloaded: roles " + config_.roles() + ", " + std::to_string(secrets_.size()) +
              " key(s) loaded; applied: " + listed(last_reload_applied_));
  for (const auto& name : restart_pending_) {
    log::notice("reload: needs a restart: " + name + " (the running value stays until then)");
  }
  notifier_.ready("running; roles: " + config_.roles() + "; reloaded" +
                  (restart_pending_.empty() ? std::string() : "; restart pending: " + listed(restart_pending_)));
  return ok_result();
}

// Which configured master key seals the key store (dauthd(8) MASTER KEY ROTATION): "current", "next", or null
// without a store (no role).
nlohmann::json Daemon::key_store_sealed_with() const {
  if (!roles_) return nullptr;
  const crypto::KeyStore& store = roles_->key_store();
  if (store.sealed_with(secrets_.master_key())) return "current";
  if (!secrets_.next_master_key().empty() && store.sealed_with(secrets_.next_master_key())) return "next";
  // Neither key loaded at start or by the last reload: rotated to a next-key file written since (a reload reads it).
  return "neither";
}

nlohmann::json Daemon::status_json() const {
  nlohmann::json last_reload = nullptr;
  if (last_reload_at_ != 0) {
    last_reload = {{"ok", !last_reload_error_.has_value()},
                   {"at", static_cast<std::int64_t>(last_reload_at_)},
                   {"error", last_reload_error_ ? nlohmann::json(*last_reload_error_) : nlohmann::json(nullptr)},
                   {"applied", last_reload_applied_}};
  }
  return {
      {"version", std::string(version())},
      {"pid", static_cast<std::int64_t>(::getpid())},
      {"state", stopping_ ? "stopping" : "running"},
      {"uptime_seconds", static_cast<std::int64_t>(now() - started_at_)},
      {"config_file", config_path_.string()},
      {"config_loaded_at", static_cast<std::int64_t>(config_loaded_at_)},
      {"roles", {{"enrolee", config_.enrolee.has_value()}, {"mef", config_.mef.has_value()},
                 {"peer", config_.peer.has_value()}}},
      {"roles_available", {{"enrolee", roles_ && roles_->has_enrolee()}, {"mef", roles_ && roles_->has_mef()},
                           {"peer", roles_ && roles_->has_peer()}}},
      {"ports", roles_ ? roles_->ports() : nlohmann::json::object()},
      {"control_socket", control_ ? control_->path().string() : std::string()},
      {"log_level", std::string(log::to_string(log::threshold()))},
      {"watchdog_usec", notifier_.watchdog_usec()},
      {"keys_loaded", secrets_.size()},
      {"key_store_sealed_with", key_store_sealed_with()},
      {"reloads", reloads_},
      {"reload_failures", reload_failures_},
      {"last_reload", last_reload},
      {"restart_pending", restart_pending_},
  };
}

nlohmann::json Daemon::stats_json() const {
  MetricSet metrics;
  metrics.add("dauth_build_info", {{"version", std::string(version())}}, 1);
  metrics.add("dauth_uptime_seconds", static_cast<std::int64_t>(now() - started_at_));
  metrics.add("dauth_keys_loaded", secrets_.size());
  metrics.add("dauth_reloads_total", reloads_);
  metrics.add("dauth_reload_failures_total", reload_failures_);
  metrics.add("dauth_control_requests_total", control_ ? control_->requests_served() : 0);
  metrics.add("dauth_control_requests_failed_total", control_ ? control_->requests_failed() : 0);
  metrics.add("dauth_control_clients", control_ ? control_->client_count() : 0);
  metrics.add("dauth_sd_notify_sent_total", notifier_.sent());
  metrics.add("dauth_sd_notify_failures_total", notifier_.failures());
  if (roles_) roles_->stats(metrics);
  return metrics.to_json();
}

}  // namespace dauth::daemon

// dauthd: parse the command line, load and validate the configuration and its keys, then hand over to Daemon.
// Exit codes (dauthd(8)): 0 clean stop or config OK, 1 runtime failure, 2 usage or configuration error.
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <string>

#include "dauth/daemon/check_config.hpp"
#include "dauth/daemon/config.hpp"
#include "dauth/daemon/daemon.hpp"
#include "dauth/daemon/exit_codes.hpp"
#include "dauth/daemon/log.hpp"

namespace {

using dauth::daemon::ExitCode;
using dauth::daemon::as_int;
namespace log = dauth::daemon::log;

// One log line per error line, so that each configuration error keeps its own file:line.
void log_lines(const std::string& text) {
  std::size_t start = 0;
  while (start <= text.size()) {
    const auto end = text.find('\n', start);
    log::error(text.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) break;
    start = end + 1;
  }
}

// --check-config: everything as the service user (-u), so that what it cannot read or bind shows here and not at
// start. Errors and notes on stderr, the effective configuration on stdout.
int run_check_config(const std::string& config_path, const std::string& user) {
  const auto refuse = [](const std::string& message) {
    std::cerr << message << "\n";
    return as_int(ExitCode::usage);
  };
  if (!user.empty()) {
    if (auto r = dauth::daemon::become_user(user); !r) return refuse(r.error().message);
  } else if (::geteuid() == 0) {
    std::cerr << "note: checking as root; the packaged service runs as user dauth: dauthd --check-config -u dauth "
                 "checks what that user can read and bind\n";
  }
  auto config = dauth::daemon::load_config(config_path);
  if (!config) return refuse(config.error().message);
  auto secrets = dauth::daemon::load_secrets(*config, dauth::daemon::SystemdCredential::later);
  if (!secrets) return refuse(secrets.error().message);
  const auto deployment = dauth::daemon::check_deployment(*config);
  for (const auto& note : deployment.notes) std::cerr << "note: " << note << "\n";
  for (const auto& error : deployment.errors) std::cerr << error << "\n";
  if (!deployment.errors.empty()) return as_int(ExitCode::usage);
  std::cout << config->normalised(&secrets.value());
  return as_int(ExitCode::ok);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dauthd: oneM2M decentralized authentication daemon (Enrolee, MEF and Peer roles)", "dauthd"};
  std::string config_path(dauth::daemon::kDefaultConfigPath);
  bool check_config = false;
  bool show_version = false;
  std::string check_user;
  app.add_option("-c,--config", config_path, "configuration file")->capture_default_str();
  auto* check = app.add_flag("--check-config", check_config,
                             "validate the configuration and its key files, and what starting needs (state "
                             "directory, readable files, free ports); print the effective configuration (keys "
                             "hidden), exit 0 if valid, 2 if not");
  app.add_option("-u,--user", check_user,
                 "with --check-config: check as this user, the one the service runs as (dauthd.service: "
                 "User=dauth); needs root")
      ->needs(check);
  app.add_flag("--version", show_version, "print the version and exit");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? as_int(ExitCode::ok) : as_int(ExitCode::usage);
  }
  if (show_version) {
    std::cout << "dauthd " << dauth::daemon::version() << "\n";
    return as_int(ExitCode::ok);
  }

  // Before any key is read: no core dumps, and the signals belong to the signalfd.
  if (auto r = dauth::daemon::harden_process(); !r) {
    log::error(r.error().message);
    return as_int(ExitCode::failed);
  }
  if (auto r = dauth::daemon::block_daemon_signals(); !r) {
    log::error(r.error().message);
    return as_int(ExitCode::failed);
  }

  // A configuration or key that does not load is the operator's to fix: exit 2, with the reason on stderr for
  // --check-config and in the log otherwise.
  const auto refuse = [](const dauth::Error& error) {
    log_lines(error.message);
    return as_int(ExitCode::usage);
  };
  if (check_config) return run_check_config(config_path, check_user);
  auto config = dauth::daemon::load_config(config_path);
  if (!config) return refuse(config.error());
  log::set_threshold(config->daemon.log_level);
  // Fail closed (docs/conventions.md §12): a key that does not load stops us here.
  auto secrets = dauth::daemon::load_secrets(*config);
  if (!secrets) return refuse(secrets.error());

  auto daemon = dauth::daemon::Daemon::start(config_path, std::move(config).value(), std::move(secrets).value());
  if (!daemon) {
    log_lines("start failed: " + daemon.error().message);
    return as_int(dauth::daemon::exit_code_for(daemon.error().code, dauth::daemon::ErrorStage::start_up));
  }
  if (auto r = (*daemon)->run(); !r) return as_int(ExitCode::failed);
  return as_int(ExitCode::ok);
}

// dauthd: parse the command line, load and validate the configuration and its keys, then hand over to Daemon.
// Exit codes (dauthd(8)): 0 clean stop or config OK, 1 runtime failure, 2 usage or configuration error.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <string>

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

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dauthd: oneM2M decentralized authentication daemon (Enrolee, MEF and Peer roles)", "dauthd"};
  std::string config_path(dauth::daemon::kDefaultConfigPath);
  bool check_config = false;
  bool show_version = false;
  app.add_option("-c,--config", config_path, "configuration file")->capture_default_str();
  app.add_flag("--check-config", check_config,
               "validate the configuration and its key files, print the effective configuration (keys hidden), "
               "exit 0 if valid, 2 if not");
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
  const auto refuse = [check_config](const dauth::Error& error) {
    if (check_config) {
      std::cerr << error.message << "\n";
    } else {
      log_lines(error.message);
    }
    return as_int(ExitCode::usage);
  };
  auto config = dauth::daemon::load_config(config_path);
  if (!config) return refuse(config.error());
  log::set_threshold(config->daemon.log_level);
  // Fail closed (docs/conventions.md §12): a key that does not load stops us here.
  auto secrets = dauth::daemon::load_secrets(*config);
  if (!secrets) return refuse(secrets.error());
  if (check_config) {
    std::cout << config->normalised(&secrets.value());
    return as_int(ExitCode::ok);
  }

  auto daemon = dauth::daemon::Daemon::start(config_path, std::move(config).value(), std::move(secrets).value());
  if (!daemon) {
    log_lines("start failed: " + daemon.error().message);
    return as_int(dauth::daemon::exit_code_for(daemon.error().code, dauth::daemon::ErrorStage::start_up));
  }
  if (auto r = (*daemon)->run(); !r) return as_int(ExitCode::failed);
  return as_int(ExitCode::ok);
}

// dauthctl's verbs: one file per verb (docs/conventions.md §1), each adding its CLI11 subcommand. main.cpp lists them
// in one table. Every verb prints through print_reply(): the same fields for human output and for --json.
#pragma once

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <string>

namespace dauthctl {

struct Context {
  std::string socket = "/run/dauth/control";
  bool json = false;
  int exit_code = 0;
};

CLI::App* add_show(CLI::App& parent, Context& context);
CLI::App* add_dump(CLI::App& parent, Context& context);
CLI::App* add_status(CLI::App& parent, Context& context);
CLI::App* add_sessions(CLI::App& parent, Context& context);
CLI::App* add_credentials(CLI::App& parent, Context& context);
CLI::App* add_enrol(CLI::App& parent, Context& context);
CLI::App* add_revoke(CLI::App& parent, Context& context);
CLI::App* add_peers(CLI::App& parent, Context& context);
CLI::App* add_stats(CLI::App& parent, Context& context);
CLI::App* add_enrolees(CLI::App& parent, Context& context);
CLI::App* add_rpk(CLI::App& parent, Context& context);
CLI::App* add_genpsk(CLI::App& parent, Context& context);
CLI::App* add_reload(CLI::App& parent, Context& context);
CLI::App* add_rekey(CLI::App& parent, Context& context);

// Plain `dauthctl` means `dauthctl show`.
int run_show(Context& context);
int run_status(Context& context);

}  // namespace dauthctl

// dauthctl: control client for dauthd. This file is only the verb table and main (docs/conventions.md §1, like wg.c).
// Exit codes (dauthctl(1)): 0 ok, 1 operation failed, 2 usage, 3 daemon unreachable, 4 refused.
#include <iostream>

#include "dauth/daemon/exit_codes.hpp"
#include "verbs.hpp"

namespace {

using dauthctl::Context;

struct VerbEntry {
  const char* name;
  CLI::App* (*add)(CLI::App& parent, Context& context);
};

// The verbs, in the order `dauthctl --help` lists them.
constexpr VerbEntry kVerbs[] = {
    {"show", dauthctl::add_show},       {"dump", dauthctl::add_dump},
    {"status", dauthctl::add_status},   {"sessions", dauthctl::add_sessions}, {"credentials", dauthctl::add_credentials},
    {"enrol", dauthctl::add_enrol},     {"revoke", dauthctl::add_revoke},     {"peers", dauthctl::add_peers},
    {"stats", dauthctl::add_stats},     {"enrolees", dauthctl::add_enrolees}, {"genpsk", dauthctl::add_genpsk},
    {"reload", dauthctl::add_reload},   {"rekey", dauthctl::add_rekey},       {"rpk", dauthctl::add_rpk},
};

}  // namespace

int main(int argc, char** argv) {
  using dauth::daemon::ExitCode;
  Context context;
  CLI::App app{"dauthctl: control dauthd through its control socket", "dauthctl"};
  app.add_option("-s,--socket", context.socket, "dauthd's control socket")->capture_default_str();
  app.add_flag("--json", context.json, "print the daemon's reply as JSON (documented in dauthctl(1))");
  app.require_subcommand(0, 1);
  app.fallthrough();  // --json and -s are accepted after the verb too
  for (const auto& verb : kVerbs) verb.add(app, context);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? dauth::daemon::as_int(ExitCode::ok) : dauth::daemon::as_int(ExitCode::usage);
  }
  if (app.get_subcommands().empty()) return dauthctl::run_show(context);
  return context.exit_code;
}

// dauthd's control verbs (docs/control-protocol.md): one table, kControlVerbs in verbs.cpp, and one file per verb
// group like dauthctl's (daemon/dauthctl/). Each row names the verb, the role it needs, how many descriptors may
// come with it, and its run function: the verb file's argument parser, then its handler (parse_then_handle).
// The control socket's dispatch, the "unknown verb" list and the "no <role> role configured" refusal all come from
// this table; tests/daemon/test_control_verbs.cpp checks it against dauthctl and the documentation.
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "dauth/daemon/control_socket.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::daemon {

class Daemon;
class Roles;

// The role a verb needs: none (the daemon's own), any role, or one of them ([enrolee], [mef], [peer]).
enum class VerbRole { none, any, enrolee, mef, peer };
std::string_view to_string(VerbRole role) noexcept;

// What a handler works on: the Daemon (status, stats, reload) and its Roles (null when no role is configured;
// never null in a handler whose row needs a role).
struct VerbContext {
  Daemon& daemon;
  Roles* roles;
};

using VerbRun = Result<nlohmann::json> (*)(VerbContext& context, const ControlRequest& request);

struct ControlVerb {
  const char* name;
  VerbRole role;
  std::size_t max_fds;  // descriptors that may come with the request (SCM_RIGHTS): the key of *.add
  // Every name its "args" may have (docs/control-protocol.md's args column); any other is refused by the dispatch,
  // naming it, before the verb runs: a misspelt optional argument must not be ignored.
  std::vector<std::string_view> args;
  VerbRun run;
};

// Every verb, in the order of docs/control-protocol.md.
const std::vector<ControlVerb>& control_verbs();

// The table's dispatch: refuses a verb whose role is not configured and arguments the verb does not declare
// (docs/control-protocol.md), else runs it.
Result<nlohmann::json> run_control_verb(const ControlVerb& verb, VerbContext& context, const ControlRequest& request);

// A row's run function: Parse(request) -> Result<Args>, then Handle(context, Args) -> Result<json>.
template <auto Parse, auto Handle>
Result<nlohmann::json> parse_then_handle(VerbContext& context, const ControlRequest& request) {
  auto args = Parse(request);
  if (!args) return std::move(args).error();
  return Handle(context, std::move(args).value());
}

// ---- argument parsers shared by the verb files ----
struct NoArgs {};
Result<NoArgs> no_args(const ControlRequest& request);
// args.<name> as a non-empty string.
Result<std::string> text_arg(const ControlRequest& request, const char* name);
// The key named by args.key_fd: a descriptor sent with the request, read with the key-file rules. Key bytes never
// travel in JSON (docs/control-protocol.md "Passing keys").
Result<SecretBuffer> key_from_fd(const ControlRequest& request);
// The same for a key of min_bytes..max_bytes (the master key: exactly 32).
Result<SecretBuffer> key_from_fd(const ControlRequest& request, std::size_t min_bytes, std::size_t max_bytes);

// ---- the verbs' run functions, one file each group ----
Result<nlohmann::json> run_show(VerbContext&, const ControlRequest&);                // show.cpp
Result<nlohmann::json> run_status(VerbContext&, const ControlRequest&);              // status.cpp
Result<nlohmann::json> run_stats(VerbContext&, const ControlRequest&);               // stats.cpp
Result<nlohmann::json> run_reload(VerbContext&, const ControlRequest&);              // reload.cpp
Result<nlohmann::json> run_sessions(VerbContext&, const ControlRequest&);            // sessions.cpp
Result<nlohmann::json> run_peers(VerbContext&, const ControlRequest&);               // peers.cpp
Result<nlohmann::json> run_rpk_show(VerbContext&, const ControlRequest&);            // rpk.cpp
Result<nlohmann::json> run_rpk_list(VerbContext&, const ControlRequest&);            // rpk.cpp
Result<nlohmann::json> run_rpk_add(VerbContext&, const ControlRequest&);             // rpk.cpp
Result<nlohmann::json> run_rpk_remove(VerbContext&, const ControlRequest&);          // rpk.cpp
Result<nlohmann::json> run_credentials_list(VerbContext&, const ControlRequest&);    // credentials.cpp
Result<nlohmann::json> run_credentials_add(VerbContext&, const ControlRequest&);
Result<nlohmann::json> run_credentials_remove(VerbContext&, const ControlRequest&);
Result<nlohmann::json> run_enrolees_list(VerbContext&, const ControlRequest&);       // enrolees.cpp
Result<nlohmann::json> run_enrolees_add(VerbContext&, const ControlRequest&);
Result<nlohmann::json> run_enrolees_remove(VerbContext&, const ControlRequest&);
Result<nlohmann::json> run_enrol(VerbContext&, const ControlRequest&);               // enrol.cpp
Result<nlohmann::json> run_enrol_status(VerbContext&, const ControlRequest&);
Result<nlohmann::json> run_revoke(VerbContext&, const ControlRequest&);              // revoke.cpp
Result<nlohmann::json> run_rekey(VerbContext&, const ControlRequest&);   // rekey.cpp

}  // namespace dauth::daemon

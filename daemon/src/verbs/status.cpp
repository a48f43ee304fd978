// status: the daemon's state, version, roles, keys and reload outcome (dauthctl status).
#include "dauth/daemon/daemon.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {
Result<nlohmann::json> handle(VerbContext& context, NoArgs) { return context.daemon.status_json(); }
}  // namespace

Result<nlohmann::json> run_status(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, handle>(context, request);
}

}  // namespace dauth::daemon

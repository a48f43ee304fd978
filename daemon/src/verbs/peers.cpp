// peers: the configured remote AEs, their addresses and outcomes (Peer role).
#include "../roles.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {
Result<nlohmann::json> handle(VerbContext& context, NoArgs) { return context.roles->peers(); }
}  // namespace

Result<nlohmann::json> run_peers(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, handle>(context, request);
}

}  // namespace dauth::daemon

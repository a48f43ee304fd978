// sessions: the peer sessions dauthd saw carry proxied requests, and transport's live counts (Peer role).
#include "../roles.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {
Result<nlohmann::json> handle(VerbContext& context, NoArgs) { return context.roles->sessions(); }
}  // namespace

Result<nlohmann::json> run_sessions(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, handle>(context, request);
}

}  // namespace dauth::daemon

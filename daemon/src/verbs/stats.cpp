// stats: the daemon's and the roles' counters (dauthctl stats).
#include "dauth/daemon/daemon.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {
Result<nlohmann::json> handle(VerbContext& context, NoArgs) { return context.daemon.stats_json(); }
}  // namespace

Result<nlohmann::json> run_stats(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, handle>(context, request);
}

}  // namespace dauth::daemon

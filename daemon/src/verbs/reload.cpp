// reload: like SIGHUP; the status object on success, the reason on failure (dauthctl reload).
#include "dauth/daemon/daemon.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {
Result<nlohmann::json> handle(VerbContext& context, NoArgs) {
  if (auto outcome = context.daemon.reload(); !outcome) return std::move(outcome).error();
  return context.daemon.status_json();
}
}  // namespace

Result<nlohmann::json> run_reload(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, handle>(context, request);
}

}  // namespace dauth::daemon

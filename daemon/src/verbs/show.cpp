// show: one view of the state (dauthctl show, dump and --json): the daemon's status, then per local AE, remote AE
// and (MEF) enrolee their credentials, sessions and latest outcomes (Roles::show).
#include "../roles.hpp"
#include "../roles_impl.hpp"
#include "dauth/daemon/daemon.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {
Result<nlohmann::json> handle(VerbContext& context, NoArgs) {
  nlohmann::json out = context.roles ? context.roles->show()
                                     : nlohmann::json{{"local_aes", nlohmann::json::array()},
                                                      {"peers", nlohmann::json::array()},
                                                      {"enrolees", nullptr}};
  out["daemon"] = context.daemon.status_json();
  out["now"] = unix_now();  // the clock the "... ago" and "in ..." of the human form are computed against
  return out;
}
}  // namespace

Result<nlohmann::json> run_show(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, handle>(context, request);
}

}  // namespace dauth::daemon

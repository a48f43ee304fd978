// enrol and enrol.status: start an attempt of a configured local AE, and read its outcome (Enrolee role).
#include "../roles.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {
Result<std::string> parse_ae_id(const ControlRequest& request) { return text_arg(request, "ae_id"); }
Result<nlohmann::json> enrol(VerbContext& context, std::string ae_id) { return context.roles->enrol(ae_id); }
Result<nlohmann::json> status(VerbContext& context, std::string ae_id) {
  return context.roles->enrolment_status(ae_id);
}
}  // namespace

Result<nlohmann::json> run_enrol(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_ae_id, enrol>(context, request);
}

Result<nlohmann::json> run_enrol_status(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_ae_id, status>(context, request);
}

}  // namespace dauth::daemon

// revoke: a KeID or an issued certificate's serial, durably (MEF role).
#include "../roles.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {
Result<std::string> parse(const ControlRequest& request) { return text_arg(request, "id"); }
Result<nlohmann::json> handle(VerbContext& context, std::string id) { return context.roles->revoke(id); }
}  // namespace

Result<nlohmann::json> run_revoke(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse, handle>(context, request);
}

}  // namespace dauth::daemon

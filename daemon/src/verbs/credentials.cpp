// credentials.list, .add and .remove: the key store's credentials, and bootstrap keys added at run time for
// configured local AEs (docs/control-protocol.md "Run-time credentials").
#include "../roles.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {

Result<nlohmann::json> list(VerbContext& context, NoArgs) { return context.roles->credentials(); }

struct AddArgs {
  std::string kpm_id;
  std::string ae_id;
  SecretBuffer kpm;
};
Result<AddArgs> parse_add(const ControlRequest& request) {
  auto kpm_id = text_arg(request, "kpm_id");
  if (!kpm_id) return std::move(kpm_id).error();
  auto ae_id = text_arg(request, "ae_id");
  if (!ae_id) return std::move(ae_id).error();
  auto key = key_from_fd(request);
  if (!key) return std::move(key).error();
  return AddArgs{std::move(kpm_id).value(), std::move(ae_id).value(), std::move(key).value()};
}
Result<nlohmann::json> add(VerbContext& context, AddArgs args) {
  return context.roles->add_credential(args.kpm_id, args.ae_id, std::move(args.kpm));
}

Result<std::string> parse_remove(const ControlRequest& request) { return text_arg(request, "kpm_id"); }
Result<nlohmann::json> remove(VerbContext& context, std::string kpm_id) {
  return context.roles->remove_credential(kpm_id);
}

}  // namespace

Result<nlohmann::json> run_credentials_list(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, list>(context, request);
}

Result<nlohmann::json> run_credentials_add(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_add, add>(context, request);
}

Result<nlohmann::json> run_credentials_remove(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_remove, remove>(context, request);
}

}  // namespace dauth::daemon

// rpk.show, .list, .add and .remove: our raw public keys and the pinned peer keys (RFC 7250; docs/control-protocol.md
// "Raw public keys").
#include "../roles.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {

Result<nlohmann::json> show(VerbContext& context, NoArgs) { return context.roles->raw_keys(); }
Result<nlohmann::json> list(VerbContext& context, NoArgs) { return context.roles->pinned_keys(); }

struct AddArgs {
  std::string key;
  std::string ae_id;
};
Result<AddArgs> parse_add(const ControlRequest& request) {
  auto key = text_arg(request, "key");
  if (!key) return std::move(key).error();
  auto ae_id = text_arg(request, "ae_id");
  if (!ae_id) return std::move(ae_id).error();
  return AddArgs{std::move(key).value(), std::move(ae_id).value()};
}
Result<nlohmann::json> add(VerbContext& context, AddArgs args) { return context.roles->add_pin(args.key, args.ae_id); }

Result<std::string> parse_remove(const ControlRequest& request) { return text_arg(request, "key"); }
Result<nlohmann::json> remove(VerbContext& context, std::string key) { return context.roles->remove_pin(key); }

}  // namespace

Result<nlohmann::json> run_rpk_show(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, show>(context, request);
}

Result<nlohmann::json> run_rpk_list(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, list>(context, request);
}

Result<nlohmann::json> run_rpk_add(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_add, add>(context, request);
}

Result<nlohmann::json> run_rpk_remove(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_remove, remove>(context, request);
}

}  // namespace dauth::daemon

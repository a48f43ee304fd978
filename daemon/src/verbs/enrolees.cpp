// enrolees.list, .add and .remove: the MEF's enrolee table at run time (docs/control-protocol.md "Run-time
// credentials"). A row's rules are rspf's (rspf/enrolee_rules.hpp), the same as for a [[mef.enrolee]] row.
#include "../roles.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {

Result<nlohmann::json> list(VerbContext& context, NoArgs) { return context.roles->enrolees(); }

struct AddArgs {
  MefEnrolee row;
  SecretBuffer kpm;
};
Result<AddArgs> parse_add(const ControlRequest& request) {
  const auto& args = request.args;
  const auto bad = [](const std::string& why) { return make_error(Errc::invalid_argument, "enrolees.add: " + why); };
  AddArgs out;
  auto enrolee_id = text_arg(request, "enrolee_id");
  if (!enrolee_id) return std::move(enrolee_id).error();
  out.row.enrolee_id = std::move(enrolee_id).value();
  if (args.contains("rpk")) {
    auto id = text_arg(request, "rpk");
    if (!id) return std::move(id).error();
    if (args.contains("kpm_id") || args.contains("certificate_ae_id") || !request.fds.empty()) {
      return bad("a raw-key enrolee has no KpmID, no key and no certificate AE-ID");
    }
    out.row.rpk = std::move(id).value();
  } else if (args.contains("certificate_ae_id")) {
    auto id = text_arg(request, "certificate_ae_id");
    if (!id) return std::move(id).error();
    if (args.contains("kpm_id") || !request.fds.empty()) return bad("a certificate enrolee has no KpmID and no key");
    out.row.certificate_ae_id = std::move(id).value();
  } else {
    auto id = text_arg(request, "kpm_id");
    if (!id) return std::move(id).error();
    out.row.kpm_id = std::move(id).value();
    auto key = key_from_fd(request);
    if (!key) return std::move(key).error();
    out.kpm = std::move(key).value();
  }
  if (const auto targets = args.find("targets"); targets != args.end()) {
    if (!targets->is_array()) return bad("args.targets must be an array of AE-IDs");
    for (const auto& target : *targets) {
      if (!target.is_string()) return bad("args.targets must be an array of AE-IDs");
      out.row.targets.push_back(target.get<std::string>());
    }
  }
  if (const auto lifetime = args.find("lifetime"); lifetime != args.end()) {
    if (!lifetime->is_number_integer()) return bad("args.lifetime must be an integer (seconds)");
    out.row.lifetime = lifetime->get<std::int64_t>();
  }
  if (const auto offer = args.find("certificate_enrolment"); offer != args.end()) {
    if (!offer->is_boolean()) return bad("args.certificate_enrolment must be true or false");
    out.row.certificate_enrolment = offer->get<bool>();
  }
  return out;
}
Result<nlohmann::json> add(VerbContext& context, AddArgs args) {
  return context.roles->add_enrolee(args.row, std::move(args.kpm));
}

Result<std::string> parse_remove(const ControlRequest& request) { return text_arg(request, "id"); }
Result<nlohmann::json> remove(VerbContext& context, std::string id) { return context.roles->remove_enrolee(id); }

}  // namespace

Result<nlohmann::json> run_enrolees_list(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<no_args, list>(context, request);
}

Result<nlohmann::json> run_enrolees_add(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_add, add>(context, request);
}

Result<nlohmann::json> run_enrolees_remove(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_remove, remove>(context, request);
}

}  // namespace dauth::daemon

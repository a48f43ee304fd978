// The table of dauthd's control verbs and its dispatch (verbs.hpp); the verbs themselves are in one file per group.
#include "verbs.hpp"

#include <algorithm>

#include "../roles.hpp"
#include "../secret_file.hpp"
#include "dauth/crypto/identifiers.hpp"

namespace dauth::daemon {

std::string_view to_string(VerbRole role) noexcept {
  switch (role) {
    case VerbRole::none: return "none";
    case VerbRole::any: return "any";
    case VerbRole::enrolee: return "enrolee";
    case VerbRole::mef: return "mef";
    case VerbRole::peer: return "peer";
  }
  return "?";
}

const std::vector<ControlVerb>& control_verbs() {
  using R = VerbRole;
  static const std::vector<ControlVerb> table = {
      {"show", R::none, 0, {}, run_show},
      {"status", R::none, 0, {}, run_status},
      {"stats", R::none, 0, {}, run_stats},
      {"reload", R::none, 0, {}, run_reload},
      {"sessions", R::peer, 0, {}, run_sessions},
      {"peers", R::peer, 0, {}, run_peers},
      {"credentials.list", R::any, 0, {}, run_credentials_list},
      {"credentials.add", R::enrolee, 1, {"kpm_id", "ae_id", "key_fd"}, run_credentials_add},
      {"credentials.remove", R::enrolee, 0, {"kpm_id"}, run_credentials_remove},
      {"enrolees.list", R::mef, 0, {}, run_enrolees_list},
      {"enrolees.add", R::mef, 1,
       {"kpm_id", "key_fd", "enrolee_id", "targets", "lifetime", "certificate_enrolment", "certificate_ae_id", "rpk"},
       run_enrolees_add},
      {"enrolees.remove", R::mef, 0, {"id"}, run_enrolees_remove},
      {"rpk.show", R::any, 0, {}, run_rpk_show},
      {"rpk.list", R::peer, 0, {}, run_rpk_list},
      {"rpk.add", R::peer, 0, {"key", "ae_id"}, run_rpk_add},
      {"rpk.remove", R::peer, 0, {"key"}, run_rpk_remove},
      {"enrol", R::enrolee, 0, {"ae_id"}, run_enrol},
      {"enrol.status", R::enrolee, 0, {"ae_id"}, run_enrol_status},
      {"revoke", R::mef, 0, {"id"}, run_revoke},
      {"rekey", R::any, 1, {"key_fd"}, run_rekey},
  };
  return table;
}

Result<nlohmann::json> run_control_verb(const ControlVerb& verb, VerbContext& context, const ControlRequest& request) {
  const Roles* roles = context.roles;
  bool present = true;
  switch (verb.role) {
    case VerbRole::none: break;
    case VerbRole::any: present = roles != nullptr; break;
    case VerbRole::enrolee: present = roles && roles->has_enrolee(); break;
    case VerbRole::mef: present = roles && roles->has_mef(); break;
    case VerbRole::peer: present = roles && roles->has_peer(); break;
  }
  if (!present) {
    const std::string name = verb.name;
    if (verb.role == VerbRole::any) return make_error(Errc::unsupported, name + ": no role configured");
    const std::string role(to_string(verb.role));
    return make_error(Errc::unsupported, name + ": no " + role + " role configured ([" + role + "] section)");
  }
  std::string unknown;
  for (const auto& [name, value] : request.args.items()) {
    if (std::find(verb.args.begin(), verb.args.end(), name) == verb.args.end()) {
      unknown += (unknown.empty() ? "" : ", ") + crypto::quote_for_error(name);
    }
  }
  if (!unknown.empty()) {
    std::string takes;
    for (const auto name : verb.args) takes += (takes.empty() ? "" : ", ") + std::string(name);
    return make_error(Errc::invalid_argument, std::string(verb.name) + ": unknown argument(s) " + unknown +
                                                  "; it takes " + (takes.empty() ? "none" : takes));
  }
  return verb.run(context, request);
}

Result<NoArgs> no_args(const ControlRequest&) { return NoArgs{}; }

Result<std::string> text_arg(const ControlRequest& request, const char* name) {
  const auto it = request.args.find(name);
  if (it == request.args.end() || !it->is_string() || it->get<std::string>().empty()) {
    return make_error(Errc::invalid_argument, request.verb + ": args." + name + " must be a non-empty string");
  }
  return it->get<std::string>();
}

Result<SecretBuffer> key_from_fd(const ControlRequest& request) {
  return key_from_fd(request, detail::kMinKpmBytes, detail::kMaxKpmBytes);
}

// The server closes the descriptors after the handler.
Result<SecretBuffer> key_from_fd(const ControlRequest& request, std::size_t min_bytes, std::size_t max_bytes) {
  if (request.fds.empty()) {
    return make_error(Errc::invalid_argument,
                      request.verb + ": no file descriptor came with the request; the key travels as an open key "
                                     "file or pipe (SCM_RIGHTS) named by args.key_fd, never in JSON (dauthctl "
                                     "--psk-file FILE|- does this)");
  }
  const auto it = request.args.find("key_fd");
  if (it == request.args.end() || !it->is_number_unsigned() || it->get<std::uint64_t>() >= request.fds.size()) {
    return make_error(Errc::invalid_argument, request.verb + ": args.key_fd must be the index (0–" +
                                                  std::to_string(request.fds.size() - 1) +
                                                  ") of a file descriptor sent with the request");
  }
  const std::size_t index = it->get<std::size_t>();
  return detail::read_hex_key_fd(request.fds[index].get(), request.verb + ": key_fd " + std::to_string(index),
                                 min_bytes, max_bytes);
}

}  // namespace dauth::daemon

// dauthctl enrolees list|add|remove: the MEF's enrolee table at run time (MEF role). Rows added here live in the
// key store next to the configured [[mef.enrolee]] rows; each row belongs to one of the two (dauthctl(1)).
#include <iostream>

#include "client.hpp"
#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/daemon/exit_codes.hpp"
#include "key_source.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

struct EnroleeAddOptions {
  std::string kpm_id;
  std::string psk_file;
  std::string certificate_ae_id;
  std::string rpk;
  std::string enrolee_id;
  std::vector<std::string> targets;
  std::int64_t lifetime = 0;
  bool certificate_enrolment = false;
};

void print_enrolee(const nlohmann::json& row, std::ostream& out) {
  std::string targets;
  for (const auto& t : row.value("targets", nlohmann::json::array())) {
    targets += (targets.empty() ? "" : ",") + t.get<std::string>();
  }
  out << row.value("id", "?") << "  " << row.value("kind", "?") << "  enrolee=" << row.value("enrolee_id", "?")
      << "  targets=" << (targets.empty() ? "-" : targets) << "  lifetime=" << row.value("lifetime", 0LL) << "s"
      << (row.value("certificate_enrolment", false) ? "  certificate-enrolment" : "")
      << (row["fingerprint"].is_string() ? "  fingerprint=" + row["fingerprint"].get<std::string>() : "")
      << "  (" << row.value("origin", "?") << ")\n";
}

}  // namespace

CLI::App* add_enrolees(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("enrolees", "list, add or remove rows of the MEF's enrolee table (MEF role)");
  sub->require_subcommand(1);

  CLI::App* list = sub->add_subcommand("list", "list the enrolee table: identities and fingerprints, never keys");
  list->callback([&context] {
    context.exit_code = call(context, "enrolees.list", nlohmann::json::object(),
                             [](const nlohmann::json& r, std::ostream& out) {
                               const auto rows = r.value("enrolees", nlohmann::json::array());
                               if (rows.empty()) out << "no enrolees\n";
                               for (const auto& row : rows) print_enrolee(row, out);
                             });
  });

  static EnroleeAddOptions o;
  CLI::App* add = sub->add_subcommand(
      "add", "add an enrolee: a KpmID with its key, a device certificate's AE-ID or a raw public key id");
  auto* kpm_id = add->add_option("--kpm-id", o.kpm_id, "KpmID: <relative>@<this MEF's FQDN>");
  auto* psk_file = add->add_option("--psk-file", o.psk_file, "file holding Kpm as hex (mode 0600), or - for stdin");
  auto* certificate = add->add_option("--certificate-ae", o.certificate_ae_id,
                                      "AE-ID in the subjectAltName URI of the enrolee's device certificate");
  kpm_id->needs(psk_file);
  psk_file->needs(kpm_id);
  certificate->excludes(kpm_id)->excludes(psk_file);
  add->add_option("--rpk", o.rpk, "id of the enrolee's raw public key (ni:///sha-256;..., sha256:<hex> or "
                                  "pin-sha256:...)")
      ->excludes(kpm_id)
      ->excludes(psk_file)
      ->excludes(certificate);
  add->add_option("--enrolee", o.enrolee_id, "AE-ID the MEF assigns to the enrolee")->required();
  add->add_option("--target", o.targets, "an allowed Enrolment Target AE-ID (repeat for several)");
  add->add_option("--lifetime", o.lifetime, "enrolment lifetime in seconds (0: mef.enrolment_lifetime)")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{365} * 86400));
  add->add_flag("--certificate-enrolment", o.certificate_enrolment, "offer EST certificate enrolment");
  add->callback([&context] {
    using dauth::daemon::ExitCode;
    const auto usage = [&](const std::string& why) {
      std::cerr << "dauthctl: enrolees add: " << why << "\n";
      context.exit_code = as_int(ExitCode::usage);
    };
    if (int(!o.kpm_id.empty()) + int(!o.certificate_ae_id.empty()) + int(!o.rpk.empty()) != 1) {
      return usage("give --kpm-id with --psk-file, --certificate-ae or --rpk");
    }
    nlohmann::json args{{"enrolee_id", o.enrolee_id}, {"targets", o.targets}, {"lifetime", o.lifetime},
                        {"certificate_enrolment", o.certificate_enrolment}};
    if (auto r = dauth::crypto::validate_ae_id(o.enrolee_id); !r) return usage("--enrolee: " + r.error().message);
    for (const auto& t : o.targets) {
      if (auto r = dauth::crypto::validate_ae_id(t); !r) return usage("--target: " + r.error().message);
    }
    dauth::UniqueFd key;
    std::vector<int> fds;
    if (!o.kpm_id.empty()) {
      if (auto r = dauth::crypto::validate_kpm_id(o.kpm_id); !r) return usage("--kpm-id: " + r.error().message);
      if (const int rc = open_key_source(o.psk_file, "--psk-file", key); rc != 0) {
        context.exit_code = rc;
        return;
      }
      args["kpm_id"] = o.kpm_id;
      args["key_fd"] = 0;
      fds.push_back(key.get());
    } else if (!o.rpk.empty()) {
      auto key_id = dauth::crypto::canonical_public_key_id(o.rpk);
      if (!key_id) return usage("--rpk: " + key_id.error().message);
      args["rpk"] = *key_id;
    } else {
      if (auto r = dauth::crypto::validate_ae_id(o.certificate_ae_id); !r) {
        return usage("--certificate-ae: " + r.error().message);
      }
      args["certificate_ae_id"] = o.certificate_ae_id;
    }
    context.exit_code = call(
        context, "enrolees.add", args,
        [](const nlohmann::json& r, std::ostream& out) {
          out << "added ";
          print_enrolee(r, out);
        },
        fds);
  });

  static std::string remove_id;
  CLI::App* remove = sub->add_subcommand("remove", "remove an enrolee added with enrolees add");
  remove->add_option("id", remove_id,
                     "KpmID, cert:<AE-ID> for a certificate enrolee, rpk:<key id> for a raw-key enrolee")
      ->required();
  remove->callback([&context] {
    context.exit_code = call(context, "enrolees.remove", {{"id", remove_id}},
                             [](const nlohmann::json& r, std::ostream& out) {
                               out << "removed " << r.value("id", remove_id) << " (AE-ID " << r.value("enrolee_id", "?")
                                   << ")\n";
                             });
  });
  return sub;
}

}  // namespace dauthctl

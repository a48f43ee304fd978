// dauthctl credentials list|add|remove: the credentials in dauthd's key store (list: any role) and the bootstrap
// credentials of local AEs (add, remove: Enrolee role). Keys travel by file or stdin, never argv or environment
// (docs/conventions.md §8): add --psk-file FILE|- passes the open file, or a pipe holding the key, to dauthd
// (key_source.hpp).
#include <iostream>

#include "client.hpp"
#include "dauth/crypto/identifiers.hpp"
#include "dauth/daemon/exit_codes.hpp"
#include "key_source.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

struct CredentialAddOptions {
  std::string kpm_id;
  std::string ae_id;
  std::string psk_file;
};

int usage(const char* option, const dauth::Error& error) {
  std::cerr << "dauthctl: " << option << ": " << error.message << "\n";
  return as_int(dauth::daemon::ExitCode::usage);
}

}  // namespace

CLI::App* add_credentials(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("credentials", "list the key store's credentials; add or remove bootstrap "
                                                       "credentials of local AEs (Enrolee role)");
  sub->require_subcommand(1);

  CLI::App* list = sub->add_subcommand("list", "list credentials: identities and fingerprints, never keys");
  list->callback([&context] {
    context.exit_code = call(context, "credentials.list", nlohmann::json::object(),
                             [](const nlohmann::json& r, std::ostream& out) {
                               print_rows(r.value("credentials", nlohmann::json::array()), out, "no credentials");
                             });
  });

  static CredentialAddOptions add_options;
  CLI::App* add = sub->add_subcommand("add", "add a pre-provisioned key (Kpm) for a configured local AE; its next "
                                             "enrolment uses it");
  add->add_option("--kpm-id", add_options.kpm_id, "KpmID: <relative>@<MEF-FQDN>")->required();
  add->add_option("--ae", add_options.ae_id, "AE-ID of the local AE ([[enrolee.ae]])")->required();
  add->add_option("--psk-file", add_options.psk_file, "file holding Kpm as hex (mode 0600), or - for stdin")
      ->required();
  add->callback([&context] {
    if (auto r = dauth::crypto::validate_kpm_id(add_options.kpm_id); !r) {
      context.exit_code = usage("--kpm-id", r.error());
      return;
    }
    if (auto r = dauth::crypto::validate_ae_id(add_options.ae_id); !r) {
      context.exit_code = usage("--ae", r.error());
      return;
    }
    dauth::UniqueFd key;
    if (const int rc = open_key_source(add_options.psk_file, "--psk-file", key); rc != 0) {
      context.exit_code = rc;
      return;
    }
    context.exit_code = call(
        context, "credentials.add", {{"kpm_id", add_options.kpm_id}, {"ae_id", add_options.ae_id}, {"key_fd", 0}},
        [](const nlohmann::json& r, std::ostream& out) {
          out << "added " << r.value("kpm_id", "?") << " for " << r.value("ae_id", "?") << " (fingerprint "
              << r.value("fingerprint", "?") << ")";
          if (r.contains("replaced") && r["replaced"].is_string()) out << ", replacing " << r["replaced"].get<std::string>();
          out << "\n";
        },
        {key.get()});
  });

  static std::string remove_id;
  CLI::App* remove = sub->add_subcommand("remove", "remove a bootstrap credential added with credentials add");
  remove->add_option("kpm_id", remove_id, "KpmID of the credential")->required();
  remove->callback([&context] {
    context.exit_code = call(context, "credentials.remove", {{"kpm_id", remove_id}},
                             [](const nlohmann::json& r, std::ostream& out) {
                               out << "removed " << remove_id;
                               if (r.contains("now_uses") && r["now_uses"].is_string()) {
                                 out << "; " << r.value("ae_id", "?") << " bootstraps with "
                                     << r["now_uses"].get<std::string>() << " again";
                               }
                               out << "\n";
                             });
  });
  return sub;
}

}  // namespace dauthctl

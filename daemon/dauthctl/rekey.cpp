// dauthctl rekey --key-file FILE|-: dauthd re-seals its key store under a new master key (dauthd(8)
// MASTER KEY ROTATION). The key travels as an open file or pipe, never argv or environment (key_source.hpp); it
// must be a key dauthd tries at its next start (the configured next master key), which dauthd checks.
#include <iostream>

#include "client.hpp"
#include "dauth/crypto/keystore.hpp"
#include "key_source.hpp"
#include "verbs.hpp"

namespace dauthctl {

CLI::App* add_rekey(CLI::App& parent, Context& context) {
  static std::string key_file;
  CLI::App* sub = parent.add_subcommand(
      "rekey", "re-seal dauthd's key store under the next master key (daemon.master_key_next_credential or _file, "
               "loaded at dauthd's start); crash-safe");
  sub->add_option("--key-file", key_file, "file holding the new master key as 64 hex characters (mode 0600), or - "
                                          "for stdin")
      ->required();
  sub->callback([&context] {
    dauth::UniqueFd key;
    if (const int rc = open_key_source(key_file, "--key-file", key, dauth::crypto::kMasterKeySize,
                                       dauth::crypto::kMasterKeySize);
        rc != 0) {
      context.exit_code = rc;
      return;
    }
    context.exit_code = call(
        context, "rekey", {{"key_fd", 0}},
        [](const nlohmann::json& r, std::ostream& out) {
          const std::string which = r.value("key", "?");
          if (!r.value("rotated", false)) {
            out << "the key store is sealed under the " << which << " master key already (fingerprint "
                << r.value("fingerprint", "?") << "); nothing written\n";
            return;
          }
          out << "re-sealed " << r.value("records", 0) << " records under the " << which << " master key (fingerprint "
              << r.value("fingerprint", "?") << ") in " << r.value("milliseconds", 0) << " ms\n";
          if (which == "next") out << "now make it the current master key (dauthd(8) MASTER KEY ROTATION)\n";
        },
        {key.get()});
  });
  return sub;
}

}  // namespace dauthctl

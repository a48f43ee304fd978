// dauthctl credentials list|add|remove: bootstrap credentials of local AEs (Enrolee role).
// Keys travel by file or stdin, never argv or environment (STYLE.md §8): add --psk-file FILE|-.
#include <unistd.h>

#include <cerrno>
#include <iostream>

#include "client.hpp"
#include "dauth/crypto/identifiers.hpp"
#include "dauth/daemon/exit_codes.hpp"
#include "dauth/secret.hpp"
#include "secret_file.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

struct AddOptions {
  std::string kpm_id;
  std::string ae_id;
  std::string psk_file;
};

// Reads a Kpm (hex) from a file or stdin into guarded memory and checks it; the key itself is not sent in this
// build (see docs/control-protocol.md, credentials.add), only checked so that a bad file fails here, early. A file
// gets exactly dauthd's checks (secret_file.hpp: private enough, hex, 16–64 bytes); stdin (a pipe) only the content.
int check_psk(const std::string& source) {
  using dauth::daemon::ExitCode;
  constexpr std::size_t kMinKpm = 16;
  constexpr std::size_t kMaxKpm = 64;
  if (source != "-") {
    if (auto key = dauth::daemon::detail::read_hex_key_file(source, kMinKpm, kMaxKpm); !key) {
      std::cerr << "dauthctl: --psk-file: " << key.error().message << "\n";
      return as_int(ExitCode::usage);
    }
    return as_int(ExitCode::ok);
  }
  constexpr std::size_t kMaxText = kMaxKpm * 2 + 1;  // hex and a newline
  dauth::SecretBuffer text(kMaxText + 1);
  std::size_t length = 0;
  for (;;) {
    const ssize_t n = ::read(STDIN_FILENO, text.data() + length, text.size() - length);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    length += static_cast<std::size_t>(n);
    if (length == text.size()) break;
  }
  if (length > 0 && text.data()[length - 1] == '\n') --length;
  auto key = dauth::secret_from_hex(std::string_view(reinterpret_cast<const char*>(text.data()), length));
  if (!key || key->size() < kMinKpm || key->size() > kMaxKpm) {
    std::cerr << "dauthctl: --psk-file -: stdin must hold 16–64 bytes as hex (32–128 hex characters)\n";
    return as_int(ExitCode::usage);
  }
  return as_int(ExitCode::ok);
}

}  // namespace

CLI::App* add_credentials(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("credentials", "list, add or remove bootstrap credentials (Enrolee role)");
  sub->require_subcommand(1);

  CLI::App* list = sub->add_subcommand("list", "list credentials: identities and fingerprints, never keys");
  list->callback([&context] {
    context.exit_code = call(context, "credentials.list", nlohmann::json::object(),
                             [](const nlohmann::json& r, std::ostream& out) {
                               print_rows(r.value("credentials", nlohmann::json::array()), out, "no credentials");
                             });
  });

  static AddOptions add_options;
  CLI::App* add = sub->add_subcommand("add", "add a pre-provisioned key (Kpm) for a local AE");
  add->add_option("--kpm-id", add_options.kpm_id, "KpmID: <relative>@<MEF-FQDN>")->required();
  add->add_option("--ae", add_options.ae_id, "AE-ID of the local AE")->required();
  add->add_option("--psk-file", add_options.psk_file, "file holding Kpm as hex (mode 0600), or - for stdin")
      ->required();
  add->callback([&context] {
    if (auto r = dauth::crypto::validate_kpm_id(add_options.kpm_id); !r) {
      std::cerr << "dauthctl: --kpm-id: " << r.error().message << "\n";
      context.exit_code = as_int(dauth::daemon::ExitCode::usage);
      return;
    }
    if (auto r = dauth::crypto::validate_ae_id(add_options.ae_id); !r) {
      std::cerr << "dauthctl: --ae: " << r.error().message << "\n";
      context.exit_code = as_int(dauth::daemon::ExitCode::usage);
      return;
    }
    if (const int rc = check_psk(add_options.psk_file); rc != 0) {
      context.exit_code = rc;
      return;
    }
    context.exit_code = call(context, "credentials.add",
                             {{"kpm_id", add_options.kpm_id}, {"ae_id", add_options.ae_id}},
                             [](const nlohmann::json& r, std::ostream& out) {
                               out << "added " << r.value("kpm_id", "?") << "\n";
                             });
  });

  static std::string remove_id;
  CLI::App* remove = sub->add_subcommand("remove", "remove a credential by its KpmID");
  remove->add_option("kpm_id", remove_id, "KpmID of the credential")->required();
  remove->callback([&context] {
    context.exit_code = call(context, "credentials.remove", {{"kpm_id", remove_id}},
                             [](const nlohmann::json&, std::ostream& out) { out << "removed " << remove_id << "\n"; });
  });
  return sub;
}

}  // namespace dauthctl

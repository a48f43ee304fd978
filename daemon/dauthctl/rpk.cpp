// dauthctl rpk show|list|add|remove: our raw public keys (RFC 7250), to pin on the other side, and the peer keys
// pinned here at run time (peer role). Pins added here live in the key store next to the configured [[peer.rpk]]
// rows; each pin belongs to one of the two (dauthctl(1)).
#include <iostream>

#include "client.hpp"
#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/daemon/exit_codes.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

// The id in its three forms: RFC 6920 (what dauthd stores and logs), GnuTLS's "Public Key ID" sha256 (what
// gnutls-cli, certtool --pubkey-info and p11tool print) and the RFC 7469 pin; any of them is accepted back.
void print_key_forms(const nlohmann::json& row, std::ostream& out) {
  out << "  " << row.value("key", "?") << "\n  " << row.value("sha256", "?") << "\n  " << row.value("pin_sha256", "?")
      << "\n";
}

struct RpkAddOptions {
  std::string key;
  std::string ae_id;
};

}  // namespace

CLI::App* add_rpk(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("rpk", "show our raw public keys; list, add or remove pinned peer keys");
  sub->require_subcommand(1);

  CLI::App* show = sub->add_subcommand("show", "our raw public keys and their ids, to pin on the other side");
  show->callback([&context] {
    context.exit_code = call(context, "rpk.show", nlohmann::json::object(),
                             [](const nlohmann::json& r, std::ostream& out) {
                               const auto keys = r.value("raw_keys", nlohmann::json::array());
                               if (keys.empty()) out << "no raw keys (peer.raw_key, mef.raw_key, [[enrolee.ae]] raw_key)\n";
                               for (const auto& key : keys) {
                                 out << key.value("name", "?") << ": " << key.value("use", "?") << "\n";
                                 print_key_forms(key, out);
                               }
                             });
  });

  CLI::App* list = sub->add_subcommand("list", "list the pinned peer keys and the AE-IDs they authenticate");
  list->callback([&context] {
    context.exit_code = call(context, "rpk.list", nlohmann::json::object(),
                             [](const nlohmann::json& r, std::ostream& out) {
                               const auto pins = r.value("pins", nlohmann::json::array());
                               if (pins.empty()) out << "no pinned keys\n";
                               for (const auto& pin : pins) {
                                 out << pin.value("ae_id", "?") << " (" << pin.value("origin", "?") << ")\n";
                                 print_key_forms(pin, out);
                               }
                             });
  });

  static RpkAddOptions o;
  CLI::App* add = sub->add_subcommand("add", "pin a peer's raw public key to its AE-ID; its next handshake gets in");
  add->add_option("key", o.key, "the key's id: ni:///sha-256;..., sha256:<hex> or pin-sha256:...")->required();
  add->add_option("ae_id", o.ae_id, "the remote AE-ID a session with this key authenticates")->required();
  add->callback([&context] {
    using dauth::daemon::ExitCode;
    const auto usage = [&](const std::string& why) {
      std::cerr << "dauthctl: rpk add: " << why << "\n";
      context.exit_code = as_int(ExitCode::usage);
    };
    auto key = dauth::crypto::canonical_public_key_id(o.key);
    if (!key) return usage(key.error().message);
    if (auto r = dauth::crypto::validate_ae_id(o.ae_id); !r) return usage("AE-ID: " + r.error().message);
    context.exit_code = call(context, "rpk.add", {{"key", *key}, {"ae_id", o.ae_id}},
                             [](const nlohmann::json& r, std::ostream& out) {
                               out << (r.value("added", false) ? "pinned to " : "already pinned to ")
                                   << r.value("ae_id", "?") << "\n";
                               print_key_forms(r, out);
                             });
  });

  static std::string remove_key;
  CLI::App* remove = sub->add_subcommand(
      "remove", "unpin a key added with rpk add: its next handshake is refused and its live sessions close");
  remove->add_option("key", remove_key, "the key's id, in any of the forms rpk list prints")->required();
  remove->callback([&context] {
    context.exit_code = call(context, "rpk.remove", {{"key", remove_key}},
                             [](const nlohmann::json& r, std::ostream& out) {
                               out << "unpinned " << r.value("key", remove_key) << " (was " << r.value("ae_id", "?")
                                   << ")\n";
                             });
  });
  return sub;
}

}  // namespace dauthctl

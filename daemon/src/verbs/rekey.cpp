// rekey: re-seals the key store under a new master key passed by descriptor (dauthctl rekey,
// dauthd(8) MASTER KEY ROTATION). The one rule that makes a crash at any instant recoverable without guesswork: the
// new key must be one that the next start tries (the current or the next master key as configured now), because
// from the switch on only the new key opens the store (KeyStore::reseal).
#include <chrono>

#include "../roles.hpp"
#include "dauth/crypto/keystore.hpp"
#include "dauth/daemon/config.hpp"
#include "dauth/daemon/daemon.hpp"
#include "dauth/daemon/log.hpp"
#include "verbs.hpp"

namespace dauth::daemon {

namespace {

Result<SecretBuffer> parse_rotate(const ControlRequest& request) {
  return key_from_fd(request, crypto::kMasterKeySize, crypto::kMasterKeySize);
}

Result<nlohmann::json> rotate(VerbContext& context, SecretBuffer new_key) {
  const DaemonSettings& d = context.daemon.config().daemon;
  const bool credential = d.master_key_source == "credential";
  const std::string current_name = credential ? "daemon.master_key_credential \"" + d.master_key_credential + "\""
                                              : "daemon.master_key_file " + d.master_key_file.string();
  const std::string next_name = credential
                                    ? "daemon.master_key_next_credential \"" + d.master_key_next_credential + "\""
                                    : "daemon.master_key_next_file " + d.master_key_next_file.string();
  const std::string fingerprint = new_key.fingerprint();
  // Read again now: the keys as the next start will find them (a credential is what systemd passed at this start).
  auto next_start = load_master_keys(context.daemon.config());
  if (!next_start) {
    return make_error(next_start.error().code, "rekey: cannot read the keys dauthd tries at its next "
                                               "start: " + next_start.error().message);
  }
  const bool is_current = next_start->master_key().equals(new_key);
  const bool is_next = !next_start->next_master_key().empty() && next_start->next_master_key().equals(new_key);
  if (!is_current && !is_next) {
    std::string provision;
    if (credential) {
      provision = "seal it as credential \"" + d.master_key_next_credential + "\" (systemd-creds encrypt --name=" +
                  d.master_key_next_credential + "; the unit's LoadCredentialEncrypted=) and restart dauthd";
    } else if (d.master_key_next_file.empty()) {
      provision = "set daemon.master_key_next_file, write the key there (mode 0600) and restart dauthd";
    } else {
      provision = "write it to " + d.master_key_next_file.string() + " (mode 0600)";
    }
    return make_error(Errc::invalid_argument,
                      "rekey: the key (fingerprint " + fingerprint + ") is neither " + current_name +
                          " nor " + next_name + ": dauthd would not find it at its next start, and nothing else "
                          "would open the re-sealed store; " + provision + ", then rotate (dauthd(8) MASTER KEY "
                          "ROTATION)");
  }
  const char* which = is_current ? "current" : "next";
  crypto::KeyStore& store = context.roles->key_store();
  nlohmann::json reply = {{"fingerprint", fingerprint}, {"key", which}, {"records", store.size()}};
  if (store.sealed_with(new_key)) {
    reply["rotated"] = false;
    return reply;
  }
  const auto started = std::chrono::steady_clock::now();
  if (auto resealed = store.reseal(std::move(new_key)); !resealed) {
    return make_error(resealed.error().code,
                      "rekey: " + resealed.error().message +
                          "; the store is sealed under the old or the new key, and dauthd opens it with whichever "
                          "does at its next start (restart it)");
  }
  const auto took =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - started).count();
  reply["rotated"] = true;
  reply["milliseconds"] = took;
  log::notice("master key rotated: the key store (" + std::to_string(store.size()) + " records) is sealed under the " +
              which + " master key (" + (is_current ? current_name : next_name) + ", fingerprint " + fingerprint +
              ") in " + std::to_string(took) + " ms" +
              (is_next ? "; make it the current key (dauthd(8) MASTER KEY ROTATION)" : ""));
  return reply;
}

}  // namespace

Result<nlohmann::json> run_rekey(VerbContext& context, const ControlRequest& request) {
  return parse_then_handle<parse_rotate, rotate>(context, request);
}

}  // namespace dauth::daemon

// A throwaway SoftHSM2 token for one test: its own softhsm2.conf and token directory in a TempDir, initialised with
// the stock softhsm2-util (package softhsm2). Tests of PKCS#11 keys (crypto/'s Token, the daemon's pkcs11: URIs)
// use a real token made this way instead of the machine's; nothing outside the TempDir is touched.
//
// SoftHSM reads SOFTHSM2_CONF when a process initialises it (C_Initialize), so the constructor points
// SOFTHSM2_CONF at this token's configuration and the destructor restores the previous value; child processes
// started meanwhile (dauthd, gnutls-cli, p11tool) inherit it. One ThrowawayToken per process at a time: a module
// that stays initialised (GnuTLS keeps its PKCS#11 modules loaded until exit) keeps reading the first one's
// directory, so put every token a test needs in the same directory with add_token().
#pragma once

#include <filesystem>
#include <string>

#include "dauth/secret.hpp"
#include "support.hpp"

namespace dauth::test {

class ThrowawayToken {
 public:
  // Creates the directory, the configuration and a first token labelled `label`. Throws std::runtime_error with
  // softhsm2-util's output when the token cannot be made (softhsm2 missing: scripts/install-deps installs it).
  explicit ThrowawayToken(const std::string& label = "dauth-test");
  ~ThrowawayToken();
  ThrowawayToken(const ThrowawayToken&) = delete;
  ThrowawayToken& operator=(const ThrowawayToken&) = delete;

  // SoftHSM2's PKCS#11 module (Debian path); p11-kit also lists it among its registered modules.
  static std::string module_path();

  const std::string& label() const { return label_; }
  // The user PIN and security officer PIN of every token made here. Test values, not secrets: softhsm2-util only
  // takes them on its command line.
  const std::string& pin() const { return pin_; }
  const std::string& so_pin() const { return so_pin_; }
  SecretBuffer pin_buffer() const { return SecretBuffer::copy_of(ByteView::of(pin_)); }
  const std::filesystem::path& config_path() const { return config_path_; }
  const std::filesystem::path& token_directory() const { return token_directory_; }
  const std::filesystem::path& directory() const { return directory_.path(); }

  // RFC 7512 URI of an object of the first token: "pkcs11:token=<label>;object=<object>" (label and object are
  // written percent-encoded where RFC 7512 requires it).
  std::string uri(const std::string& object) const;
  // The same, with the object's kind: type=private (what GnuTLS and p11tool want for a private key).
  std::string private_key_uri(const std::string& object) const;

  // A second (third...) token in the same SoftHSM directory, with the same PINs.
  void add_token(const std::string& label);
  // Imports a PEM private key (SEC1 "EC PRIVATE KEY" or PKCS#8) into the first token as a private key object
  // with label `object` and CKA_ID id_hex (e.g. "01"), with softhsm2-util --import (through a PKCS#8 copy made
  // by openssl and removed again). Returns private_key_uri(object).
  std::string import_private_key(const std::filesystem::path& pem_file, const std::string& object,
                                 const std::string& id_hex);
  // Runs a command with this token's configuration (it is in the environment anyway); throws if it fails.
  CommandResult run(const std::vector<std::string>& argv) const;

 private:
  TempDir directory_;
  std::filesystem::path config_path_;
  std::filesystem::path token_directory_;
  std::string label_;
  std::string pin_ = "1234-test-pin";
  std::string so_pin_ = "5678-test-so-pin";
  bool had_previous_conf_ = false;
  std::string previous_conf_;
};

// Percent-encodes a value for an RFC 7512 path attribute (everything but unreserved characters and ":[]@!$'()*+,=&").
std::string pkcs11_uri_escape(const std::string& value);

}  // namespace dauth::test

#include "softhsm_token.hpp"

#include <cctype>
#include <cstdlib>
#include <stdexcept>

namespace dauth::test {

namespace {
// Debian's softhsm2 package; p11-kit registers it (/usr/share/p11-kit/modules/softhsm2.module).
constexpr const char* kSoftHsmModule = "/usr/lib/softhsm/libsofthsm2.so";
}  // namespace

std::string pkcs11_uri_escape(const std::string& value) {
  // RFC 7512 §2.3: pk11-pchar = unreserved / pk11-res-avail / pct-encoded.
  static const std::string kAllowed = ":[]@!$'()*+,=&-._~";
  std::string out;
  for (char c : value) {
    const auto u = static_cast<unsigned char>(c);
    if (std::isalnum(u) != 0 || kAllowed.find(c) != std::string::npos) {
      out.push_back(c);
    } else {
      static const char* kHex = "0123456789ABCDEF";
      out += '%';
      out += kHex[u >> 4];
      out += kHex[u & 0xF];
    }
  }
  return out;
}

ThrowawayToken::ThrowawayToken(const std::string& label) : label_(label) {
  token_directory_ = directory_.path() / "tokens";
  std::filesystem::create_directory(token_directory_);
  config_path_ = directory_.path() / "softhsm2.conf";
  write_file(config_path_,
             "directories.tokendir = " + token_directory_.string() +
                 "\n"
                 "objectstore.backend = file\n"
                 "log.level = ERROR\n"
                 "slots.removable = false\n",
             0600);
  if (const char* previous = std::getenv("SOFTHSM2_CONF")) {
    had_previous_conf_ = true;
    previous_conf_ = previous;
  }
  ::setenv("SOFTHSM2_CONF", config_path_.c_str(), 1);
  add_token(label);
}

ThrowawayToken::~ThrowawayToken() {
  if (had_previous_conf_) {
    ::setenv("SOFTHSM2_CONF", previous_conf_.c_str(), 1);
  } else {
    ::unsetenv("SOFTHSM2_CONF");
  }
}

std::string ThrowawayToken::module_path() { return kSoftHsmModule; }

std::string ThrowawayToken::uri(const std::string& object) const {
  return "pkcs11:token=" + pkcs11_uri_escape(label_) + ";object=" + pkcs11_uri_escape(object);
}

std::string ThrowawayToken::private_key_uri(const std::string& object) const { return uri(object) + ";type=private"; }

CommandResult ThrowawayToken::run(const std::vector<std::string>& argv) const {
  CommandResult result = run_command(argv);
  if (result.exit_code != 0) {
    std::string command;
    for (const auto& arg : argv) command += (command.empty() ? "" : " ") + arg;
    throw std::runtime_error("throwaway token: '" + command + "' exited " + std::to_string(result.exit_code) +
                             ": " + result.output);
  }
  return result;
}

void ThrowawayToken::add_token(const std::string& label) {
  if (!have_program("softhsm2-util")) {
    throw std::runtime_error("throwaway token: softhsm2-util not on PATH (package softhsm2, scripts/install-deps)");
  }
  run({"softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", so_pin_, "--pin", pin_});
}

std::string ThrowawayToken::import_private_key(const std::filesystem::path& pem_file, const std::string& object,
                                               const std::string& id_hex) {
  // softhsm2-util --import reads PKCS#8 only: convert with the stock openssl first.
  const std::filesystem::path pkcs8 = directory_.path() / (object + ".pkcs8.pem");
  run({"openssl", "pkcs8", "-topk8", "-nocrypt", "-in", pem_file.string(), "-out", pkcs8.string()});
  run({"softhsm2-util", "--import", pkcs8.string(), "--token", label_, "--label", object, "--id", id_hex, "--pin",
       pin_});
  std::filesystem::remove(pkcs8);
  return private_key_uri(object);
}

}  // namespace dauth::test

// End to end with private keys in a PKCS#11 token (a throwaway SoftHSM2 token made by the test): the demo's
// deployment with the MEF's server key in the token (the certificate RSPF signs with it); no byte of that key in any
// log or state file; a wrong PIN, a missing token and a missing key stop dauthd at start and fail a reload, with
// the config key, the URI and the reason, never the PIN.
#include <signal.h>

#include <catch2/catch.hpp>
#include <cctype>
#include <regex>

#include "dauth/transport/transport.hpp"
#include "e2e_support.hpp"
#include "softhsm_token.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

// The private scalar of a PEM key as lower-case hex (openssl's own reading of it), to look for in files.
std::string private_scalar_hex(const std::filesystem::path& key) {
  const auto text = run_command({"openssl", "pkey", "-in", key.string(), "-noout", "-text"}).output;
  const auto start = text.find("priv:");
  const auto end = text.find("pub:");
  REQUIRE(start != std::string::npos);
  REQUIRE(end != std::string::npos);
  std::string hex;
  for (char c : text.substr(start + 5, end - start - 5)) {
    if (std::isxdigit(static_cast<unsigned char>(c))) hex += c;
  }
  if (hex.size() > 64 && hex.compare(0, 2, "00") == 0) hex.erase(0, 2);  // openssl's sign byte
  REQUIRE(hex.size() == 64);
  return hex;
}

std::string bytes_of_hex(const std::string& hex) {
  std::string bytes;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) bytes += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return bytes;
}

// Every regular file under dir, whole.
std::string all_files_under(const std::filesystem::path& dir) {
  std::string all;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) all += read_text_file(entry.path());
  }
  return all;
}

// The MEF of the demo with its server key moved into the token: the PEM file is gone, the config names the key by
// URI and the PIN comes from daemon.pkcs11_pin_file.
struct TokenMef {
  explicit TokenMef(Deployment& deployment) : d(deployment) {
    const auto key_file = d.dir() / "mef" / "mef.key";
    scalar_hex = private_scalar_hex(key_file);
    uri = token.import_private_key(key_file, "mef-server", "01");
    std::filesystem::remove(key_file);
    write_pin(token.pin());
    d.insert_config_line("mef", "[daemon]", "pkcs11_pin_file = \"" + pin_file.string() + "\"");
    use_key(uri);
  }
  void write_pin(const std::string& pin) const { write_file(pin_file, pin + "\n", 0600); }
  void use_key(const std::string& key_uri) const {
    d.edit_config("mef", [&](std::string text) {
      // The one private_key_file of the MEF's config is [mef]'s.
      return std::regex_replace(text, std::regex("private_key_file = \"[^\"]*\""),
                                "private_key_file = \"" + key_uri + "\"");
    });
  }
  std::filesystem::path config() const { return d.dir() / "mef.toml"; }

  Deployment& d;
  ThrowawayToken token;
  std::filesystem::path pin_file = d.dir() / "mef" / "token.pin";
  std::string uri;
  std::string scalar_hex;
};

}  // namespace

TEST_CASE("token keys: the MEF's server key in a SoftHSM token serves the certificate RSPF and never leaves it",
          "[e2e][pkcs11]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  if (transport::compiled_backend() != transport::Backend::gnutls) {
    WARN("keys in a PKCS#11 token need the GnuTLS build; skipped");
    return;
  }
  Deployment d;
  TokenMef mef(d);
  // valve enrols with the certificate RSPF: its DTLS handshake with the MEF is signed by the token.
  start_all(d);
  const auto marker = put_marker(d);
  const auto get = d.proxied("CAE-meter", "get", "example_data");
  INFO(get.output);
  CHECK(get.exit_code == 0);
  CHECK(get.output.find(marker) != std::string::npos);

  d.stop("mef", SIGTERM);
  d.stop("a", SIGTERM);
  d.stop("b", SIGTERM);
  const std::string logs = d.all_logs();
  CHECK(logs.find(mef.uri) != std::string::npos);  // the key is named where it is used
  CHECK(logs.find(mef.token.pin()) == std::string::npos);
  const std::string files = all_files_under(d.dir() / "mef") + all_files_under(d.dir() / "a") +
                            all_files_under(d.dir() / "b") + logs;
  CHECK(files.find(mef.scalar_hex) == std::string::npos);
  CHECK(files.find(bytes_of_hex(mef.scalar_hex)) == std::string::npos);
}

TEST_CASE("token keys: a wrong PIN a missing token and a missing key stop dauthd at start and fail a reload",
          "[e2e][pkcs11]") {
  if (transport::compiled_backend() != transport::Backend::gnutls) {
    WARN("keys in a PKCS#11 token need the GnuTLS build; skipped");
    return;
  }
  Deployment d;
  TokenMef mef(d);
  const std::string wrong_pin = "4321-wrong-pin";
  const auto start_fails_with = [&](const std::string& reason) {
    const auto run = run_command({DAUTHD_PATH, "--config", mef.config().string()});
    INFO(run.output);
    CHECK(run.exit_code != 0);
    CHECK_THAT(run.output, Catch::Contains("mef.private_key_file") && Catch::Contains(reason));
    CHECK(run.output.find(wrong_pin) == std::string::npos);
    CHECK(run.output.find(mef.token.pin()) == std::string::npos);
  };

  mef.write_pin(wrong_pin);
  start_fails_with("token key '" + mef.uri + "': the token refused the PIN");
  mef.write_pin(mef.token.pin());
  mef.use_key("pkcs11:token=no-such-token;object=mef-server;type=private");
  start_fails_with("'pkcs11:token=no-such-token;object=mef-server;type=private': no token matches it");
  mef.use_key(mef.token.private_key_uri("no-such-key"));
  start_fails_with("no such private key in the token");

  // Running: a reload loads the token keys again and is refused, the running configuration kept.
  mef.use_key(mef.uri);
  d.start("mef");
  const auto reload_error = [&]() {
    const auto reply = control_exchange(d.dir() / "mef" / "control", "{\"verb\":\"reload\",\"args\":{}}\n");
    INFO(reply);
    const auto parsed = nlohmann::json::parse(reply);
    CHECK(parsed["ok"] == false);
    return parsed.value("error", std::string());
  };
  mef.use_key("pkcs11:token=no-such-token;object=mef-server;type=private");
  CHECK_THAT(reload_error(), Catch::Contains("mef.private_key_file: token key 'pkcs11:token=no-such-token;"
                                              "object=mef-server;type=private': no token matches it"));
  mef.use_key(mef.token.private_key_uri("no-such-key"));
  CHECK_THAT(reload_error(), Catch::Contains("no such private key in the token"));
  CHECK(d.ctl_json("mef", {"status"})["reload_failures"] == 2);
  // A new PIN: the process is logged in to the token since its start, so only a restart (or --check-config, a
  // process of its own) can try it; the reload names it as waiting for the restart.
  mef.use_key(mef.uri);
  mef.write_pin(wrong_pin);
  const auto reloaded = d.verb("mef", "reload", nlohmann::json::object());
  CHECK(reloaded["last_reload"]["ok"] == true);
  CHECK(reloaded["restart_pending"] == nlohmann::json::array({"daemon.pkcs11_pin_file (a new PIN)"}));
  const auto check = run_command({DAUTHD_PATH, "--check-config", "--config", mef.config().string()});
  INFO(check.output);
  CHECK(check.exit_code != 0);
  CHECK_THAT(check.output, Catch::Contains("the token refused the PIN"));
  CHECK(check.output.find(wrong_pin) == std::string::npos);
  d.stop("mef", SIGTERM);
  const std::string logs = d.all_logs();
  CHECK(logs.find(wrong_pin) == std::string::npos);
  CHECK(logs.find(mef.token.pin()) == std::string::npos);
}

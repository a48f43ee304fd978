// End to end with private keys in a PKCS#11 token (a throwaway SoftHSM2 token made by the test): the demo's
// deployment with every private key in the token (the MEF's server and issuing CA keys, valve's device certificate
// key, the key of its EST-issued AE-ID certificate generated there); no byte of those keys in any log or state file; a wrong PIN, a missing token and a missing key stop dauthd at start and fail a reload, with
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

TEST_CASE("token keys: the demo with every private key in a SoftHSM token and none of their bytes in any file",
          "[e2e][pkcs11]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  if (transport::compiled_backend() != transport::Backend::gnutls) {
    WARN("keys in a PKCS#11 token need the GnuTLS build; skipped");
    return;
  }
  Deployment d;
  // The MEF's server key (certificate RSPF handshakes) and its issuing CA key (EST) in the token.
  TokenMef mef(d);
  const auto ca_key = d.dir() / "mef" / "ca.key";
  const std::string ca_scalar = private_scalar_hex(ca_key);
  const std::string ca_uri = mef.token.import_private_key(ca_key, "mef-ca", "02");
  std::filesystem::remove(ca_key);
  d.edit_config("mef", [&](std::string text) {
    return std::regex_replace(text, std::regex("issuing_ca_key = \"[^\"]*\""), "issuing_ca_key = \"" + ca_uri + "\"");
  });
  // Gateway B: valve's device certificate key (its bootstrap handshake with the MEF) in the token, and the key of
  // the AE-ID certificate it gets over EST generated there (it then presents that certificate to peers).
  const auto valve_key = d.dir() / "b" / "valve.key";
  const std::string valve_scalar = private_scalar_hex(valve_key);
  const std::string valve_uri = mef.token.import_private_key(valve_key, "valve-device", "03");
  std::filesystem::remove(valve_key);
  const std::string est_uri = mef.token.uri("valve-est");
  d.insert_config_line("b", "[daemon]", "pkcs11_pin_file = \"" + mef.pin_file.string() + "\"");
  d.edit_config("b", [&](std::string text) {
    text = std::regex_replace(text, std::regex("private_key_file = \"[^\"]*\""),
                              "private_key_file = \"" + valve_uri + "\"");
    return std::regex_replace(text, std::regex("certificate_enrolment = true\n"),
                              "certificate_enrolment = true\ncertificate_key = \"" + est_uri + "\"\n");
  });

  // Certificate peer sessions (as start_with_certificate_peer_sessions, with meter's EST key in the token too):
  // A presents meter's AE-ID certificate as a client, B valve's as a server, both signing in the token.
  const std::string mef_ca = (d.dir() / "mef" / "ca.pem").string();
  d.edit_config("mef", [](std::string text) {
    return std::regex_replace(text, std::regex("enrolee_id = \"CAE-meter\"\n"),
                              "enrolee_id = \"CAE-meter\"\ncertificate_enrolment = true\n");
  });
  d.insert_config_line("a", "[daemon]", "pkcs11_pin_file = \"" + mef.pin_file.string() + "\"");
  d.edit_config("a", [&](std::string text) {
    text = std::regex_replace(text, std::regex("kpm_file = \"([^\"]*)/meter.kpm\"\n"),
                              "kpm_file = \"$1/meter.kpm\"\ncertificate_enrolment = true\ncertificate_key = \"" +
                                  mef.token.uri("meter-est") + "\"\n");
    text = std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\ntrust_anchors = [\"" + mef_ca + "\"]\n");
    return std::regex_replace(text, std::regex("(ae_id = \"CAE-valve\"\naddress = \"[^\"]*\"\n)"),
                              "$1credential = \"certificate\"\n");
  });
  d.edit_config("b", [&](std::string text) {
    return std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\ntrust_anchors = [\"" + mef_ca + "\"]\n");
  });
  start_all(d);
  d.stop("b", SIGTERM);
  d.start("b");  // presents valve's AE-ID certificate, issued after its first start
  REQUIRE(d.wait_enrolled("b", "CAE-valve"));
  // valve's certificate came over EST, signed by the CA key in the token, for the key generated there.
  const auto show = d.ctl("b", {"show"});
  INFO(show.output);
  const auto marker = put_marker(d);
  const auto get = d.proxied("CAE-meter", "get", "example_data");
  INFO(get.output);
  CHECK(get.exit_code == 0);
  CHECK(get.output.find(marker) != std::string::npos);
  // The token holds the generated key, not extractable (p11tool lists it as a private key, sensitive).
  const auto listed = mef.token.run({"p11tool", "--login", "--set-pin=" + mef.token.pin(), "--list-privkeys",
                                     "pkcs11:token=" + mef.token.label()});
  CHECK_THAT(listed.output, Catch::Contains("valve-est") && Catch::Contains("meter-est") &&
                                Catch::Contains("CKA_SENSITIVE"));
  // The proxied request went over an X.509 peer session: A's client and B's server keys are the EST keys above.
  bool certificate_session = false;
  const auto sessions_b = d.ctl_json("b", {"sessions"});
  INFO(sessions_b.dump());
  for (const auto& session : sessions_b["sessions"]) {
    certificate_session |= session.value("peer_ae_id", "") == "CAE-meter" && session.value("kind", "") == "x509";
  }
  CHECK(certificate_session);

  d.stop("a", SIGTERM);
  d.stop("b", SIGTERM);
  d.stop("mef", SIGTERM);
  const std::string logs = d.all_logs();
  CHECK(logs.find(mef.token.pin()) == std::string::npos);
  const std::string files = all_files_under(d.dir() / "mef") + all_files_under(d.dir() / "a") +
                            all_files_under(d.dir() / "b") + logs;
  for (const std::string& scalar : {mef.scalar_hex, ca_scalar, valve_scalar}) {
    CHECK(files.find(scalar) == std::string::npos);
    CHECK(files.find(bytes_of_hex(scalar)) == std::string::npos);
  }
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

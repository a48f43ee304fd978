// dauthd.toml: the configuration table, its error messages (file:line:column, value, what is allowed), the
// cross-field rules, key-file loading, and agreement between the table, the man page and the example config.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "dauth/daemon/config.hpp"
#include "dauth/transport/address.hpp"
#include "dauth/transport/transport.hpp"
#include "roles.hpp"
#include "support.hpp"

using dauth::Errc;
using dauth::daemon::Config;
using dauth::daemon::config_schema;
using dauth::daemon::config_sections;
using dauth::daemon::load_secrets;
using dauth::daemon::parse_config;

namespace {

// Two Kpm-free roles need no key files; the master key comes from a file in every test.
const char* kMinimal = R"([daemon]
master_key_source = "file"
master_key_file = "/nonexistent/master.key"
)";

std::string error_of(const std::string& text) {
  auto config = parse_config(text, "t.toml");
  REQUIRE_FALSE(config.ok());
  return config.error().message;
}

std::string full_config(const std::string& key_dir) {
  return std::string(kMinimal) + R"(
[enrolee]
mef_address = "mef.example.net:5685"
mef_fqdn = "mef.example.net"
mef_trust_anchor = "/etc/dauth/mef-ca.pem"

[[enrolee.ae]]
id = "CAE-meter"
endpoint = "127.0.0.1:6001"
kpm_id = "meter01@mef.example.net"
kpm_file = ")" + key_dir + R"(/meter.kpm"

[[enrolee.ae]]
id = "CAE-valve"
certificate_file = "/etc/dauth/valve.crt"
private_key_file = "/etc/dauth/valve.key"

[mef]
fqdn = "mef.example.net"
session_key_lifetime = 3600
certificate_file = "/etc/dauth/mef.crt"
private_key_file = "/etc/dauth/mef.key"
device_ca = "/etc/dauth/device-ca.pem"

[[mef.enrolee]]
kpm_id = "meter01@mef.example.net"
kpm_file = ")" + key_dir + R"(/meter.kpm"
enrolee_id = "CAE-meter"
targets = ["CAE-valve"]

[[mef.enrolee]]
certificate_ae_id = "CAE-valve"
enrolee_id = "CAE-valve"
targets = ["CAE-meter"]

[peer]
idle_timeout = 120

[[peer.address]]
ae_id = "CAE-remote"
address = "[::1]:5684"

[[peer.policy]]
peer = "CAE-remote"
local_aes = ["CAE-meter"]
methods = ["GET", "PUT"]
)";
}

}  // namespace

TEST_CASE("a minimal configuration gets the documented defaults and no roles", "[config]") {
  auto config = parse_config(kMinimal, "t.toml");
  REQUIRE(config.ok());
  CHECK(config->daemon.state_directory == "/var/lib/dauth");
  CHECK(config->daemon.control_socket == "/run/dauth/control");
  CHECK(config->daemon.master_key_source == "file");
  CHECK(config->daemon.log_level == dauth::daemon::log::Level::info);
  CHECK_FALSE(config->enrolee.has_value());
  CHECK_FALSE(config->mef.has_value());
  CHECK_FALSE(config->peer.has_value());
  CHECK(config->roles() == "none");
  // An empty file is a valid configuration too: [daemon] has a default for everything.
  auto empty = parse_config("", "empty.toml");
  REQUIRE(empty.ok());
  CHECK(empty->daemon.master_key_source == "credential");
}

TEST_CASE("all three roles parse into the typed view", "[config]") {
  auto config = parse_config(full_config("/keys"), "t.toml");
  INFO((config.ok() ? std::string() : config.error().message));
  REQUIRE(config.ok());
  REQUIRE(config->enrolee.has_value());
  REQUIRE(config->enrolee->aes.size() == 2);
  CHECK(config->enrolee->aes[0].kpm_id == "meter01@mef.example.net");
  CHECK(config->enrolee->aes[1].certificate_file == "/etc/dauth/valve.crt");
  CHECK(config->enrolee->local_listen == "127.0.0.1:5683");
  REQUIRE(config->mef.has_value());
  CHECK(config->enrolee->mef_trust_anchor == "/etc/dauth/mef-ca.pem");
  REQUIRE(config->mef->enrolees.size() == 2);
  // lifetime 0 means mef.enrolment_lifetime, whose default is 30 days.
  CHECK(config->mef->enrolees[0].lifetime == 2592000);
  CHECK(config->mef->enrolees[0].targets == std::vector<std::string>{"CAE-valve"});
  CHECK(config->mef->enrolees[0].certificate_ae_id.empty());
  // A device-certificate enrolee: no KpmID, the AE-ID its certificate carries.
  CHECK(config->mef->enrolees[1].kpm_id.empty());
  CHECK(config->mef->enrolees[1].certificate_ae_id == "CAE-valve");
  CHECK(config->mef->enrolees[1].enrolee_id == "CAE-valve");
  CHECK(config->mef->device_ca == "/etc/dauth/device-ca.pem");
  REQUIRE(config->peer.has_value());
  CHECK(config->peer->idle_timeout == 120);
  CHECK(config->peer->max_outgoing_sessions == 256);
  REQUIRE(config->peer->policy.size() == 1);
  CHECK(config->peer->policy[0].methods == std::vector<std::string>{"GET", "PUT"});
  CHECK(config->roles() == "enrolee,mef,peer");
}

TEST_CASE("an unknown key is an error with file:line:column and the allowed keys", "[config]") {
  const auto message = error_of("[daemon]\nstate_directory = \"/x\"\nlog_levl = \"debug\"\n");
  CHECK_THAT(message, Catch::StartsWith("t.toml:3:1: daemon.log_levl: unknown key; allowed in [daemon]: "));
  CHECK_THAT(message, Catch::Contains("log_level"));
  CHECK_THAT(error_of("[deamon]\n"), Catch::StartsWith("t.toml:1:2: deamon: unknown section"));
  CHECK_THAT(error_of("[peer]\n[[peer.policy]]\npeer = \"*\"\nlocal_aes = [\"a\"]\nmethod = [\"GET\"]\n"),
             Catch::Contains("t.toml:5:1: peer.policy[0].method: unknown key; allowed in [[peer.policy]]"));
}

TEST_CASE("a value of the wrong type names the type expected", "[config]") {
  CHECK(error_of("[peer]\nidle_timeout = \"300\"\n") ==
        "t.toml:2:16: peer.idle_timeout = \"300\": must be an integer (1–86400 seconds)");
  CHECK(error_of("[peer]\nlegacy_onem2m_options = 1\n") ==
        "t.toml:2:25: peer.legacy_onem2m_options = 1: must be a boolean (true or false)");
  CHECK_THAT(error_of("[enrolee]\nmef_fqdn = \"m.example\"\nmef_address = \"m:1\"\n[enrolee.ae]\nid = \"x\"\n"),
             Catch::Contains("t.toml:4:10: enrolee.ae: must be an array of tables: write [[enrolee.ae]]"));
}

TEST_CASE("private key keys take an absolute path or a pkcs11: URI without a PIN", "[config][pkcs11]") {
  const std::string mef = std::string(kMinimal) +
                          "[mef]\nfqdn = \"mef.example.net\"\ncertificate_file = \"/etc/dauth/mef.crt\"\n";
  const std::string uri = "pkcs11:token=dauth;object=mef%20server;type=private";
  auto config = parse_config(mef + "private_key_file = \"" + uri + "\"\n", "t.toml");
  REQUIRE(config.ok());
  CHECK(config->mef->private_key_file.string() == uri);
  CHECK(error_of(mef + "private_key_file = \"mef.key\"\n") ==
        "t.toml:7:20: mef.private_key_file = \"mef.key\": must be an absolute path or a pkcs11: URI (RFC 7512)");
  // The PIN comes from daemon.pkcs11_pin_file or the credential, never from the URI (it is logged), and the
  // refusal does not quote it.
  const std::string with_pin = error_of(mef + "private_key_file = \"" + uri + "?pin-value=1234\"\n");
  CHECK_THAT(with_pin, Catch::Contains("carries no PIN"));
  CHECK(with_pin.find("1234") == std::string::npos);
  CHECK_THAT(error_of(mef + "private_key_file = \"pkcs11:token=dauth;object=mef;type=cert\"\n"),
             Catch::Contains("type= names no private key"));
  // A path-only key (a certificate) does not take a URI.
  CHECK_THAT(error_of(std::string(kMinimal) + "[mef]\nfqdn = \"mef.example.net\"\ncertificate_file = \"" + uri +
                      "\"\nprivate_key_file = \"/k\"\n"),
             Catch::Contains("mef.certificate_file") && Catch::Contains("must be an absolute path"));
}

TEST_CASE("a value out of range says what is allowed", "[config]") {
  CHECK(error_of("[peer]\nidle_timeout = 0\n") == "t.toml:2:16: peer.idle_timeout = 0: must be 1–86400 seconds");
  CHECK(error_of("[peer]\nmax_outgoing_sessions = 1000\n") ==
        "t.toml:2:25: peer.max_outgoing_sessions = 1000: must be 1–900 sessions");
  CHECK(error_of("[daemon]\nlog_level = \"verbose\"\n") ==
        "t.toml:2:13: daemon.log_level = \"verbose\": must be one of error warning notice info debug");
  CHECK(error_of("[daemon]\nstate_directory = \"var/lib/dauth\"\n") ==
        "t.toml:2:19: daemon.state_directory = \"var/lib/dauth\": must be an absolute path");
  CHECK_THAT(error_of("[peer]\nlisten = \"peer.example.net:5684\"\n"),
             Catch::StartsWith("t.toml:2:10: peer.listen = \"peer.example.net:5684\": must be an IP address"));
  CHECK_THAT(error_of("[peer]\nlisten = \"127.0.0.1:70000\"\n"), Catch::Contains("port 70000: must be 1–65535"));
  CHECK_THAT(error_of("[enrolee]\nmef_fqdn = \"m.example\"\nmef_address = \"m:1\"\nlocal_listen = \"10.0.0.1:5683\"\n"
                      "[[enrolee.ae]]\nid = \"a\"\nkpm_id = \"k@m.example\"\nkpm_file = \"/k\"\n"),
             Catch::Contains("enrolee.local_listen = \"10.0.0.1:5683\": must be a loopback address"));
  CHECK_THAT(error_of("[peer]\n[[peer.policy]]\npeer = \"bad id\"\nlocal_aes = [\"a\"]\n"),
             Catch::Contains("t.toml:3:8: peer.policy[0].peer = \"bad id\": AE-ID 'bad id'"));
}

TEST_CASE("every address key and the roles take the one host:port syntax", "[config][address]") {
  const auto peer_listen = [](const std::string& value) {
    return std::string(kMinimal) + "[peer]\nlisten = \"" + value + "\"\n";
  };
  const auto mef_address = [](const std::string& value) {
    return std::string(kMinimal) + "[enrolee]\nmef_fqdn = \"m.example\"\nmef_address = \"" + value + "\"\n";
  };
  const auto local_listen = [](const std::string& value) {
    return std::string(kMinimal) + "[enrolee]\nmef_fqdn = \"m.example\"\nmef_address = \"m:1\"\nlocal_listen = \"" +
           value + "\"\n";
  };
  CHECK(parse_config(peer_listen("[::1]:5684"), "t.toml").ok());
  CHECK(parse_config(peer_listen("127.0.0.1:5684"), "t.toml").ok());
  CHECK(dauth::daemon::resolve_address("[::1]:5683")->host == "::1");
  CHECK(dauth::daemon::resolve_address("127.0.0.1:5683")->port == 5683);
  // The same refusal, in the same words, whichever key or role reads the value.
  for (const std::string bad : {"::1:5684", "[::1]", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536"}) {
    INFO(bad);
    const auto why = dauth::transport::parse_host_port(bad);
    REQUIRE_FALSE(why.ok());
    const std::string& reason = why.error().message;
    CHECK_THAT(error_of(peer_listen(bad)), Catch::Contains("peer.listen = \"" + bad + "\": " + reason));
    CHECK_THAT(error_of(mef_address(bad)), Catch::Contains("enrolee.mef_address = \"" + bad + "\": " + reason));
    CHECK_THAT(error_of(local_listen(bad)), Catch::Contains("enrolee.local_listen = \"" + bad + "\": " + reason));
    const auto resolved = dauth::daemon::resolve_address(bad);
    REQUIRE_FALSE(resolved.ok());
    CHECK(resolved.error().code == Errc::invalid_argument);
    CHECK_THAT(resolved.error().message, Catch::EndsWith(reason));
  }
  CHECK_THAT(error_of(local_listen("[::2]:5683")), Catch::Contains("must be a loopback address"));
  CHECK_THAT(error_of(peer_listen("peer.example.net:5684")), Catch::Contains("must be an IP address"));
}

TEST_CASE("cross-field rules run after the keys and point at the offending value", "[config]") {
  // KpmID issued by another MEF than the one configured.
  auto text = full_config("/keys");
  auto wrong_mef = std::regex_replace(text, std::regex("kpm_id = \"meter01@mef.example.net\"\nkpm_file"),
                                      "kpm_id = \"meter01@other.example.net\"\nkpm_file", std::regex_constants::format_first_only);
  CHECK_THAT(error_of(wrong_mef), Catch::Contains("t.toml:13:10: enrolee.ae[0].kpm_id = \"meter01@other.example.net\": "
                                                  "KpmID 'meter01@other.example.net' names MEF other.example.net, not "
                                                  "mef.example.net (enrolee.mef_fqdn)"));
  // Two roles on one UDP port.
  CHECK_THAT(error_of(std::string(kMinimal) + "[mef]\nfqdn = \"m.example\"\nlisten = \"0.0.0.0:5684\"\n[peer]\n"),
             Catch::Contains("t.toml:6:10: mef.listen = \"0.0.0.0:5684\": UDP port 5684 is also used by peer.listen "
                             "(default)"));
  // A policy naming a local AE that is not configured.
  auto unknown_ae = std::regex_replace(text, std::regex("local_aes = \\[\"CAE-meter\"\\]"), "local_aes = [\"CAE-pump\"]");
  CHECK_THAT(error_of(unknown_ae), Catch::Contains("peer.policy[0].local_aes = [\"CAE-pump\"]: names \"CAE-pump\", "
                                                   "which is not the id of any [[enrolee.ae]]"));
  // Derived keys cannot outlive Ke.
  CHECK_THAT(error_of(std::string(kMinimal) + "[mef]\nfqdn = \"m.example\"\nenrolment_lifetime = 600\n"
                                              "session_key_lifetime = 3600\n"),
             Catch::Contains("t.toml:7:24: mef.session_key_lifetime = 3600: must not exceed mef.enrolment_lifetime "
                             "(t.toml:6) = 600"));
  // Master key source without its file; an AE with no bootstrap credential.
  CHECK_THAT(error_of("[daemon]\nmaster_key_source = \"file\"\n"),
             Catch::Contains("t.toml:2:21: daemon.master_key_source = \"file\": needs daemon.master_key_file"));
  CHECK_THAT(error_of(std::string(kMinimal) + "[enrolee]\nmef_fqdn = \"m.example\"\nmef_address = \"m:1\"\n"
                                              "[[enrolee.ae]]\nid = \"CAE-a\"\n"),
             Catch::Contains("enrolee.ae[0].id = \"CAE-a\": needs exactly one bootstrap credential"));
}

TEST_CASE("MEF FQDNs compare as DNS names: other case is the same MEF and enters the typed view lower-case",
          "[config]") {
  // PROTOCOL.md §1: the MEF is named in capitals where the FQDN is configured, in lower case in the KpmIDs.
  auto text = full_config("/keys");
  text = std::regex_replace(text, std::regex("mef_fqdn = \"mef.example.net\""), "mef_fqdn = \"MEF.Example.NET\"");
  text = std::regex_replace(text, std::regex("\nfqdn = \"mef.example.net\""), "\nfqdn = \"Mef.Example.Net\"");
  auto config = parse_config(text, "t.toml");
  INFO((config.ok() ? std::string() : config.error().message));
  REQUIRE(config.ok());
  CHECK(config->enrolee->mef_fqdn == "mef.example.net");
  CHECK(config->mef->fqdn == "mef.example.net");
  // And the other way round: KpmIDs naming the MEF in capitals are stored canonical (relative part as written).
  auto upper_ids = std::regex_replace(full_config("/keys"), std::regex("kpm_id = \"meter01@mef.example.net\""),
                                      "kpm_id = \"Meter01@MEF.EXAMPLE.net\"");
  auto upper = parse_config(upper_ids, "t.toml");
  INFO((upper.ok() ? std::string() : upper.error().message));
  REQUIRE(upper.ok());
  CHECK(upper->enrolee->aes[0].kpm_id == "Meter01@mef.example.net");
  CHECK(upper->mef->enrolees[0].kpm_id == "Meter01@mef.example.net");
  // One KpmID in two spellings is one KpmID listed twice.
  CHECK_THAT(error_of(full_config("/keys") + "\n[[mef.enrolee]]\nkpm_id = \"meter01@MEF.example.net\"\n"
                                             "kpm_file = \"/k2\"\nenrolee_id = \"CAE-other\"\n"),
             Catch::Contains("mef.enrolee[2].kpm_id = \"meter01@MEF.example.net\": KpmID listed twice"));
}

TEST_CASE("enrolee table rows and certificate AEs: one bootstrap identity, and the X.509 set-up they need",
          "[config]") {
  const auto text = full_config("/keys");
  // Both identities in one MEF row; neither.
  auto both = std::regex_replace(text, std::regex("certificate_ae_id = \"CAE-valve\""),
                                 "certificate_ae_id = \"CAE-valve\"\nkpm_id = \"v@mef.example.net\"\nkpm_file = \"/k\"");
  CHECK_THAT(error_of(both), Catch::Contains("mef.enrolee[1].kpm_id = \"v@mef.example.net\": needs exactly one "
                                             "bootstrap identity: a KpmID with its key, a certificate AE-ID or a raw "
                                             "public key id"));
  auto neither = std::regex_replace(text, std::regex("certificate_ae_id = \"CAE-valve\"\n"), "");
  CHECK_THAT(error_of(neither), Catch::Contains("mef.enrolee[1]: needs exactly one bootstrap identity"));
  auto half = std::regex_replace(text, std::regex("certificate_ae_id = \"CAE-valve\""), "kpm_id = \"v@mef.example.net\"");
  CHECK_THAT(error_of(half), Catch::Contains("mef.enrolee[1].kpm_id = \"v@mef.example.net\": a KpmID and its key (kpm_file, "
                                             "or the key sent with the request) go together"));
  // The same certificate AE-ID twice.
  CHECK_THAT(error_of(text + "\n[[mef.enrolee]]\ncertificate_ae_id = \"CAE-valve\"\nenrolee_id = \"CAE-valve\"\n"),
             Catch::Contains("mef.enrolee[2].certificate_ae_id = \"CAE-valve\": AE-ID listed twice"));
  // A certificate row needs the MEF to serve X.509 with a device CA.
  auto no_device_ca = std::regex_replace(text, std::regex("device_ca = \"/etc/dauth/device-ca.pem\"\n"), "");
  CHECK_THAT(error_of(no_device_ca),
             Catch::Contains("mef.enrolee[1].certificate_ae_id = \"CAE-valve\": needs mef.certificate_file, "
                             "mef.private_key_file and mef.device_ca"));
  // An AE with a device certificate needs the MEF's trust anchor (the certificate RSPF checks the MEF's FQDN).
  auto no_anchor = std::regex_replace(text, std::regex("mef_trust_anchor = \"/etc/dauth/mef-ca.pem\"\n"), "");
  CHECK_THAT(error_of(no_anchor), Catch::Contains("enrolee.ae[1].certificate_file = \"/etc/dauth/valve.crt\": needs "
                                                  "enrolee.mef_trust_anchor"));
}

TEST_CASE("enrolee.ae.certificate_key: a pkcs11: URI without a PIN, for an AE that asks for a certificate",
          "[config]") {
  const auto text = full_config("/keys");
  const auto with_key = [&](const std::string& lines) {
    return std::regex_replace(text, std::regex("kpm_file = \"/keys/meter.kpm\"\n\n\\[\\[enrolee.ae\\]\\]"),
                              "kpm_file = \"/keys/meter.kpm\"\n" + lines + "\n\n[[enrolee.ae]]",
                              std::regex_constants::format_first_only);
  };
  auto good = parse_config(
      with_key("certificate_enrolment = true\ncertificate_key = \"pkcs11:token=dauth;object=CAE-meter\""), "t.toml");
  INFO((good.ok() ? std::string() : good.error().message));
  REQUIRE(good.ok());
  CHECK(good->enrolee->aes[0].certificate_key == "pkcs11:token=dauth;object=CAE-meter");
  CHECK(good->enrolee->aes[1].certificate_key.empty());
  CHECK_THAT(error_of(with_key("certificate_enrolment = true\ncertificate_key = \"/etc/dauth/meter-est.key\"")),
             Catch::Contains("enrolee.ae[0].certificate_key = \"/etc/dauth/meter-est.key\": must be a pkcs11: URI"));
  CHECK_THAT(error_of(with_key("certificate_key = \"pkcs11:token=dauth;object=CAE-meter\"")),
             Catch::Contains("enrolee.ae[0].certificate_key = \"pkcs11:token=dauth;object=CAE-meter\": needs "
                             "certificate_enrolment = true"));
  const std::string with_pin = error_of(
      with_key("certificate_enrolment = true\ncertificate_key = \"pkcs11:token=dauth;object=k?pin-value=4711\""));
  CHECK_THAT(with_pin, Catch::Contains("enrolee.ae[0].certificate_key: a token key URI carries no PIN"));
  CHECK_THAT(with_pin, !Catch::Contains("4711"));
  // In any spelling (RFC 7512 attribute names are case-insensitive to p11-kit's parser's callers).
  const std::string upper_pin = error_of(
      with_key("certificate_enrolment = true\ncertificate_key = \"pkcs11:token=dauth;object=k?PIN-VALUE=4711\""));
  CHECK_THAT(upper_pin, Catch::Contains("carries no PIN"));
  CHECK_THAT(upper_pin, !Catch::Contains("4711"));
}

TEST_CASE("raw_key takes generate or a token key URI, and a URI with a PIN is refused without quoting it",
          "[config][pkcs11]") {
  if (!dauth::transport::backend_supports_rpk()) return;  // the OpenSSL build refuses raw keys: tested where it runs
  const std::string peer = full_config("/keys");
  const auto with_raw_key = [&](const std::string& value) {
    return std::regex_replace(peer, std::regex("\\[peer\\]\n"), "[peer]\nraw_key = \"" + value + "\"\n");
  };
  CHECK(parse_config(with_raw_key("generate"), "t.toml").ok());
  auto token = parse_config(with_raw_key("pkcs11:token=dauth;object=peer"), "t.toml");
  REQUIRE(token.ok());
  CHECK(token->peer->raw_key == "pkcs11:token=dauth;object=peer");
  CHECK_THAT(error_of(with_raw_key("make")), Catch::Contains("must be \"generate\" or the pkcs11: URI"));
  const std::string with_pin = error_of(with_raw_key("pkcs11:token=dauth;object=peer?pin-value=4711"));
  CHECK_THAT(with_pin, Catch::Contains("peer.raw_key") && Catch::Contains("carries no PIN"));
  CHECK_THAT(with_pin, !Catch::Contains("4711"));
}

TEST_CASE("peer.address.credential: psk by default, certificate needs peer.trust_anchors", "[config]") {
  const auto text = full_config("/keys");
  auto config = parse_config(text, "t.toml");
  REQUIRE(config.ok());
  CHECK(config->peer->addresses[0].credential == "psk");
  auto certificate = std::regex_replace(text, std::regex("address = \"\\[::1\\]:5684\"\n"),
                                        "address = \"[::1]:5684\"\ncredential = \"certificate\"\n");
  CHECK_THAT(error_of(certificate), Catch::Contains("peer.address[0].credential = \"certificate\": needs "
                                                    "peer.trust_anchors"));
  auto anchored = std::regex_replace(certificate, std::regex("idle_timeout = 120\n"),
                                     "idle_timeout = 120\ntrust_anchors = [\"/etc/dauth/mef-ca.pem\"]\n");
  config = parse_config(anchored, "t.toml");
  INFO((config.ok() ? std::string() : config.error().message));
  REQUIRE(config.ok());
  CHECK(config->peer->addresses[0].credential == "certificate");
  auto unknown = std::regex_replace(text, std::regex("address = \"\\[::1\\]:5684\"\n"),
                                    "address = \"[::1]:5684\"\ncredential = \"x509\"\n");
  CHECK_THAT(error_of(unknown),
             Catch::Contains("peer.address[0].credential = \"x509\": must be one of psk certificate rpk"));
}

TEST_CASE("raw public keys: own keys generated, pinned peer keys in any printed form, rpk rows and bootstrap",
          "[config][rpk]") {
  const std::string ni = "ni:///sha-256;SQct_UPcvRr1ZXAfE2LhlAxGsOKod5aDi-O9jxSSQLw";
  const std::string hex = "sha256:49072dfd43dcbd1af565701f1362e1940c46b0e2a87796838be3bd8f149240bc";
  const std::string other = "pin-sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
  const std::string other_ni = "ni:///sha-256;AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
  auto text = full_config("/keys");
  text = std::regex_replace(text, std::regex("idle_timeout = 120\n"), "idle_timeout = 120\nraw_key = \"generate\"\n");
  text = std::regex_replace(text, std::regex("address = \"\\[::1\\]:5684\"\n"),
                            "address = \"[::1]:5684\"\ncredential = \"rpk\"\n");
  text = std::regex_replace(text, std::regex("session_key_lifetime = 3600\n"),
                            "session_key_lifetime = 3600\nraw_key = \"generate\"\n");
  text = std::regex_replace(text, std::regex("mef_trust_anchor = \"/etc/dauth/mef-ca.pem\"\n"),
                            "mef_trust_anchor = \"/etc/dauth/mef-ca.pem\"\nmef_raw_keys = [\"" + other + "\"]\n");
  text += "\n[[peer.rpk]]\nkey = \"" + hex + "\"\nae_id = \"CAE-remote\"\n";
  text += "\n[[enrolee.ae]]\nid = \"CAE-pump\"\nraw_key = \"generate\"\n";
  text += "\n[[mef.enrolee]]\nrpk = \"" + other + "\"\nenrolee_id = \"CAE-pump\"\n";
  if (!dauth::transport::backend_supports_rpk()) {
    CHECK_THAT(error_of(text), Catch::Contains("peer.raw_key = \"generate\": raw public keys need the GnuTLS build"));
    return;
  }
  auto config = parse_config(text, "t.toml");
  INFO((config.ok() ? std::string() : config.error().message));
  REQUIRE(config.ok());
  CHECK(config->peer->raw_key == "generate");
  CHECK(config->mef->raw_key == "generate");
  REQUIRE(config->peer->pinned_keys.size() == 1);
  CHECK(config->peer->pinned_keys[0].key == ni);  // stored in one form whatever the file used
  CHECK(config->peer->pinned_keys[0].ae_id == "CAE-remote");
  CHECK(config->peer->addresses[0].credential == "rpk");
  CHECK(config->enrolee->mef_raw_keys == std::set<std::string>{other_ni});
  REQUIRE(config->enrolee->aes.size() == 3);
  CHECK(config->enrolee->aes[2].raw_key_bootstrap());
  CHECK_FALSE(config->enrolee->aes[0].raw_key_bootstrap());
  CHECK(config->mef->enrolees[2].rpk == other_ni);

  // Errors, each pointing at the value.
  CHECK_THAT(error_of(std::regex_replace(text, std::regex(hex), "sha256:4907")),
             Catch::Contains("peer.rpk[0].key = \"sha256:4907\": public key id"));
  CHECK_THAT(error_of(text + "\n[[peer.rpk]]\nkey = \"" + ni + "\"\nae_id = \"CAE-other\"\n"),
             Catch::Contains("peer.rpk[1].key = \"" + ni + "\": already pinned by peer.rpk[0].key"));
  CHECK_THAT(error_of(std::regex_replace(text, std::regex("idle_timeout = 120\nraw_key = \"generate\""),
                                         "idle_timeout = 120\nraw_key = \"file\"")),
             Catch::Contains("peer.raw_key = \"file\": must be \"generate\" or the pkcs11: URI"));
  CHECK_THAT(error_of(std::regex_replace(text, std::regex("mef_raw_keys = \\[[^\\]]*\\]\n"), "")),
             Catch::Contains("enrolee.ae[2].raw_key = \"generate\": bootstraps with its raw key and needs "
                             "enrolee.mef_raw_keys"));
  CHECK_THAT(error_of(text + "certificate_enrolment = true\n"),
             Catch::Contains("certificate_enrolment = true: is not offered to raw-key enrolees"));
  CHECK_THAT(error_of(std::regex_replace(text, std::regex("session_key_lifetime = 3600\nraw_key = \"generate\"\n"),
                                         "session_key_lifetime = 3600\n")),
             Catch::Contains("mef.enrolee[2].rpk = \"" + other + "\": needs mef.raw_key"));
  CHECK_THAT(error_of(text + "\n[[mef.enrolee]]\nrpk = \"" + other_ni + "\"\nenrolee_id = \"CAE-pump2\"\n"),
             Catch::Contains("mef.enrolee[3].rpk = \"" + other_ni + "\": key listed twice"));
  CHECK_THAT(error_of(text + "\n[[mef.enrolee]]\nrpk = \"" + ni +
                      "\"\ncertificate_ae_id = \"CAE-x\"\nenrolee_id = \"CAE-x\"\n"),
             Catch::Contains("mef.enrolee[3].rpk = \"" + ni + "\": needs exactly one bootstrap identity"));
}

TEST_CASE("every error of a file is reported, in file order", "[config]") {
  const auto message = error_of("[peer]\nidle_timeout = 0\nmax_handshakes = 0\nbogus = 1\n");
  CHECK(message ==
        "t.toml:2:16: peer.idle_timeout = 0: must be 1–86400 seconds\n"
        "t.toml:3:18: peer.max_handshakes = 0: must be 1–1000 handshakes\n"
        "t.toml:4:1: peer.bogus: unknown key; allowed in [peer]: listen, trust_anchors, idle_timeout, max_sessions, "
        "max_outgoing_sessions, max_handshakes, handshake_timeout, nstart, local_nstart, legacy_onem2m_options, "
        "raw_key, esprim, esprim_rand_lifetime, esprim_max_sessions, [[peer.address]], [[peer.rpk]], "
        "[[peer.policy]], [[peer.hop]], [[peer.hop_client]]");
}

TEST_CASE("TOML syntax errors carry the position and Errc::parse", "[config]") {
  auto config = parse_config("[daemon]\nlog_level = \"info\n", "t.toml");
  REQUIRE_FALSE(config.ok());
  CHECK(config.error().code == Errc::parse);
  CHECK_THAT(config.error().message, Catch::StartsWith("t.toml:2:"));
  CHECK_THAT(config.error().message, Catch::Contains("TOML syntax"));
}

TEST_CASE("key files are loaded into guarded memory and never printed", "[config][secrets]") {
  dauth::test::TempDir dir;
  const std::string master_hex(64, 'a');
  const std::string kpm_hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
  dauth::test::write_file(dir / "master.key", master_hex + "\n", 0600);
  dauth::test::write_file(dir / "meter.kpm", kpm_hex + "\n", 0600);
  auto text = full_config(dir.path().string());
  text = std::regex_replace(text, std::regex("/nonexistent/master.key"), (dir / "master.key").string());
  auto config = parse_config(text, "t.toml");
  REQUIRE(config.ok());
  auto secrets = load_secrets(*config);
  INFO((secrets.ok() ? std::string() : secrets.error().message));
  REQUIRE(secrets.ok());
  CHECK(secrets->master_key().size() == 32);
  const auto* kpm = secrets->find_file(dir / "meter.kpm");
  REQUIRE(kpm != nullptr);
  CHECK(kpm->key.equals(dauth::ByteView(*dauth::from_hex(kpm_hex))));

  const std::string printed = config->normalised(&secrets.value());
  CHECK_THAT(printed, Catch::Contains("kpm_file = \"" + (dir / "meter.kpm").string() + "\"  # key (hidden): 32 bytes, "
                                      "fingerprint " + kpm->key.fingerprint()));
  CHECK(printed.find(kpm_hex) == std::string::npos);
  CHECK(printed.find(master_hex) == std::string::npos);
  // The normalised output is itself a valid configuration that means the same thing.
  auto again = parse_config(printed, "normalised.toml");
  INFO((again.ok() ? std::string() : again.error().message));
  REQUIRE(again.ok());
  CHECK(again->normalised() == parse_config(printed, "normalised.toml")->normalised());
  CHECK(again->peer->idle_timeout == 120);
}

TEST_CASE("key files with group or world access, or bad content, are refused", "[config][secrets]") {
  dauth::test::TempDir dir;
  dauth::test::write_file(dir / "master.key", std::string(64, 'b'), 0640);
  const std::string text = "[daemon]\nmaster_key_source = \"file\"\nmaster_key_file = \"" +
                           (dir / "master.key").string() + "\"\n";
  auto config = parse_config(text, "t.toml");
  REQUIRE(config.ok());
  auto secrets = load_secrets(*config);
  REQUIRE_FALSE(secrets.ok());
  CHECK(secrets.error().code == Errc::permission);
  CHECK_THAT(secrets.error().message, Catch::StartsWith("t.toml:3:19: daemon.master_key_file: master key file "));
  CHECK_THAT(secrets.error().message, Catch::Contains("mode 0640, must not be readable or writable by group or others"));
  // dauthd(8) KEY FILES quotes this refusal as the operator sees it.
  const std::string man = dauth::test::read_text_file(DAUTH_SOURCE_DIR "/docs/dauthd.8");
  const auto quoted = man.find("mode found (\\(lq");
  REQUIRE(quoted != std::string::npos);
  const auto start = man.find("\\(lq", quoted) + 4;
  std::string quote = man.substr(start, man.find("\\(rq", start) - start);
  quote = std::regex_replace(quote, std::regex("\n"), " ");
  CHECK_THAT(secrets.error().message, Catch::Contains(quote));

  dauth::test::write_file(dir / "master.key", std::string(62, 'c'), 0600);
  ::chmod((dir / "master.key").c_str(), 0600);
  secrets = load_secrets(*config);
  REQUIRE_FALSE(secrets.ok());
  CHECK_THAT(secrets.error().message, Catch::Contains("62 bytes; expected exactly 64 hexadecimal characters"));
  CHECK(secrets.error().message.find(std::string(62, 'c')) == std::string::npos);

  // The credential source needs systemd's $CREDENTIALS_DIRECTORY.
  ::setenv("CREDENTIALS_DIRECTORY", dir.path().c_str(), 1);
  dauth::test::write_file(dir / "master-key", std::string(64, 'd'), 0600);
  auto from_credential = parse_config("", "t.toml");
  REQUIRE(from_credential.ok());
  auto loaded = load_secrets(*from_credential);
  ::unsetenv("CREDENTIALS_DIRECTORY");
  REQUIRE(loaded.ok());
  CHECK(loaded->master_key().equals(dauth::ByteView(*dauth::from_hex(std::string(64, 'd')))));
  auto missing = load_secrets(*from_credential);
  REQUIRE_FALSE(missing.ok());
  CHECK_THAT(missing.error().message, Catch::Contains("$CREDENTIALS_DIRECTORY is not set"));
}

namespace {

using KeySet = std::set<std::string>;

KeySet schema_keys() {
  KeySet keys;
  for (const auto& k : config_schema()) keys.insert(std::string(k.section) + "." + std::string(k.name));
  return keys;
}

// Keys of the example config, commented out or not: "# key = value" lines under "# [section]" headers.
KeySet example_keys(const std::string& text) {
  KeySet keys;
  std::string section;
  const std::regex header(R"(^#?\s*\[\[?([a-z_.]+)\]\]?\s*$)");
  const std::regex key(R"(^#?\s*([a-z0-9_]+)\s*=)");
  std::istringstream in(text);
  std::string line;
  std::smatch m;
  while (std::getline(in, line)) {
    if (std::regex_match(line, m, header)) {
      section = m[1];
    } else if (std::regex_search(line, m, key) && !section.empty()) {
      keys.insert(section + "." + std::string(m[1]));
    }
  }
  return keys;
}

// Keys of the man page: ".TP" + ".B key" under '.SS "[section]"' or '.SS "[[section]]"'.
KeySet man_keys(const std::string& text) {
  KeySet keys;
  std::string section;
  const std::regex header(R"(^\.SS "?\[\[?([a-z_.]+)\]\]?"?\s*$)");
  const std::regex key(R"(^\.B ([a-z0-9_]+)\s*$)");
  std::istringstream in(text);
  std::string line;
  std::string previous;
  std::smatch m;
  while (std::getline(in, line)) {
    if (std::regex_match(line, m, header)) {
      section = m[1];
    } else if (previous == ".TP" && std::regex_match(line, m, key) && !section.empty()) {
      keys.insert(section + "." + std::string(m[1]));
    }
    previous = line;
  }
  return keys;
}

}  // namespace

TEST_CASE("the man page and the example configuration list exactly the keys of the table", "[config][docs]") {
  const KeySet table = schema_keys();
  const KeySet example = example_keys(dauth::test::read_text_file(DAUTH_SOURCE_DIR "/docs/dauthd.toml.example"));
  const KeySet man = man_keys(dauth::test::read_text_file(DAUTH_SOURCE_DIR "/docs/dauthd.toml.5"));
  CHECK(table.size() > 40);
  for (const auto& k : table) {
    INFO(k);
    CHECK(example.count(k) == 1);
    CHECK(man.count(k) == 1);
  }
  for (const auto& k : example) {
    INFO("example config has " << k);
    CHECK(table.count(k) == 1);
  }
  for (const auto& k : man) {
    INFO("man page has " << k);
    CHECK(table.count(k) == 1);
  }
  // Every section of the table has its header in both documents.
  for (const auto& s : config_sections()) {
    INFO(s.name);
    const std::string name(s.name);
    const std::string bracket = s.array ? "[[" + name + "]]" : "[" + name + "]";
    CHECK(dauth::test::read_text_file(DAUTH_SOURCE_DIR "/docs/dauthd.toml.example").find(bracket) != std::string::npos);
    CHECK(dauth::test::read_text_file(DAUTH_SOURCE_DIR "/docs/dauthd.toml.5").find(".SS \"" + bracket + "\"") !=
          std::string::npos);
  }
}

namespace {

// The man page with the generated part of every section and key (config.hpp: man_page_section, man_page_entry)
// written anew from the table, and every other line as it is: a section's header and doc line; a key's ".TP",
// ".B name", facts and doc line (paragraphs after them are the page's own).
std::string regenerated_man_page(const std::string& page) {
  std::vector<std::string> lines;
  std::istringstream in(page);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  const std::regex header(R"(^\.SS "\[\[?([a-z_.]+)\]\]?"$)");
  const std::regex key(R"(^\.B ([a-z0-9_]+)$)");
  std::string out;
  std::string section;
  std::smatch m;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    const dauth::daemon::SectionSpec* spec_of_section = nullptr;
    if (std::regex_match(lines[i], m, header)) {
      section = m[1];
      for (const auto& s : config_sections()) {
        if (s.name == section) spec_of_section = &s;
      }
    }
    if (spec_of_section != nullptr && i + 1 < lines.size()) {
      out += dauth::daemon::man_page_section(*spec_of_section);
      ++i;
      continue;
    }
    const dauth::daemon::KeySpec* spec_of_key = nullptr;
    if (lines[i] == ".TP" && i + 3 < lines.size() && std::regex_match(lines[i + 1], m, key)) {
      for (const auto& k : config_schema()) {
        if (k.section == section && k.name == std::string(m[1])) spec_of_key = &k;
      }
    }
    if (spec_of_key != nullptr) {
      out += dauth::daemon::man_page_entry(*spec_of_key);
      i += 3;
      continue;
    }
    out += lines[i] + "\n";
  }
  return out;
}

}  // namespace

TEST_CASE("the man page shows each key's type, range, default and doc as the table has them", "[config][docs]") {
  const std::string page = dauth::test::read_text_file(DAUTH_SOURCE_DIR "/docs/dauthd.toml.5");
  const std::string expected = regenerated_man_page(page);
  if (expected != page) {
    const std::string regenerated = DAUTH_BINARY_DIR "/dauthd.toml.5.regenerated";
    dauth::test::write_file(regenerated, expected, 0644);
    FAIL("docs/dauthd.toml.5 differs from daemon/src/config_schema.cpp; the page with the table's text is "
         << regenerated << " (diff it, then copy it over docs/dauthd.toml.5)");
  }
  // Every key's generated text is there (an entry the regeneration did not recognise would slip through above).
  for (const auto& k : config_schema()) {
    INFO(k.section << "." << k.name);
    CHECK(page.find(dauth::daemon::man_page_entry(k)) != std::string::npos);
  }
  // Ranges read as a person writes them, never as code ("60\(enkYear seconds").
  CHECK(page.find("kYear") == std::string::npos);
  CHECK(page.find("kDay") == std::string::npos);
}

TEST_CASE("the example configuration describes each key with the table's doc line", "[config][docs]") {
  // "## <doc>[ (required)]" right above each "# key = value" line (an example may show a key twice, with other
  // values: then its doc line is above the first).
  std::istringstream in(dauth::test::read_text_file(DAUTH_SOURCE_DIR "/docs/dauthd.toml.example"));
  const std::regex header(R"(^#?\s*\[\[?([a-z_.]+)\]\]?\s*$)");
  const std::regex setting(R"(^#\s?([a-z0-9_]+)\s*=)");
  std::string section;
  std::string previous;
  std::set<std::string> described;
  std::smatch m;
  for (std::string line; std::getline(in, line); previous = line) {
    if (std::regex_match(line, m, header)) {
      section = m[1];
      continue;
    }
    if (!std::regex_search(line, m, setting) || previous.rfind("## ", 0) != 0) continue;
    for (const auto& k : config_schema()) {
      if (k.section != section || k.name != std::string(m[1])) continue;
      INFO(section << "." << k.name);
      CHECK(previous == "## " + std::string(k.doc) + (k.required ? " (required)" : ""));
      described.insert(section + "." + std::string(k.name));
    }
  }
  CHECK(described == schema_keys());
}

TEST_CASE("range texts: durations in words, other units as numbers", "[config][docs]") {
  const auto range_of = [](std::string_view section, std::string_view name) {
    for (const auto& k : config_schema()) {
      if (k.section == section && k.name == name) return dauth::daemon::describe_range(k);
    }
    FAIL("no key " << section << "." << name);
    return std::string();
  };
  CHECK(range_of("mef", "enrolment_lifetime") == "60 seconds to 1 year");
  CHECK(range_of("mef", "certificate_lifetime") == "1 hour to 3 years");
  CHECK(range_of("mef.enrolee", "lifetime") == "0 to 1 year");
  CHECK(range_of("peer", "idle_timeout") == "1 second to 1 day");
  CHECK(range_of("daemon", "shutdown_timeout") == "0 to 300 seconds");
  CHECK(range_of("daemon", "max_control_clients") == "1 to 64 connections");
  CHECK(range_of("peer", "listen").empty());
}

TEST_CASE("one MEF port everywhere: enrolee.mef_address's doc and examples use mef.listen's default port",
          "[config][docs]") {
  std::string mef_port;
  std::string peer_port;
  std::string mef_address_doc;
  for (const auto& k : config_schema()) {
    const std::string where = std::string(k.section) + "." + std::string(k.name);
    const std::string value(k.default_value);
    if (where == "mef.listen") mef_port = value.substr(value.rfind(':') + 1, 4);
    if (where == "peer.listen") peer_port = value.substr(value.rfind(':') + 1, 4);
    if (where == "enrolee.mef_address") mef_address_doc = std::string(k.doc);
  }
  REQUIRE(mef_port.size() == 4);
  REQUIRE(mef_port != peer_port);
  INFO(mef_address_doc);
  CHECK(mef_address_doc.find("port " + mef_port) != std::string::npos);
  CHECK(mef_address_doc.find(peer_port) == std::string::npos);
  // The example's mef_address and every MEF address the documents show.
  const std::regex mef_address(R"(mef_address = "[^"]*:([0-9]+)\")");
  for (const char* file : {"/docs/dauthd.toml.example", "/docs/dauthd.toml.5", "/docs/interop.md", "/README.md"}) {
    const std::string text = dauth::test::read_text_file(std::string(DAUTH_SOURCE_DIR) + file);
    for (auto it = std::sregex_iterator(text.begin(), text.end(), mef_address); it != std::sregex_iterator(); ++it) {
      INFO(file << ": " << (*it)[0]);
      CHECK((*it)[1] == mef_port);
    }
  }
}

TEST_CASE("the example configuration, uncommented, is a valid configuration", "[config][docs]") {
  // Lines starting "#" followed by a key or a section header are settings; "##" lines are prose.
  std::istringstream in(dauth::test::read_text_file(DAUTH_SOURCE_DIR "/docs/dauthd.toml.example"));
  std::string line;
  std::string text;
  const std::regex setting(R"(^#\s?((\[|[a-z0-9_]+\s*=).*)$)");
  std::smatch m;
  while (std::getline(in, line)) {
    if (std::regex_match(line, m, setting)) {
      text += std::string(m[1]) + "\n";
    } else if (line.rfind('#', 0) != 0) {
      text += line + "\n";
    }
  }
  auto config = parse_config(text, "dauthd.toml.example");
  INFO((config.ok() ? std::string() : config.error().message));
  CHECK(config.ok());
}

TEST_CASE("every configuration key has exactly one reload rule", "[config][reload]") {
  for (const auto& spec : dauth::daemon::config_schema()) {
    int rules = 0;
    for (const auto& rule : dauth::daemon::reload_rules()) {
      if (rule.section == spec.section && rule.name == spec.name) ++rules;
    }
    INFO(std::string(spec.section) + "." + std::string(spec.name));
    CHECK(rules == 1);
  }
  CHECK(dauth::daemon::reload_rules().size() == dauth::daemon::config_schema().size());
}

TEST_CASE("a reload's changes: live keys applied, restart keys pending by config name until reverted",
          "[config][reload]") {
  using dauth::daemon::live_changes;
  using dauth::daemon::restart_pending;
  using dauth::daemon::restart_values;
  const std::string base = full_config("/keys");
  const auto running = parse_config(base, "t.toml");
  REQUIRE(running.ok());
  const auto edited = [&](const std::string& from, const std::string& to) {
    std::string text = base;
    const auto at = text.find(from);
    REQUIRE(at != std::string::npos);
    text.replace(at, from.size(), to);
    auto config = parse_config(text, "t.toml");
    INFO(text);
    REQUIRE(config.ok());
    return std::move(config).value();
  };
  using Names = std::vector<std::string>;

  // Unchanged: nothing to apply, nothing pending.
  CHECK(live_changes(*running, *running).empty());
  CHECK(restart_pending(restart_values(*running), restart_values(*running)).empty());

  // A local AE's source and the policy apply live; the AE is named by its id, a policy row by its position.
  auto fresh = edited("endpoint = \"127.0.0.1:6001\"", "endpoint = \"127.0.0.1:6001\"\nlocal_source = \"127.0.0.3\"");
  CHECK(live_changes(*running, fresh) == Names{"enrolee.ae.local_source (CAE-meter)"});
  CHECK(restart_pending(restart_values(*running), restart_values(fresh)).empty());
  fresh = edited("methods = [\"GET\", \"PUT\"]", "methods = [\"GET\"]");
  CHECK(live_changes(*running, fresh) == Names{"peer.policy[0].methods"});
  // A pinned raw key added (or removed) is applied by the reload, not left for a restart.
  if (dauth::transport::backend_supports_rpk()) {
    fresh = edited("[[peer.policy]]", "[[peer.rpk]]\nkey = \"sha256:" + std::string(64, 'a') +
                                          "\"\nae_id = \"CAE-remote\"\n\n[[peer.policy]]");
    CHECK(live_changes(*running, fresh) == Names{"peer.rpk[0]"});
    CHECK(restart_pending(restart_values(*running), restart_values(fresh)).empty());
  }

  // A listen address (its default made explicit is no change) and a node limit wait for a restart.
  const std::string mef_fqdn = "fqdn = \"mef.example.net\"\nsession";
  fresh = edited(mef_fqdn, "fqdn = \"mef.example.net\"\nlisten = \"0.0.0.0:5685\"\nsession");
  CHECK(restart_pending(restart_values(*running), restart_values(fresh)).empty());
  fresh = edited(mef_fqdn, "fqdn = \"mef.example.net\"\nlisten = \"0.0.0.0:5699\"\nsession");
  CHECK(live_changes(*running, fresh).empty());
  CHECK(restart_pending(restart_values(*running), restart_values(fresh)) == Names{"mef.listen"});
  fresh = edited("idle_timeout = 120", "idle_timeout = 60");
  CHECK(restart_pending(restart_values(*running), restart_values(fresh)) == Names{"peer.idle_timeout"});

  // An endpoint: a new value applies, setting or removing one waits for the restart.
  fresh = edited("endpoint = \"127.0.0.1:6001\"", "endpoint = \"127.0.0.1:6002\"");
  CHECK(live_changes(*running, fresh) == Names{"enrolee.ae.endpoint (CAE-meter)"});
  CHECK(restart_pending(restart_values(*running), restart_values(fresh)).empty());
  fresh = edited("endpoint = \"127.0.0.1:6001\"\n", "");
  CHECK(live_changes(*running, fresh).empty());
  CHECK(restart_pending(restart_values(*running), restart_values(fresh)) == Names{"enrolee.ae.endpoint (CAE-meter)"});

  // A role or a local AE added or removed is one entry, not one per key.
  auto without_peer = parse_config(base.substr(0, base.find("[peer]")), "t.toml");
  REQUIRE(without_peer.ok());
  CHECK(restart_pending(restart_values(*without_peer), restart_values(*running)) == Names{"peer"});
  fresh = edited("[[enrolee.ae]]\nid = \"CAE-valve\"", "[[enrolee.ae]]\nid = \"CAE-gauge\"");
  CHECK(restart_pending(restart_values(*running), restart_values(fresh)) ==
        Names{"enrolee.ae (CAE-gauge)", "enrolee.ae (CAE-valve)"});
}

TEST_CASE("hops: via names a [[peer.hop]], one key source per row, relay destinations need a hop", "[config][relay]") {
  const std::string hops = R"(
[[peer.hop]]
name = "relay-r"
address = "relay.example.net:5684"
identity = "gateway-a"
key_file = "/keys/hop.key"

[[peer.hop_client]]
identity = "relay-r"
key_credential = "hop-client-r"

[relay]
enable = true
allow = ["relay.example.net:5684"]
)";
  const auto via = [](const std::string& hop) {
    return std::regex_replace(full_config("/keys"), std::regex("address = \"\\[::1\\]:5684\"\n"),
                              "address = \"[::1]:5684\"\nesprim = \"required\"\nvia = \"" + hop + "\"\n");
  };
  auto config = parse_config(via("relay-r") + hops, "t.toml");
  INFO((config.ok() ? std::string() : config.error().message));
  REQUIRE(config.ok());
  CHECK(config->peer->addresses[0].via == "relay-r");
  REQUIRE(config->peer->hops.size() == 1);
  CHECK(config->peer->hops[0].address == "relay.example.net:5684");
  CHECK(config->peer->hops[0].identity == "gateway-a");
  CHECK(config->peer->hops[0].key.key_file == "/keys/hop.key");
  REQUIRE(config->peer->hop_clients.size() == 1);
  CHECK(config->peer->hop_clients[0].key.key_credential == "hop-client-r");
  CHECK(config->relay.enable);
  CHECK(config->relay.allow == std::vector<std::string>{"relay.example.net:5684"});
  CHECK_FALSE(parse_config(full_config("/keys"), "t.toml")->relay.enable);  // off by default

  CHECK(config->peer->addresses[0].esprim_required);
  // A hop carries only ESPrim: without it the requests would bypass the configured path.
  CHECK_THAT(error_of(std::regex_replace(via("relay-r"), std::regex("esprim = \"required\"\n"), "") + hops),
             Catch::Contains("peer.address[0].via = \"relay-r\": needs esprim = \"required\""));
  CHECK_THAT(error_of(via("nowhere") + hops),
             Catch::Contains("peer.address[0].via = \"nowhere\": names no [[peer.hop]] (hop names: relay-r)"));
  CHECK_THAT(error_of(via("relay-r") + std::regex_replace(hops, std::regex("key_file = \"/keys/hop.key\"\n"), "")),
             Catch::Contains("[[peer.hop]] needs exactly one of key_file and key_credential"));
  CHECK_THAT(error_of(full_config("/keys") + std::regex_replace(hops, std::regex("allow = \\[\"relay"),
                                                                "allow = [\"other")),
             Catch::Contains("destination \"other.example.net:5684\" has no [[peer.hop]] with that address"));
  CHECK_THAT(error_of(full_config("/keys") + hops + "\n[[peer.hop_client]]\nidentity = \"relay-r\"\n"
                                                    "key_file = \"/keys/x.key\"\n"),
             Catch::Contains("identity listed twice in [[peer.hop_client]]"));
  CHECK_THAT(error_of(std::string(kMinimal) + "[relay]\nenable = true\n"), Catch::Contains("[relay] needs the [peer] section"));
}

TEST_CASE("hop keys: at least 32 bytes of hex, from a file or a systemd credential, shown only as a fingerprint",
          "[config][relay][secrets]") {
  dauth::test::TempDir dir;
  dauth::test::write_file(dir / "master.key", std::string(64, 'a') + "\n", 0600);
  const std::string hop_hex(64, 'c');
  dauth::test::write_file(dir / "hop.key", hop_hex + "\n", 0600);
  dauth::test::write_file(dir / "short.key", std::string(62, 'd') + "\n", 0600);  // 31 bytes
  std::filesystem::create_directory(dir / "credentials");
  dauth::test::write_file(dir / "credentials" / "hop-client", std::string(96, 'e'), 0600);
  const auto text = [&](const std::string& key_file) {
    return "[daemon]\nmaster_key_source = \"file\"\nmaster_key_file = \"" + (dir / "master.key").string() +
           "\"\n[peer]\n[[peer.hop]]\nname = \"r\"\naddress = \"127.0.0.1:5690\"\nidentity = \"a\"\nkey_file = \"" +
           (dir / key_file).string() + "\"\n[[peer.hop_client]]\nidentity = \"r\"\nkey_credential = \"hop-client\"\n";
  };
  auto config = parse_config(text("hop.key"), "t.toml");
  REQUIRE(config.ok());
  // Without $CREDENTIALS_DIRECTORY the credential is refused at start, left out for --check-config.
  ::unsetenv("CREDENTIALS_DIRECTORY");
  auto outside = load_secrets(*config);
  REQUIRE_FALSE(outside.ok());
  CHECK_THAT(outside.error().message, Catch::Contains("peer.hop_client[0].key_credential"));
  CHECK(load_secrets(*config, dauth::daemon::SystemdCredential::later).ok());
  ::setenv("CREDENTIALS_DIRECTORY", (dir / "credentials").c_str(), 1);
  auto secrets = load_secrets(*config);
  ::unsetenv("CREDENTIALS_DIRECTORY");
  INFO((secrets.ok() ? std::string() : secrets.error().message));
  REQUIRE(secrets.ok());
  const auto* hop = secrets->find_hop_key(config->peer->hops[0].key);
  REQUIRE(hop != nullptr);
  CHECK(hop->key.size() == 32);
  const auto* client = secrets->find_hop_key(config->peer->hop_clients[0].key);
  REQUIRE(client != nullptr);
  CHECK(client->key.size() == 48);
  const std::string printed = config->normalised(&secrets.value());
  CHECK_THAT(printed, Catch::Contains("key_credential = \"hop-client\"  # key (hidden): 48 bytes, fingerprint " +
                                      client->key.fingerprint()));
  CHECK(printed.find(hop_hex) == std::string::npos);

  auto short_key = load_secrets(*parse_config(text("short.key"), "t.toml"));
  REQUIRE_FALSE(short_key.ok());
  CHECK_THAT(short_key.error().message, Catch::Contains("peer.hop[0].key_file"));
}

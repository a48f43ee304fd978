// End to end: several certificate AEs behind one gateway. Gateway B serves valve (device certificate, then its
// AE-ID certificate over EST) and pump (pre-provisioned key; its AE-ID certificate is issued over EST after B
// started); meter on gateway A reaches both over X.509 peer sessions, each request delivered to the AE the
// handshake named by SNI, without restarting B. A name B has no certificate for gets no session at all.
#include <signal.h>

#include <catch2/catch.hpp>
#include <regex>

#include "dauth/transport/transport.hpp"
#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

TEST_CASE("certificate AEs: B presents each AE's certificate by SNI, one issued after start without restart",
          "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  if (!transport::backend_selects_server_certificates()) {
    WARN("certificates by server name need the GnuTLS build; skipped");
    return;
  }
  Deployment d;
  const std::string mef_ca = (d.dir() / "mef" / "ca.pem").string();
  const auto pump_port = d.add_port("PUMP_PORT");
  write_file(d.dir() / "keys" / "pump.kpm", run_command({"openssl", "rand", "-hex", "32"}).output, 0600);
  const auto pump_kpm = (d.dir() / "keys" / "pump.kpm").string();
  // meter and pump get AE-ID certificates over EST; both gateways trust the MEF CA for peers.
  d.edit_config("mef", [&](std::string text) {
    text = std::regex_replace(text, std::regex("enrolee_id = \"CAE-meter\"\n"),
                              "enrolee_id = \"CAE-meter\"\ncertificate_enrolment = true\n");
    text = std::regex_replace(text, std::regex("targets = \\[\"CAE-valve\"\\]"),
                              "targets = [\"CAE-valve\", \"CAE-pump\", \"CAE-ghost\"]");
    return text + "\n[[mef.enrolee]]\nkpm_id = \"pump@mef.demo.test\"\nkpm_file = \"" + pump_kpm +
           "\"\nenrolee_id = \"CAE-pump\"\ntargets = [\"CAE-meter\"]\ncertificate_enrolment = true\n";
  });
  d.edit_config("a", [&](std::string text) {
    text = std::regex_replace(text, std::regex("kpm_file = \"([^\"]*)/meter.kpm\"\n"),
                              "kpm_file = \"$1/meter.kpm\"\ncertificate_enrolment = true\n");
    text = std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\ntrust_anchors = [\"" + mef_ca + "\"]\n");
    text = std::regex_replace(text, std::regex("(ae_id = \"CAE-valve\"\naddress = \"[^\"]*\"\n)"),
                              "$1credential = \"certificate\"\n");
    const std::string b_peer = "127.0.0.1:" + std::to_string(d.ports().at("B_PEER"));
    // ghost: an AE-ID B serves nothing for; the certificate session naming it must not reach valve or pump.
    return text + "\n[[peer.address]]\nae_id = \"CAE-pump\"\naddress = \"" + b_peer +
           "\"\ncredential = \"certificate\"\n\n[[peer.address]]\nae_id = \"CAE-ghost\"\naddress = \"" + b_peer +
           "\"\ncredential = \"certificate\"\n";
  });
  d.edit_config("b", [&](std::string text) {
    text = std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\ntrust_anchors = [\"" + mef_ca + "\"]\n");
    return text + "\n[[enrolee.ae]]\nid = \"CAE-pump\"\nendpoint = \"127.0.0.1:" + std::to_string(pump_port) +
           "\"\nkpm_id = \"pump@mef.demo.test\"\nkpm_file = \"" + pump_kpm +
           "\"\ncertificate_enrolment = true\n\n[[peer.policy]]\npeer = \"CAE-meter\"\nlocal_aes = [\"CAE-pump\"]\n"
           "methods = [\"GET\"]\n";
  });
  d.start("mef");
  d.start_valve();
  d.start_ae_server("pump", pump_port);
  d.start("b");
  d.start("a");
  REQUIRE(d.wait_enrolled("b", "CAE-valve"));
  REQUIRE(d.wait_enrolled("b", "CAE-pump"));  // pump's certificate: issued over EST after B started
  REQUIRE(d.wait_enrolled("a", "CAE-meter"));

  // Different values PUT straight to each server come back through A and B, each from its own AE.
  const auto valve_marker = put_marker_at(d.ports().at("VALVE_PORT"));
  const auto pump_marker = put_marker_at(pump_port);
  const auto from_pump = d.proxied_to("CAE-meter", "CAE-pump", "get", "example_data");
  INFO(from_pump.output);
  CHECK(from_pump.output.find(pump_marker) != std::string::npos);
  CHECK(from_pump.output.find(valve_marker) == std::string::npos);
  const auto from_valve = d.proxied_to("CAE-meter", "CAE-valve", "get", "example_data");
  INFO(from_valve.output);
  CHECK(from_valve.output.find(valve_marker) != std::string::npos);
  CHECK(from_valve.output.find(pump_marker) == std::string::npos);

  // Both went over X.509 sessions (no enrolment-key session), and B never restarted.
  const auto listed = d.ctl_json("b", {"sessions"});
  INFO(listed.dump());
  std::size_t x509_sessions = 0;
  bool psk_meter = false;
  for (const auto& s : listed["sessions"]) {
    if (s.value("peer_ae_id", "") != "CAE-meter") continue;
    x509_sessions += s.value("kind", "") == "x509" ? 1 : 0;
    psk_meter |= s.value("kind", "") == "psk";
  }
  CHECK(x509_sessions == 2);
  CHECK_FALSE(psk_meter);
  CHECK(d.running("b"));
  CHECK_FALSE(d.last_exit("b").has_value());

  // A name B presents no certificate for: the handshake is refused, nothing is delivered.
  const auto ghost = d.proxied_to("CAE-meter", "CAE-ghost", "get", "example_data");
  INFO(ghost.output);
  CHECK(ghost.output.find(valve_marker) == std::string::npos);
  CHECK(ghost.output.find(pump_marker) == std::string::npos);
  CHECK(ghost.output.find("5.02") != std::string::npos);
}

// End to end: a target whose AE-ID is not a DNS name (SP-relative "/in-cse/CAE-sp-pump"). Meter on gateway A names
// it percent-encoded in Proxy-Uri (PROTOCOL.md §6); A sends the AE's server name as SNI (ae-<base32 of SHA-256>,
// PROTOCOL.md §2), and B picks that AE's key and delivers to it, not to valve.
#include <catch2/catch.hpp>
#include <regex>

#include "dauth/crypto/identifiers.hpp"
#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

TEST_CASE("SP-relative target AE: percent-encoded in Proxy-Uri and reached by its mapped SNI over PSK", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  const std::string sp_pump = "/in-cse/CAE-sp-pump";
  Deployment d;
  const auto pump_port = d.add_port("PUMP_PORT");
  write_file(d.dir() / "keys" / "sp-pump.kpm", run_command({"openssl", "rand", "-hex", "32"}).output, 0600);
  const auto pump_kpm = (d.dir() / "keys" / "sp-pump.kpm").string();
  d.edit_config("mef", [&](std::string text) {
    text = std::regex_replace(text, std::regex("targets = \\[\"CAE-valve\"\\]"),
                              "targets = [\"CAE-valve\", \"" + sp_pump + "\"]");
    return text + "\n[[mef.enrolee]]\nkpm_id = \"sp-pump@mef.demo.test\"\nkpm_file = \"" + pump_kpm +
           "\"\nenrolee_id = \"" + sp_pump + "\"\ntargets = [\"CAE-meter\"]\n";
  });
  d.edit_config("a", [&](std::string text) {
    return text + "\n[[peer.address]]\nae_id = \"" + sp_pump + "\"\naddress = \"127.0.0.1:" +
           std::to_string(d.ports().at("B_PEER")) + "\"\n";
  });
  d.edit_config("b", [&](std::string text) {
    return text + "\n[[enrolee.ae]]\nid = \"" + sp_pump + "\"\nendpoint = \"127.0.0.1:" + std::to_string(pump_port) +
           "\"\nkpm_id = \"sp-pump@mef.demo.test\"\nkpm_file = \"" + pump_kpm +
           "\"\n\n[[peer.policy]]\npeer = \"CAE-meter\"\nlocal_aes = [\"" + sp_pump + "\"]\nmethods = [\"GET\"]\n";
  });
  start_all(d);
  d.start_ae_server("sp-pump", pump_port);
  REQUIRE(d.wait_enrolled("b", sp_pump));

  const auto valve_marker = put_marker(d);
  const auto pump_marker = put_marker_at(pump_port);
  const auto from_pump = d.proxied_to("CAE-meter", "%2Fin-cse%2FCAE-sp-pump", "get", "example_data");
  INFO(from_pump.output);
  CHECK(from_pump.output.find(pump_marker) != std::string::npos);
  CHECK(from_pump.output.find(valve_marker) == std::string::npos);
  // B's session from meter was set up for the mapped name; valve is still reached by its own (plain) name.
  CHECK(crypto::server_name_for_ae_id(sp_pump).rfind("ae-", 0) == 0);
  const auto from_valve = d.proxied("CAE-meter", "get", "example_data");
  INFO(from_valve.output);
  CHECK(from_valve.output.find(valve_marker) != std::string::npos);
  // A bad percent-encoding is refused by A with a reason, not forwarded.
  const auto bad = d.proxied_to("CAE-meter", "%2Gin-cse", "get", "example_data");
  INFO(bad.output);
  CHECK(bad.output.find("4.00") != std::string::npos);
}

// End to end over impaired paths (docs/impairment-relay.md): real dauthd processes (an MEF and gateways A and B)
// with dauth_impair_relay between two of them, fixed seeds. Outcomes are read from dauthctl --json and from what
// the stock coap-client prints.
#include <signal.h>

#include <catch2/catch.hpp>
#include <regex>
#include <string>

#include "e2e_support.hpp"
#include "impair_relay_process.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

// Points gateway A's route to CAE-valve at `port` (a relay in front of B's peer endpoint).
void route_a_to_valve_through(Deployment& d, std::uint16_t port) {
  const std::string b_peer = "127.0.0.1:" + std::to_string(d.ports().at("B_PEER"));
  d.edit_config("a", [&](std::string text) {
    return std::regex_replace(text, std::regex("address = \"" + b_peer + "\""),
                              "address = \"127.0.0.1:" + std::to_string(port) + "\"");
  });
}

// Points a gateway's enrolee at `port` (a relay in front of the MEF).
void enrol_through(Deployment& d, const std::string& node, std::uint16_t port) {
  const std::string mef = "127.0.0.1:" + std::to_string(d.ports().at("MEF_PORT"));
  d.edit_config(node, [&](std::string text) {
    return std::regex_replace(text, std::regex("mef_address = \"" + mef + "\""),
                              "mef_address = \"127.0.0.1:" + std::to_string(port) + "\"");
  });
}

// coap-client through gateway A with a budget of `seconds` for the answer.
CommandResult proxied_within(const Deployment& d, int seconds) {
  return run_command({"coap-client-notls", "-v", "6", "-B", std::to_string(seconds), "-m", "get", "-P",
                      "coap://127.0.0.1:" + std::to_string(d.ports().at("A_LOCAL")), "-O", "279,CAE-meter",
                      "coap://CAE-valve/example_data"});
}

}  // namespace

TEST_CASE("NAT rebinding: after gateway A's source port changes, A and B talk again within 5 s", "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  ImpairRelay nat(d.ports().at("B_PEER"), /*seed=*/1, ImpairProfile::none());
  route_a_to_valve_through(d, nat.port());
  start_all(d);
  const auto marker = put_marker(d);
  REQUIRE(proxied_within(d, 20).output.find(marker) != std::string::npos);  // A's session to B, through the NAT

  // The NAT forgets the mapping: A's datagrams now reach B from another port (B drops them: no session there),
  // and B's answers to the old port are lost.
  nat.rebind();
  const auto after = proxied_within(d, 5);
  INFO(after.output);
  CHECK(after.output.find(marker) != std::string::npos);
  CHECK(d.wait_for_log("a", "nothing heard from", 5));  // A ended the dead session; no request timeout waited out
  // No dead session is kept: A holds one live outgoing session to B, the new one.
  const auto sessions = d.ctl_json("a", {"sessions"});
  INFO(sessions.dump());
  CHECK(sessions["live"].value("client_sessions", 99) == 1);
}

TEST_CASE("PSK enrolment through 10 % loss each way with 100 +- 30 ms delay succeeds every time", "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  ImpairRelay lossy(d.ports().at("MEF_PORT"), /*seed=*/20261206, ImpairProfile::lossy(0.10, 100, 30));
  enrol_through(d, "a", lossy.port());
  d.start("mef");
  d.start("a");
  REQUIRE(d.wait_enrolled("a", "CAE-meter", 60));
  int enrolled = 0;
  constexpr int kAttempts = 5;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    const auto result = d.ctl("a", {"enrol", "CAE-meter", "--wait", "60"});
    INFO("attempt " << attempt << ": " << result.output);
    if (result.exit_code != 0) UNSCOPED_INFO("gateway A:\n" << d.run_log("a") << "\nMEF:\n" << d.run_log("mef"));
    CHECK(result.exit_code == 0);
    enrolled += result.exit_code == 0 ? 1 : 0;
  }
  CHECK(enrolled == kAttempts);
  const auto stats = lossy.stats();
  INFO("relay: up lost " << stats.at("up_dropped_loss") << " of " << stats.at("up_received") << ", down lost "
                         << stats.at("down_dropped_loss") << " of " << stats.at("down_received"));
  CHECK(stats.at("up_dropped_loss") + stats.at("down_dropped_loss") > 0);  // the path really lost datagrams
}

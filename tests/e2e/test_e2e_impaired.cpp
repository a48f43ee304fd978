// End to end over impaired paths (docs/impairment-relay.md): real dauthd processes (an MEF and gateways A and B)
// with dauth_impair_relay between two of them, fixed seeds. Outcomes are read from dauthctl --json and from what
// the stock coap-client prints.
#include <signal.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <regex>
#include <string>
#include <thread>

#include "dauth/transport/transport.hpp"
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

namespace {

std::size_t certificates_named(const nlohmann::json& listed, const std::string& id) {
  std::size_t n = 0;
  for (const auto& row : listed["credentials"]) n += row.value("kind", "") == "certificate" && row.value("id", "") == id;
  return n;
}

// Gateway B's certificate RSPF (device certificate, then EST for its AE-ID certificate) through `profile`: the
// first enrolment at start and `again` more with dauthctl must all succeed.
void certificate_rspf_through(const ImpairProfile& profile, std::uint64_t seed, int again) {
  Deployment d;
  ImpairRelay path(d.ports().at("MEF_PORT"), seed, profile);
  enrol_through(d, "b", path.port());
  d.start("mef");
  d.start("b");
  REQUIRE(d.wait_enrolled("b", "CAE-valve", 60));
  for (int attempt = 0; attempt < again; ++attempt) {
    const auto result = d.ctl("b", {"enrol", "CAE-valve", "--wait", "60"});
    INFO("attempt " << attempt << ": " << result.output);
    if (result.exit_code != 0) UNSCOPED_INFO("gateway B:\n" << d.run_log("b"));
    CHECK(result.exit_code == 0);
  }
  CHECK(certificates_named(d.ctl_json("b", {"credentials", "list"}), "CAE-valve") == 1);  // issued over EST
  const auto stats = path.stats();
  INFO("relay: lost " << stats.at("up_dropped_loss") + stats.at("down_dropped_loss") << ", too large "
                      << stats.at("up_dropped_mtu") + stats.at("down_dropped_mtu"));
  CHECK(stats.at("up_received") > 0);
}

}  // namespace

TEST_CASE("certificate RSPF with EST through 10 % loss each way with 50 ms delay", "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  certificate_rspf_through(ImpairProfile::lossy(0.10, 50, 0), /*seed=*/41, /*again=*/3);
}

TEST_CASE("certificate RSPF with EST over a path MTU of 1280 bytes and of 576 bytes", "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  for (const int mtu : {1280, 576}) {
    INFO("path MTU " << mtu);
    ImpairProfile profile = ImpairProfile::none();
    profile.up.mtu = mtu;
    profile.down.mtu = mtu;
    certificate_rspf_through(profile, /*seed=*/5, /*again=*/1);
  }
}

namespace {

// While the MEF is unusable for gateway B for `duration`, every proxied request from A to B is answered and both
// gateways' control sockets answer: B's feed and revocation subscriptions and key retrievals fail and retry
// meanwhile, and none of that may take B's peer service down.
void peer_service_stays_up(Deployment& d, std::chrono::seconds duration) {
  const auto marker = put_marker(d);
  const auto since = std::chrono::steady_clock::now();
  int answered = 0;
  int asked = 0;
  while (std::chrono::steady_clock::now() - since < duration) {
    ++asked;
    answered += proxied_within(d, 10).output.find(marker) != std::string::npos ? 1 : 0;
    CHECK(d.ctl("b", {"status"}).exit_code == 0);
    CHECK(d.ctl("a", {"status"}).exit_code == 0);
    std::this_thread::sleep_for(std::chrono::seconds(2));
  }
  INFO("answered " << answered << " of " << asked << " proxied requests");
  CHECK(answered == asked);
  CHECK(d.running("b"));
}

}  // namespace

TEST_CASE("a frozen MEF does not take gateway B's peer service or control socket down", "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_all(d);
  REQUIRE(d.proxied("CAE-meter", "get", "example_data").exit_code == 0);  // A -> B session and key in place
  d.signal("mef", SIGSTOP);
  peer_service_stays_up(d, std::chrono::seconds(25));  // past request_timeout: subscriptions time out and retry
  d.signal("mef", SIGCONT);
}

TEST_CASE("a 90 % lossy path to the MEF does not take gateway B's peer service down", "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  ImpairRelay lossy(d.ports().at("MEF_PORT"), /*seed=*/90, ImpairProfile::none());
  enrol_through(d, "b", lossy.port());
  start_all(d);
  REQUIRE(d.proxied("CAE-meter", "get", "example_data").exit_code == 0);
  lossy.set("loss", "0.9");
  // A new KeID naming the valve: the MEF's feed notification and B's key retrieval now cross the lossy path.
  REQUIRE(d.ctl("a", {"enrol", "CAE-intruder", "--wait", "30"}).exit_code == 0);
  peer_service_stays_up(d, std::chrono::seconds(25));
  const auto stats = lossy.stats();
  CHECK(stats.at("up_dropped_loss") + stats.at("down_dropped_loss") > 0);  // B and the MEF kept trying
}

TEST_CASE("PSK enrolment through 30 % bursty loss (mean burst 3 datagrams) succeeds every time", "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  ImpairRelay bursty(d.ports().at("MEF_PORT"), /*seed=*/77, ImpairProfile::bursty(0.30, 3));
  enrol_through(d, "a", bursty.port());
  d.start("mef");
  d.start("a");
  REQUIRE(d.wait_enrolled("a", "CAE-meter", 60));
  const auto again = d.ctl("a", {"enrol", "CAE-meter", "--wait", "60"});
  INFO(again.output);
  CHECK(again.exit_code == 0);
  const auto stats = bursty.stats();
  CHECK(stats.at("up_dropped_loss") + stats.at("down_dropped_loss") > 0);
}

// Two minutes without the MEF and without B: meanwhile the meter enrols again (a new KeID B has never seen) and
// its old KeID is revoked. Afterwards, without any operator action, B learns the revocation from its feed, fetches
// the new key on the first handshake, and the meter's requests reach the valve again.
TEST_CASE("after a 2-minute partition key retrieval, the revocation feed and proxied requests recover by themselves",
          "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  ImpairRelay b_to_mef(d.ports().at("MEF_PORT"), /*seed=*/3, ImpairProfile::none());
  ImpairRelay a_to_b(d.ports().at("B_PEER"), /*seed=*/4, ImpairProfile::none());
  enrol_through(d, "b", b_to_mef.port());
  route_a_to_valve_through(d, a_to_b.port());
  start_all(d);
  const auto marker = put_marker(d);
  REQUIRE(proxied_within(d, 20).output.find(marker) != std::string::npos);
  const std::string old_ke_id = d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}}).value("keId", "");
  REQUIRE_FALSE(old_ke_id.empty());

  b_to_mef.partition(true);
  a_to_b.partition(true);
  const auto cut_at = std::chrono::steady_clock::now();
  REQUIRE(d.ctl("a", {"enrol", "CAE-meter", "--wait", "60"}).exit_code == 0);  // A still reaches the MEF
  REQUIRE(d.ctl("mef", {"revoke", old_ke_id}).exit_code == 0);
  CHECK(proxied_within(d, 10).output.find(marker) == std::string::npos);  // really cut off
  std::this_thread::sleep_for(std::chrono::seconds(120) - (std::chrono::steady_clock::now() - cut_at));
  b_to_mef.partition(false);
  a_to_b.partition(false);

  bool reached = false;
  for (int round = 0; round < 30 && !reached; ++round) {
    reached = proxied_within(d, 10).output.find(marker) != std::string::npos;
  }
  CHECK(reached);
  // The revocation arrives with B's next subscription (its backoff after two minutes of failures is at most
  // about a minute) and removes the old key.
  CHECK(d.wait_for_log("b", "KeID " + old_ke_id + " revoked by MEF", 150));
  CHECK(d.running("a"));
  CHECK(d.running("b"));
}

TEST_CASE("requests to a frozen peer pile up to a bound, beyond it the local AE gets 5.03 at once", "[e2e][impaired]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_all(d);
  const auto marker = put_marker(d);
  REQUIRE(proxied_within(d, 20).output.find(marker) != std::string::npos);
  d.signal("b", SIGSTOP);

  // A local AE (a transport Node with plain credentials, as a stock client would be) sends 300 requests at once.
  transport::NodeConfig config;
  config.limits.plain_nstart = transport::kMaxNstart;
  auto created = transport::Node::create(std::move(config));
  REQUIRE(created.ok());
  auto ae = std::move(*created);
  constexpr int kSent = 300;
  int refused_at_once = 0;
  int other_answers = 0;
  for (int i = 0; i < kSent; ++i) {
    transport::Request request;
    request.method = transport::Method::get;
    request.proxy_uri = "coap://CAE-valve/example_data";
    request.originator = "CAE-meter";
    ae->request({"127.0.0.1", d.ports().at("A_LOCAL")}, transport::ClientCredentials::plain(), std::move(request),
                [&](Result<transport::Response> answer, const transport::Session*) {
                  const bool bounded = answer.ok() && answer->code == 503 &&
                                       std::string(answer->payload.begin(), answer->payload.end())
                                               .find("still unanswered") != std::string::npos;
                  (bounded ? refused_at_once : other_answers)++;
                });
  }
  ae->run_until([&] { return refused_at_once >= kSent - 256; }, std::chrono::seconds(20));
  INFO("5.03 at once: " << refused_at_once << ", other answers: " << other_answers);
  CHECK(refused_at_once == kSent - 256);
  CHECK(other_answers == 0);  // the 256 wait for the frozen B
  CHECK(d.ctl("a", {"status"}).exit_code == 0);
  d.signal("b", SIGCONT);
}

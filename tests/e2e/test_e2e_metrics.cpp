// dauthctl stats --prometheus from real dauthds (the MEF and gateway A of e2e_support's Deployment), parsed by
// prometheus_client's exposition parser (Debian's python3-prometheus-client, run by /usr/bin/python3), which
// raises on malformed text; tests/support/prometheus_families.py also requires # HELP and # TYPE for every family.
#include <catch2/catch.hpp>
#include <set>

#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

// The node's Prometheus text, checked and parsed: {"<family>": {"type", "help", "samples": [...]}}.
nlohmann::json prometheus_families(const Deployment& d, const std::string& node) {
  const auto text = d.ctl(node, {"stats", "--prometheus"});
  INFO(text.output);
  REQUIRE(text.exit_code == 0);
  const auto parsed =
      run_command({"/usr/bin/python3", DAUTH_SOURCE_DIR "/tests/support/prometheus_families.py"}, text.output);
  INFO(parsed.output);
  REQUIRE(parsed.exit_code == 0);
  return nlohmann::json::parse(parsed.output);
}

// The value of the family's sample with exactly these labels, or nullopt. The parser names a counter's family
// without its "_total".
std::optional<double> sample(const nlohmann::json& families, const std::string& family,
                             const std::map<std::string, std::string>& labels) {
  if (!families.contains(family)) return std::nullopt;
  for (const auto& s : families[family]["samples"]) {
    if (s["labels"].get<std::map<std::string, std::string>>() == labels) return s["value"].get<double>();
  }
  return std::nullopt;
}

// Label values are configured names and enum words: never an address or a stranger's identity (bounded
// cardinality, docs/metrics.md).
void check_no_addresses(const nlohmann::json& families) {
  for (const auto& [name, family] : families.items()) {
    CHECK((family["type"] == "counter" || family["type"] == "gauge"));
    for (const auto& s : family["samples"]) {
      for (const auto& [label, value] : s["labels"].items()) {
        INFO(name << "{" << label << "=" << value << "}");
        CHECK(value.get<std::string>().find("127.0.0.1") == std::string::npos);
        CHECK(value.get<std::string>().find("stranger") == std::string::npos);  // an identity nobody configured
      }
    }
  }
}

}  // namespace

TEST_CASE("stats --prometheus parses with HELP and TYPE for every family and has labels expiry gauges and build info",
          "[e2e][metrics]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  d.start("mef");
  d.start("a");
  REQUIRE(d.wait_enrolled("a", "CAE-meter"));

  const auto a = prometheus_families(d, "a");
  check_no_addresses(a);
  const std::string version = d.ctl_json("a", {"status"})["version"];
  CHECK(sample(a, "dauth_build_info", {{"version", version}}) == std::optional<double>(1));
  CHECK(a["dauth_build_info"]["type"] == "gauge");
  CHECK(a["dauth_uptime_seconds"]["help"] == "Seconds since dauthd started.");

  // Per local AE: its enrolment state and the seconds until its enrolment key expires (the MEF's default
  // lifetime is 30 days; the key was issued within the last minute).
  CHECK(sample(a, "dauth_enrolment_state", {{"ae", "CAE-meter"}, {"state", "enrolled"}}) == std::optional<double>(1));
  CHECK(sample(a, "dauth_enrolment_state", {{"ae", "CAE-meter"}, {"state", "failed"}}) == std::optional<double>(0));
  CHECK(sample(a, "dauth_enrolment_attempts", {{"ae", "CAE-meter"}}).value_or(0) >= 1);
  const auto expiry =
      sample(a, "dauth_credential_expires_in_seconds", {{"kind", "enrolment_key"}, {"owner", "CAE-meter"}});
  REQUIRE(expiry.has_value());
  CHECK(*expiry > 2592000 - 120);
  CHECK(*expiry <= 2592000);
  // Per node and failure kind, from zero; per configured peer.
  CHECK(a["dauth_transport_failures"]["type"] == "counter");
  for (const std::string node : {"enrolee", "peer"}) {
    for (const std::string kind :
         {"handshake_failed", "handshake_timeout", "request_rejected", "request_failed", "limit"}) {
      INFO(node << " " << kind);
      CHECK(sample(a, "dauth_transport_failures", {{"node", node}, {"kind", kind}}).has_value());
    }
  }
  CHECK(sample(a, "dauth_handshakes_completed", {{"node", "enrolee"}}).value_or(0) >= 1);
  CHECK(sample(a, "dauth_proxy_peer_requests", {{"peer", "CAE-valve"}}) == std::optional<double>(0));

  // The MEF: a stranger's handshake counted by kind (the log has its address and identity, the series not), its
  // own certificate and issuing CA, and its enrolment keys by state.
  const auto stranger = run_command({"coap-client-gnutls", "-B", "3", "-u", "stranger@mef.demo.test", "-k",
                                     "00112233445566778899aabbccddeeff",
                                     "coaps://127.0.0.1:" + std::to_string(d.ports().at("MEF_PORT")) + "/x"});
  INFO(stranger.output);
  const auto mef = prometheus_families(d, "mef");
  CHECK(sample(mef, "dauth_transport_failures", {{"node", "mef"}, {"kind", "handshake_failed"}}).value_or(0) >= 1);
  check_no_addresses(mef);
  const auto mef_certificate =
      sample(mef, "dauth_credential_expires_in_seconds", {{"kind", "mef_certificate"}, {"owner", "mef.demo.test"}});
  REQUIRE(mef_certificate.has_value());
  CHECK(*mef_certificate > 0);
  CHECK(sample(mef, "dauth_credential_expires_in_seconds", {{"kind", "mef_issuing_ca"}, {"owner", "mef.demo.test"}})
            .has_value());
  CHECK(sample(mef, "dauth_mef_enrolment_keys", {{"state", "valid"}}).value_or(0) >= 1);
  CHECK(sample(mef, "dauth_mef_issued_certificates", {{"state", "revoked"}}) == std::optional<double>(0));
  CHECK(sample(mef, "dauth_handshakes_completed", {{"node", "mef"}}).value_or(0) >= 1);

  // --json keeps the keys earlier versions had, next to the families.
  const auto json = d.ctl_json("a", {"stats"});
  CHECK(json["enrolee_handshakes_completed_total"].get<double>() >= 1);
  CHECK(json.contains("uptime_seconds"));
  CHECK(json["metrics"].is_array());
}

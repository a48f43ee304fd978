// One view of the state (issue 15, finding 5): dauthctl show / dump / --json and enrol --status on real dauthds.
// What an operator asks on day two: is the AE enrolled and until when, did the peer answer, what failed last and
// why -- on the gateway that failed and on the MEF that refused it. Assertions on --json and on dump's fields.
#include <signal.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <regex>
#include <sstream>
#include <thread>

#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

const nlohmann::json* row_with(const nlohmann::json& rows, const std::string& key, const std::string& value) {
  if (!rows.is_array()) return nullptr;
  for (const auto& row : rows) {
    if (row.value(key, "") == value) return &row;
  }
  return nullptr;
}

std::vector<std::vector<std::string>> dump_lines(const std::string& text) {
  std::vector<std::vector<std::string>> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> fields;
    std::size_t start = 0;
    for (;;) {
      const auto tab = line.find('\t', start);
      fields.push_back(line.substr(start, tab == std::string::npos ? std::string::npos : tab - start));
      if (tab == std::string::npos) break;
      start = tab + 1;
    }
    lines.push_back(std::move(fields));
  }
  return lines;
}

// dauthctl(1) "DUMP FORMAT": kind -> its fields after the kind (".TP", ".B kind", then the comma-separated names).
std::map<std::string, std::vector<std::string>> documented_dump_fields() {
  std::istringstream in(read_text_file(DAUTH_SOURCE_DIR "/docs/dauthctl.1"));
  std::map<std::string, std::vector<std::string>> kinds;
  std::string line;
  std::string kind;
  bool in_section = false;
  while (std::getline(in, line)) {
    if (line.rfind(".SH ", 0) == 0) in_section = line == ".SH DUMP FORMAT";
    if (!in_section) continue;
    if (line.rfind(".B ", 0) == 0) {
      kind = line.substr(3);
      continue;
    }
    if (line.rfind(".", 0) == 0) {
      kind.clear();
      continue;
    }
    if (kind.empty()) continue;
    std::istringstream names(line);
    std::string name;
    while (std::getline(names, name, ',')) {
      name.erase(0, name.find_first_not_of(' '));
      name.erase(name.find_last_not_of(' ') + 1);
      if (!name.empty()) kinds[kind].push_back(name);
    }
  }
  return kinds;
}

}  // namespace

TEST_CASE("dauthctl show, dump and enrol --status: enrolments, peers, refusals and the MEF's view of its enrolees",
          "[e2e][show]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_all(d);
  const auto marker = put_marker(d);
  const auto get = d.proxied("CAE-meter", "get", "example_data");
  INFO(get.output);
  REQUIRE(get.output.find(marker) != std::string::npos);
  // B's policy lets meter GET only: the PUT is refused by B (4.03), which A must show as a failure, not "ok".
  const auto put = d.proxied("CAE-meter", "put", "example_data", "overwritten");
  CHECK(put.output.find("4.03") != std::string::npos);

  // A wrong key for meter's KpmID at the MEF: the handshake fails there; the MEF names the enrolee it concerns.
  const auto wrong = run_command({"coap-client-openssl", "-B", "3", "-u", "meter@mef.demo.test", "-k",
                                  "not-the-key-of-meter-0123456789ab", "-m", "post",
                                  "coaps://127.0.0.1:" + std::to_string(d.ports().at("MEF_PORT")) + "/mef/enrolment"});
  INFO(wrong.output);

  // ---- gateway A ----
  const auto a = d.ctl_json("a", {"show"});
  const std::int64_t now = a.value("now", std::int64_t{0});
  CHECK(now > 0);
  CHECK(a["daemon"].value("state", "") == "running");
  const auto* meter = row_with(a["local_aes"], "ae_id", "CAE-meter");
  REQUIRE(meter != nullptr);
  CHECK(meter->value("state", "") == "enrolled");
  CHECK(meter->value("credential_kind", "") == "psk");
  CHECK(meter->value("credential", "") == "meter@mef.demo.test");
  CHECK(meter->value("ke_id", "").find("@mef.demo.test") != std::string::npos);
  CHECK(meter->value("expires_at", std::int64_t{0}) > now);
  CHECK(meter->value("next_attempt_at", std::int64_t{0}) > now);  // its renewal
  CHECK(meter->value("last_enrolled_at", std::int64_t{0}) > 0);
  CHECK(meter->value("last_enrolled_at", std::int64_t{0}) <= now);
  CHECK(meter->value("last_request_at", std::int64_t{0}) > 0);
  CHECK(meter->value("last_failure", "x").empty());
  CHECK(meter->value("sessions", 0) == 1);
  const auto* valve = row_with(a["peers"], "ae_id", "CAE-valve");
  REQUIRE(valve != nullptr);
  CHECK(valve->value("address", "") == "127.0.0.1:" + std::to_string(d.ports().at("B_PEER")));
  CHECK(valve->value("sessions", 0) == 1);
  CHECK(valve->value("last_handshake_at", std::int64_t{0}) > 0);
  CHECK(valve->value("last_success_at", std::int64_t{0}) > 0);
  CHECK(valve->value("last_failure_at", std::int64_t{0}) >= valve->value("last_success_at", std::int64_t{0}));
  CHECK(valve->value("last_failure", "").find("policy: CAE-meter may not PUT CAE-valve") != std::string::npos);
  CHECK(a["enrolees"].is_null());  // no MEF role
  // The peers verb no longer calls the policy refusal "ok".
  const auto peers = d.ctl_json("a", {"peers"});
  const auto* listed = row_with(peers["peers"], "ae_id", "CAE-valve");
  REQUIRE(listed != nullptr);
  CHECK(listed->value("last_outcome", "").rfind("refused: ", 0) == 0);
  // Its human rows split on spaces (a value with spaces is quoted) and show times, not epoch seconds.
  const auto peers_text = d.ctl("a", {"peers"}).output;
  INFO(peers_text);
  CHECK(peers_text.find("last_outcome=\"refused: ") != std::string::npos);
  CHECK(std::regex_search(peers_text, std::regex("last_at=20[0-9]{2}-[0-9]{2}-[0-9]{2}T[0-9:]{8}[+-][0-9]{4}")));

  // ---- gateway B: the remote AE it serves without configuring it as a peer ----
  const auto b = d.ctl_json("b", {"show"});
  const auto* caller = row_with(b["peers"], "ae_id", "CAE-meter");
  REQUIRE(caller != nullptr);
  CHECK(caller->value("sessions", 0) == 1);
  CHECK(caller->value("last_request_at", std::int64_t{0}) > 0);
  CHECK(caller->value("last_failure", "").find("policy denies PUT") != std::string::npos);
  const auto* served = row_with(b["local_aes"], "ae_id", "CAE-valve");
  REQUIRE(served != nullptr);
  CHECK(served->value("sessions", 0) == 1);
  CHECK(served->value("last_request_at", std::int64_t{0}) > 0);

  // ---- the MEF: per enrolee, the latest enrolment and the latest failure with its reason ----
  // (The refused handshake ends on the MEF's side a moment after the client gave up.)
  nlohmann::json mef;
  const nlohmann::json* enrolee = nullptr;
  for (int i = 0; i < 50; ++i) {
    mef = d.ctl_json("mef", {"show"});
    REQUIRE(mef["enrolees"].is_array());
    enrolee = row_with(mef["enrolees"], "enrolee_id", "CAE-meter");
    REQUIRE(enrolee != nullptr);
    if (enrolee->value("failures", 0) >= 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(enrolee->value("id", "") == "meter@mef.demo.test");
  CHECK(enrolee->value("enrolments", 0) >= 1);
  CHECK(enrolee->value("expires_at", std::int64_t{0}) > now);
  CHECK(enrolee->value("last_enrolled_at", std::int64_t{0}) > 0);
  CHECK(enrolee->value("last_ke_id", "") == meter->value("ke_id", ""));
  CHECK(enrolee->value("failures", 0) >= 1);
  CHECK(enrolee->value("last_failure", "").rfind("handshake failed", 0) == 0);
  const auto* valve_enrolee = row_with(mef["enrolees"], "enrolee_id", "CAE-valve");
  REQUIRE(valve_enrolee != nullptr);
  CHECK(valve_enrolee->value("failures", -1) == 0);

  // ---- dump: the documented fields, one line per object, no field with a tab ----
  const auto documented = documented_dump_fields();
  REQUIRE(documented.size() == 4);
  for (const char* node : {"a", "b", "mef"}) {
    const auto dump = d.ctl(node, {"dump"});
    INFO(node << ": " << dump.output);
    REQUIRE(dump.exit_code == 0);
    std::map<std::string, int> kinds;
    for (const auto& fields : dump_lines(dump.output)) {
      REQUIRE_FALSE(fields.empty());
      const auto doc = documented.find(fields[0]);
      REQUIRE(doc != documented.end());
      CHECK(fields.size() == doc->second.size() + 1);
      ++kinds[fields[0]];
    }
    CHECK(kinds["daemon"] == 1);
  }
  // Field order as documented, against the --json values.
  const auto a_dump = dump_lines(d.ctl("a", {"dump"}).output);
  const auto& ae_fields = documented.at("ae");
  const auto ae_line = std::find_if(a_dump.begin(), a_dump.end(),
                                    [](const auto& f) { return f.size() > 1 && f[0] == "ae" && f[1] == "CAE-meter"; });
  REQUIRE(ae_line != a_dump.end());
  for (std::size_t i = 0; i < ae_fields.size(); ++i) {
    INFO(ae_fields[i]);
    const auto& value = (*meter)[ae_fields[i]];
    if (ae_fields[i] == "last_failure") {
      CHECK((*ae_line)[i + 1] == "(none)");
    } else if (value.is_string()) {
      CHECK((*ae_line)[i + 1] == value.get<std::string>());
    } else if (ae_fields[i].find("_at") == std::string::npos && ae_fields[i] != "attempts") {
      CHECK((*ae_line)[i + 1] == value.dump());
    }
  }

  // ---- human show: relative times, plain dauthctl is show ----
  const auto human = d.ctl("a", {});
  INFO(human.output);
  CHECK(human.exit_code == 0);
  CHECK(human.output.find("local AE: CAE-meter") != std::string::npos);
  CHECK(std::regex_search(human.output, std::regex("expires in (29|30) days")));
  CHECK(std::regex_search(human.output, std::regex("latest handshake: ([0-9]+ (second|minute)s?(, )?)+ ago")));
  CHECK(human.output.find("latest failure: ") != std::string::npos);

  // ---- enrol --status reads only: no attempt starts, the KeID stays ----
  const auto before = d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}});
  const auto status = d.ctl("a", {"enrol", "--status", "CAE-meter"});
  INFO(status.output);
  CHECK(status.exit_code == 0);
  CHECK(status.output.find("CAE-meter: enrolled, KeID " + meter->value("ke_id", "")) != std::string::npos);
  const auto after = d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}});
  CHECK(after.value("attempts_started", 0) == before.value("attempts_started", -1));
  CHECK(after.value("keId", "") == before.value("keId", "x"));

  // ---- sessions lists live sessions only: after A restarts, B lists meter's new session, not the old one ----
  d.stop("a", SIGTERM);
  d.start("a");
  REQUIRE(d.wait_enrolled("a", "CAE-meter"));
  CHECK(d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos);
  std::size_t meter_sessions = 0;
  for (int i = 0; i < 50; ++i) {
    meter_sessions = 0;
    const auto listed_b = d.ctl_json("b", {"sessions"});
    for (const auto& s : listed_b["sessions"]) meter_sessions += s.value("peer_ae_id", "") == "CAE-meter";
    if (meter_sessions == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(meter_sessions == 1);
}

// End to end: what an operator sees at `journalctl -p warning` (dauthd(8), LOGGING):
// failures at warning, a flood of refused handshakes rate-limited with a count of the rest, the failing side's
// likely causes with the command to check them, and a gateway whose KeID was revoked enrolling again by itself.
#include <signal.h>

#include <catch2/catch.hpp>
#include <sstream>
#include <thread>

#include "dauth/transport/transport.hpp"
#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

// The lines a dauthd wrote at priority `least` or more urgent (sd-daemon prefixes "<0>" to "<7>").
std::vector<std::string> lines_at(const std::string& log, char least) {
  std::vector<std::string> selected;
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);) {
    if (line.size() >= 3 && line[0] == '<' && line[1] >= '0' && line[1] <= least && line[2] == '>') {
      selected.push_back(line);
    }
  }
  return selected;
}

// What `journalctl -p warning` shows.
std::vector<std::string> urgent_lines(const std::string& log) { return lines_at(log, '4'); }

bool any_contains(const std::vector<std::string>& lines, const std::string& text) {
  for (const auto& line : lines) {
    if (line.find(text) != std::string::npos) return true;
  }
  return false;
}

std::size_t count_containing(const std::vector<std::string>& lines, const std::string& text) {
  std::size_t n = 0;
  for (const auto& line : lines) n += line.find(text) != std::string::npos ? 1 : 0;
  return n;
}

}  // namespace

TEST_CASE("a gateway whose KeID was revoked enrols again by itself and every failure on the way is a warning",
          "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  // A second AE on gateway A whose KpmID the MEF does not know: the MEF refuses its enrolment in the handshake.
  const auto newbie_key = d.dir() / "keys" / "newbie.kpm";
  write_file(newbie_key, run_command({"openssl", "rand", "-hex", "32"}).output, 0600);
  d.edit_config("a", [&](std::string text) {
    return text + "\n[[enrolee.ae]]\nid = \"CAE-newbie\"\nkpm_id = \"newbie@mef.demo.test\"\nkpm_file = \"" +
           newbie_key.string() + "\"\n";
  });
  start_all(d);
  const auto marker = put_marker(d);
  REQUIRE(d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos);
  const std::string old_ke_id = d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}}).value("keId", "");
  REQUIRE_FALSE(old_ke_id.empty());

  REQUIRE(d.ctl("mef", {"revoke", old_ke_id}).exit_code == 0);
  REQUIRE(d.wait_for_log("b", "KeID " + old_ke_id + " revoked by MEF", 30));  // B dropped the key (its feed)
  // A's next request is refused by B; A asks the MEF, which refuses the KeID too, and enrols again; a later
  // request reaches the valve with the new KeID (before: A kept offering the revoked KeID for ever).
  bool reached = false;
  for (int round = 0; round < 20 && !reached; ++round) {
    reached = d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos;
    if (!reached) std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  INFO(d.run_log("a"));
  CHECK(reached);
  const std::string new_ke_id = d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}}).value("keId", "");
  CHECK_FALSE(new_ke_id.empty());
  CHECK(new_ke_id != old_ke_id);
  // The old KeID shows as revoked on the gateway (before: revoked_at=0).
  // (The mark is stored durably after the refusal is logged: wait for it rather than race the journal's flush.)
  std::int64_t old_revoked_at = 0;
  nlohmann::json credentials;
  for (int i = 0; i < 50 && old_revoked_at == 0; ++i) {
    if (i > 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    credentials = d.ctl_json("a", {"credentials", "list"});
    for (const auto& row : credentials["credentials"]) {
      if (row.value("id", "") == old_ke_id) old_revoked_at = row.value("revoked_at", std::int64_t{0});
    }
  }
  INFO(credentials.dump());
  CHECK(old_revoked_at > 0);

  // What `journalctl -p warning` shows on each machine (before: nothing, every line was <6>).
  const auto a_urgent = urgent_lines(d.run_log("a"));
  CHECK(any_contains(a_urgent, "enrolee KeID " + old_ke_id + " of CAE-meter: MEF mef.demo.test refuses it"));
  CHECK(any_contains(a_urgent, "likely: the peer refused KeID " + old_ke_id));
  // The failing side's diagnosis of a refused enrolment, with the command to check it.
  CHECK(any_contains(a_urgent, "enrol 'CAE-newbie' with MEF"));
  CHECK(any_contains(a_urgent, "likely: the MEF refused the handshake for PSK identity newbie@mef.demo.test: the "
                               "MEF does not know this KpmID (check `dauthctl enrolees list` on the MEF"));
  const auto b_urgent = urgent_lines(d.run_log("b"));
  CHECK(any_contains(b_urgent, "KeID " + old_ke_id + " revoked by MEF"));
  CHECK(any_contains(b_urgent, "event=handshake_failed"));  // B refused the revoked KeID
  const auto mef_urgent = urgent_lines(d.run_log("mef"));
  CHECK(any_contains(mef_urgent, "identity=\"newbie@mef.demo.test\""));  // the refused enrolment handshake
  CHECK(any_contains(mef_urgent, "identity=\"" + old_ke_id + "\""));      // A's KeID check, refused
  // The MEF's audit line is a notice: a decision kept for the record, not a failure.
  CHECK(d.run_log("mef").find("<5>rspf: mef audit: revoked KeID " + old_ke_id) != std::string::npos);
}

TEST_CASE("a flood of refused handshakes logs a few warnings and one count of the rest", "[e2e]") {
  Deployment d;
  d.start("mef");
  auto created = transport::Node::create(transport::NodeConfig{});
  REQUIRE(created.ok());
  auto client = std::move(*created);
  client->set_failure_observer([](const transport::Failure&) {});  // our side of the refusals: not the subject
  constexpr int kFlood = 40;
  int refused = 0;
  for (int i = 0; i < kFlood; ++i) {
    transport::Request request;
    request.path = {"mef", "revoked"};
    bool done = false;
    client->request({"127.0.0.1", d.ports().at("MEF_PORT")},
                    transport::ClientCredentials::psk("flood@mef.demo.test", SecretBuffer::random(32), "mef.demo.test"),
                    std::move(request), [&](Result<transport::Response> answer, const transport::Session*) {
                      refused += !answer.ok() && answer.error().code == Errc::unauthenticated ? 1 : 0;
                      done = true;
                    });
    client->run_until([&] { return done; }, std::chrono::seconds(10));
  }
  REQUIRE(refused == kFlood);
  d.stop("mef", SIGTERM);  // ends the interval: the count comes out before "dauthd stopped"

  INFO(d.run_log("mef"));
  const std::string refusal = "event=handshake_failed peer=127.0.0.1";
  const std::size_t shown = count_containing(lines_at(d.run_log("mef"), '7'), refusal);
  CHECK(shown >= 1);
  CHECK(shown <= 5);  // log::kBurst (before: one line per handshake, 40)
  const auto urgent = urgent_lines(d.run_log("mef"));
  CHECK(count_containing(urgent, refusal) == shown);  // every one at warning
  CHECK(any_contains(urgent, "<4>log: " + std::to_string(kFlood - static_cast<int>(shown)) +
                                 " more mef handshake_failed lines about flood@mef.demo.test suppressed"));
}

// Run-time credentials over the control socket (issues 4 and 5): real MEF and gateway dauthds (e2e_support's
// Deployment). Keys go from dauthctl genpsk to dauthctl enrolees add / credentials add as files and pipes, never
// argv or JSON; a new AE enrols with them without restart, and they survive a reload and kill -9 + restart.
// Outcomes come from dauthctl --json and exit codes; the logs and every dauthctl output are searched for the keys.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cctype>
#include <thread>

#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

std::string upper(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::toupper(c); });
  return text;
}

// dauthctl on a node's socket with `stdin_text` as standard input; all output kept for the no-key check.
CommandResult ctl_with_stdin(const Deployment& d, const std::string& node, std::vector<std::string> args,
                             const std::string& stdin_text, std::string& transcript) {
  std::vector<std::string> argv = {DAUTHCTL_PATH, "-s", (d.dir() / node / "control").string()};
  argv.insert(argv.end(), args.begin(), args.end());
  auto result = run_command(argv, stdin_text);
  transcript += result.output;
  return result;
}

CommandResult ctl(const Deployment& d, const std::string& node, std::vector<std::string> args, std::string& transcript) {
  auto result = d.ctl(node, std::move(args));
  transcript += result.output;
  return result;
}

nlohmann::json parsed(const CommandResult& r) {
  INFO(r.output);
  return nlohmann::json::parse(r.output);
}

// Waits until the AE's current enrolment attempt has finished (so that credentials.add is not refused as busy).
bool wait_attempt_done(const Deployment& d, const std::string& ae, int limit_seconds) {
  for (int i = 0; i < limit_seconds * 10; ++i) {
    const auto s = d.verb("a", "enrol.status", {{"ae_id", ae}});
    if (s.value("attempts_done", 0) >= 1 && s.value("state", "") != "enrolling") return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

bool has_row(const nlohmann::json& rows, const std::string& key, const std::string& value) {
  return std::any_of(rows.begin(), rows.end(), [&](const nlohmann::json& r) { return r.value(key, "") == value; });
}

}  // namespace

TEST_CASE("run-time keys: genpsk, enrolees add and credentials add enrol a new AE without restart, across reload and kill -9",
          "[e2e][control]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  std::string transcript;  // every dauthctl output, searched for key bytes at the end

  // genpsk: a 0600 hex key file, never overwritten; to stdout without --out.
  const auto configured_key = d.dir() / "keys" / "newbie.kpm";
  const auto generated = ctl(d, "a", {"--json", "genpsk", "--out", configured_key.string()}, transcript);
  REQUIRE(generated.exit_code == 0);
  CHECK(parsed(generated)["bytes"] == 32);
  struct stat st {};
  REQUIRE(::stat(configured_key.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  const std::string configured_hex = read_text_file(configured_key);
  CHECK(configured_hex.size() == 65);
  const auto again = ctl(d, "a", {"genpsk", "--out", configured_key.string()}, transcript);
  CHECK(again.exit_code == 2);
  CHECK_THAT(again.output, Catch::Contains("refusing to overwrite"));
  CHECK(read_text_file(configured_key) == configured_hex);
  const auto piped = run_command({DAUTHCTL_PATH, "genpsk"});  // kept out of the transcript: it is the key itself
  REQUIRE(piped.exit_code == 0);
  const std::string runtime_hex = piped.output;
  REQUIRE(runtime_hex.size() == 65);
  const auto runtime_key = d.dir() / "keys" / "newbie2.kpm";
  write_file(runtime_key, runtime_hex, 0600);

  // Gateway A has a new AE whose configured KpmID the MEF does not know: its enrolment fails.
  d.edit_config("a", [&](std::string text) {
    return text + "\n[[enrolee.ae]]\nid = \"CAE-newbie\"\nkpm_id = \"newbie@mef.demo.test\"\nkpm_file = \"" +
           configured_key.string() + "\"\n";
  });
  d.start("mef");
  d.start("a");
  REQUIRE(wait_attempt_done(d, "CAE-newbie", 90));
  CHECK_FALSE(d.verb("a", "enrol.status", {{"ae_id", "CAE-newbie"}})["last_error"].is_null());

  // The MEF learns a new enrolee at run time, its key through a pipe (stdin).
  const auto added = ctl_with_stdin(d, "mef",
                                    {"--json", "enrolees", "add", "--kpm-id", "newbie2@mef.demo.test", "--psk-file", "-",
                                     "--enrolee", "CAE-newbie", "--target", "CAE-valve"},
                                    runtime_hex, transcript);
  REQUIRE(added.exit_code == 0);
  CHECK(parsed(added)["origin"] == "dauthctl");
  CHECK(parsed(added)["targets"] == nlohmann::json::array({"CAE-valve"}));
  // A configured row belongs to the configuration file.
  const auto configured_row = ctl_with_stdin(
      d, "mef", {"--json", "enrolees", "add", "--kpm-id", "meter@mef.demo.test", "--psk-file", "-", "--enrolee",
                 "CAE-meter"},
      runtime_hex, transcript);
  CHECK(configured_row.exit_code == 1);
  CHECK(parsed(configured_row)["code"] == "exists");

  // Gateway A: the new credential for the configured AE, from a key file passed open; then enrol without restart.
  const auto no_ae = ctl(d, "a", {"--json", "credentials", "add", "--kpm-id", "x@mef.demo.test", "--ae", "CAE-nobody",
                                  "--psk-file", runtime_key.string()}, transcript);
  CHECK(no_ae.exit_code == 1);
  CHECK(parsed(no_ae)["code"] == "not_found");
  const auto credential = ctl(d, "a", {"--json", "credentials", "add", "--kpm-id", "newbie2@mef.demo.test", "--ae",
                                       "CAE-newbie", "--psk-file", runtime_key.string()}, transcript);
  REQUIRE(credential.exit_code == 0);
  CHECK(parsed(credential)["kpm_id"] == "newbie2@mef.demo.test");
  const auto enrolled = ctl(d, "a", {"--json", "enrol", "CAE-newbie", "--wait", "60"}, transcript);
  INFO(d.run_log("a"));
  REQUIRE(enrolled.exit_code == 0);
  CHECK(parsed(enrolled)["last_error"].is_null());

  // Without a descriptor the daemon refuses and says how keys travel.
  const auto raw = control_exchange(d.dir() / "a" / "control",
                                    "{\"verb\":\"credentials.add\",\"args\":{\"kpm_id\":\"newbie3@mef.demo.test\","
                                    "\"ae_id\":\"CAE-newbie\",\"key_fd\":0}}\n");
  CHECK_THAT(raw, Catch::Contains("no file descriptor came with the request"));

  // Reload keeps both run-time rows; the AE enrols again with them.
  CHECK(d.verb("mef", "reload", nlohmann::json::object())["last_reload"]["ok"] == true);
  CHECK(d.verb("a", "reload", nlohmann::json::object())["last_reload"]["ok"] == true);
  CHECK(has_row(d.ctl_json("mef", {"enrolees", "list"})["enrolees"], "id", "newbie2@mef.demo.test"));
  CHECK(has_row(d.ctl_json("a", {"credentials", "list"})["credentials"], "id", "newbie2@mef.demo.test"));
  CHECK(ctl(d, "a", {"enrol", "CAE-newbie", "--wait", "60"}, transcript).exit_code == 0);

  // kill -9 and restart: both rows come back from the key stores, and the AE bootstraps with the run-time key.
  d.stop("a", SIGKILL);
  d.stop("mef", SIGKILL);
  d.start("mef");
  d.start("a");
  const auto listed = d.ctl_json("mef", {"enrolees", "list"})["enrolees"];
  CHECK(has_row(listed, "id", "newbie2@mef.demo.test"));
  for (const auto& row : listed) {
    if (row["id"] == "meter@mef.demo.test") CHECK(row["origin"] == "configuration");
  }
  REQUIRE(d.wait_enrolled("a", "CAE-newbie", 60));
  CHECK(ctl(d, "a", {"enrol", "CAE-newbie", "--wait", "60"}, transcript).exit_code == 0);

  // credentials list works on the MEF-only dauthd too; removal of configured ids is refused, of run-time ones done.
  CHECK(has_row(d.ctl_json("mef", {"credentials", "list"})["credentials"], "id", "newbie2@mef.demo.test"));
  CHECK(ctl(d, "a", {"credentials", "remove", "newbie@mef.demo.test"}, transcript).exit_code == 2);
  const auto removed = ctl(d, "a", {"--json", "credentials", "remove", "newbie2@mef.demo.test"}, transcript);
  REQUIRE(removed.exit_code == 0);
  CHECK(parsed(removed)["now_uses"] == "newbie@mef.demo.test");
  CHECK(ctl(d, "mef", {"enrolees", "remove", "newbie2@mef.demo.test"}, transcript).exit_code == 0);
  CHECK_FALSE(has_row(d.ctl_json("mef", {"enrolees", "list"})["enrolees"], "id", "newbie2@mef.demo.test"));

  // No key byte in any log or dauthctl output.
  d.stop("a", SIGTERM);
  d.stop("mef", SIGTERM);
  const std::string everything = d.all_logs() + transcript;
  for (const std::string& hex : {configured_hex.substr(0, 64), runtime_hex.substr(0, 64)}) {
    CHECK(everything.find(hex) == std::string::npos);
    CHECK(everything.find(upper(hex)) == std::string::npos);
    CHECK(everything.find(hex.substr(0, 16)) == std::string::npos);
  }
}

TEST_CASE("shutdown_timeout: a request still in flight is answered 5.03 instead of timing out", "[e2e][control][drain]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  d.insert_config_line("b", "[daemon]", "shutdown_timeout = 1");
  // The valve: a UDP socket that takes requests and never answers, so B's delivery stays in flight.
  const int valve = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  REQUIRE(valve >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(d.ports().at("VALVE_PORT"));
  REQUIRE(::bind(valve, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
  timeval timeout{60, 0};
  ::setsockopt(valve, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  d.start("mef");
  d.start("b");
  d.start("a");
  REQUIRE(d.wait_enrolled("a", "CAE-meter"));
  REQUIRE(d.wait_enrolled("b", "CAE-valve"));

  CommandResult answer;
  std::thread client([&] { answer = d.proxied("CAE-meter", "get", "never"); });
  char datagram[1500];
  const bool delivered = ::recv(valve, datagram, sizeof datagram, 0) > 0;  // B is delivering to the valve now
  if (delivered) d.signal("b", SIGTERM);
  client.join();
  ::close(valve);
  REQUIRE(delivered);
  INFO(answer.output);
  // B answered the abandoned delivery; A relayed it to the local AE (without shutdown_timeout's answer the client
  // would wait out its own 20 s and print no code).
  CHECK(answer.output.find("5.03") != std::string::npos);
  CHECK(d.wait_exit("b", std::chrono::seconds(30)) == std::optional<int>(0));
}

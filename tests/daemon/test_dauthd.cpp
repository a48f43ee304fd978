// End to end: the real dauthd and dauthctl binaries, a temp config, state directory and control socket, and a
// real AF_UNIX datagram socket as $NOTIFY_SOCKET. Assertions use --json and the sd_notify messages, never log text
// (except the check that no log carries key bytes).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "daemon_process.hpp"
#include "dauth/crypto/keystore.hpp"
#include "loopback_ports.hpp"
#include "support.hpp"

using dauth::test::CommandResult;
using dauth::test::DaemonProcess;
using dauth::test::NotifyListener;
using dauth::test::run_command;
using dauth::test::TempDir;

namespace {

const std::string kMasterHex = "5f1e0c9a7b3d2e8f4a6c1b0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f";
const std::string kKpmHex = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

// A temp deployment: config, state directory, master key and a Kpm file, all under one TempDir.
struct Deployment {
  TempDir dir;
  std::filesystem::path config = dir / "dauthd.toml";
  std::filesystem::path socket = dir / "control";
  std::filesystem::path log = dir / "dauthd.log";
  std::uint16_t mef_port = dauth::test::free_loopback_port();  // the MEF role binds mef.listen for real

  Deployment() {
    std::filesystem::create_directory(dir / "state");
    std::filesystem::permissions(dir / "state", std::filesystem::perms::owner_all,
                                 std::filesystem::perm_options::replace);
    dauth::test::write_file(dir / "master.key", kMasterHex + "\n", 0600);
    dauth::test::write_file(dir / "meter.kpm", kKpmHex + "\n", 0600);
    write_config("info");
  }

  std::string config_text(const std::string& log_level) const {
    return "[daemon]\n"
           "state_directory = \"" + (dir / "state").string() + "\"\n"
           "control_socket = \"" + socket.string() + "\"\n"
           "master_key_source = \"file\"\n"
           "master_key_file = \"" + (dir / "master.key").string() + "\"\n"
           "log_level = \"" + log_level + "\"\n"
           "\n[mef]\nfqdn = \"mef.example.net\"\nlisten = \"127.0.0.1:" + std::to_string(mef_port) + "\"\n"
           "\n[[mef.enrolee]]\nkpm_id = \"meter01@mef.example.net\"\n"
           "kpm_file = \"" + (dir / "meter.kpm").string() + "\"\nenrolee_id = \"CAE-meter\"\n";
  }
  void write_config(const std::string& log_level) const {
    dauth::test::write_file(config, config_text(log_level), 0600);
  }

  CommandResult ctl(std::vector<std::string> args) const {
    std::vector<std::string> argv = {DAUTHCTL_PATH, "-s", socket.string()};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv);
  }
  nlohmann::json status() const {
    const auto r = ctl({"--json", "status"});
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return nlohmann::json::parse(r.output);
  }
};

// Every log this file's daemons wrote is checked for the key bytes (docs/conventions.md §9).
void check_no_key_bytes(const std::string& text) {
  CHECK(text.find(kMasterHex) == std::string::npos);
  CHECK(text.find(kKpmHex) == std::string::npos);
}

}  // namespace

TEST_CASE("dauthd serves status, survives a bad reload, reloads a good one, and stops on SIGTERM", "[dauthd]") {
  Deployment d;
  NotifyListener notify(d.dir / "notify");
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {notify.environment()}, d.log);

  const auto ready = notify.wait_for("READY=1");
  INFO(dauth::test::read_text_file(d.log));
  REQUIRE(ready.has_value());
  CHECK_THAT(*ready, Catch::Contains("STATUS=running; roles: mef"));
  // READY=1 comes after the socket is bound: no polling needed.
  auto status = d.status();
  CHECK(status["state"] == "running");
  CHECK(status["pid"] == daemon.pid());
  CHECK(status["roles"] == nlohmann::json{{"enrolee", false}, {"mef", true}, {"peer", false}});
  CHECK(status["keys_loaded"] == 2);  // master key + one Kpm
  CHECK(status["reloads"] == 0);
  CHECK(status["last_reload"].is_null());
  struct stat st {};
  REQUIRE(::lstat(d.socket.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  // Plain `dauthctl` is `dauthctl status`.
  const auto plain = d.ctl({});
  CHECK(plain.exit_code == 0);
  CHECK_THAT(plain.output, Catch::Contains("pid " + std::to_string(daemon.pid())));

  SECTION("a broken config on SIGHUP keeps the old one and reports file:line") {
    dauth::test::write_file(d.config, d.config_text("info") + "[peer]\nidle_timeout = 0\n", 0600);
    daemon.signal(SIGHUP);
    REQUIRE(notify.wait_for("RELOADING=1").has_value());
    const auto after = notify.wait_for("READY=1");
    REQUIRE(after.has_value());
    CHECK_THAT(*after, Catch::Contains("last reload failed, old configuration kept"));
    status = d.status();
    CHECK(status["reload_failures"] == 1);
    CHECK(status["reloads"] == 0);
    CHECK(status["roles"]["peer"] == false);  // still the old configuration
    REQUIRE(status["last_reload"].is_object());
    CHECK(status["last_reload"]["ok"] == false);
    CHECK_THAT(status["last_reload"]["error"].get<std::string>(),
               Catch::Contains(d.config.string() + ":17:16: peer.idle_timeout = 0: must be 1–86400 seconds"));

    // A key file that became group-readable is refused at reload too (fail closed, keep the old keys).
    d.write_config("info");
    ::chmod((d.dir / "meter.kpm").c_str(), 0644);
    daemon.signal(SIGHUP);
    REQUIRE(notify.wait_for("RELOADING=1").has_value());
    REQUIRE(notify.wait_for("READY=1").has_value());
    status = d.status();
    CHECK(status["reload_failures"] == 2);
    CHECK_THAT(status["last_reload"]["error"].get<std::string>(), Catch::Contains("mode 0644"));
    ::chmod((d.dir / "meter.kpm").c_str(), 0600);
  }

  SECTION("a good config on SIGHUP is applied") {
    d.write_config("debug");
    daemon.signal(SIGHUP);
    REQUIRE(notify.wait_for("RELOADING=1").has_value());
    const auto after = notify.wait_for("READY=1");
    REQUIRE(after.has_value());
    CHECK_THAT(*after, Catch::Contains("reloaded"));
    status = d.status();
    CHECK(status["reloads"] == 1);
    CHECK(status["log_level"] == "debug");
    CHECK(status["last_reload"]["ok"] == true);
  }

  daemon.signal(SIGTERM);
  const auto stopping = notify.wait_for("STOPPING=1");
  REQUIRE(stopping.has_value());
  const auto code = daemon.wait();
  REQUIRE(code.has_value());
  CHECK(*code == 0);
  CHECK_FALSE(std::filesystem::exists(d.socket));
  // After it is gone, dauthctl says so with exit code 3.
  const auto gone = d.ctl({"--json", "status"});
  CHECK(gone.exit_code == 3);
  CHECK_THAT(gone.output, Catch::Contains("cannot reach dauthd at " + d.socket.string()));
  check_no_key_bytes(dauth::test::read_text_file(d.log));
}

TEST_CASE("a restart writes none of the unchanged configured rows to the key store, a changed one it does",
          "[dauthd]") {
  Deployment d;
  const auto fdatasyncs_after_start = [&](const std::string& name) -> std::int64_t {
    NotifyListener notify(d.dir / ("notify-" + name));
    DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {notify.environment()}, d.log);
    INFO(dauth::test::read_text_file(d.log));
    REQUIRE(notify.wait_for("READY=1").has_value());
    const auto stats = d.ctl({"--json", "stats"});
    REQUIRE(stats.exit_code == 0);
    daemon.signal(SIGTERM);
    REQUIRE(daemon.wait().has_value());
    return nlohmann::json::parse(stats.output).value("keystore_fdatasync_total", std::int64_t{-1});
  };
  CHECK(fdatasyncs_after_start("first") == 1);  // the one [[mef.enrolee]] row goes into the new store
  CHECK(fdatasyncs_after_start("again") == 0);  // unchanged: nothing written (it was one fdatasync per row)
  dauth::test::write_file(d.config, d.config_text("info") + "targets = [\"CAE-valve\"]\n", 0600);
  CHECK(fdatasyncs_after_start("changed") == 1);
  check_no_key_bytes(dauth::test::read_text_file(d.log));
}

TEST_CASE("a reload that fails after the file parsed changes no key table and keeps the old configuration",
          "[dauthd]") {
  // The Enrolee role next to the MEF: a local AE with a configured bootstrap key (a BootstrapKeyRecord).
  Deployment d;
  const std::string enrolee_section = "\n[enrolee]\nmef_fqdn = \"mef.example.net\"\nmef_address = \"127.0.0.1:" +
                                      std::to_string(d.mef_port) + "\"\nlocal_listen = \"127.0.0.1:" +
                                      std::to_string(dauth::test::free_loopback_port()) + "\"\n";
  const auto meter_ae = [&](const std::string& kpm_file) {
    return "\n[[enrolee.ae]]\nid = \"CAE-gauge\"\nkpm_id = \"gauge01@mef.example.net\"\nkpm_file = \"" +
           (d.dir / kpm_file).string() + "\"\n";
  };
  dauth::test::write_file(d.config, d.config_text("info") + enrolee_section + meter_ae("meter.kpm"), 0600);
  NotifyListener notify(d.dir / "notify");
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {notify.environment()}, d.log);
  INFO(dauth::test::read_text_file(d.log));
  REQUIRE(notify.wait_for("READY=1").has_value());
  const auto credentials = [&] {
    const auto r = d.ctl({"--json", "credentials", "list"});
    REQUIRE(r.exit_code == 0);
    return nlohmann::json::parse(r.output)["credentials"];
  };
  const auto before = credentials();
  const auto fingerprint_of = [](const nlohmann::json& rows, const std::string& id) {
    for (const auto& row : rows) {
      if (row["id"] == id) return row["fingerprint"].get<std::string>();
    }
    return std::string("(absent)");
  };
  REQUIRE(fingerprint_of(before, "gauge01@mef.example.net") != "(absent)");

  // Valid TOML and valid rules: a new key for gauge01 (a different file), and a second AE whose certificate file
  // does not exist, which the reload finds out only in the roles, after the first AE's record was built
  // (--check-config names it beforehand).
  const std::string other_key(64, 'c');
  dauth::test::write_file(d.dir / "gauge-new.kpm", other_key + "\n", 0600);
  dauth::test::write_file(d.config,
                          d.config_text("debug") + enrolee_section + "mef_trust_anchor = \"" +
                              (d.dir / "mef-ca.pem").string() + "\"\n" + meter_ae("gauge-new.kpm") +
                              "\n[[enrolee.ae]]\nid = \"CAE-valve\"\ncertificate_file = \"" +
                              (d.dir / "missing.pem").string() + "\"\nprivate_key_file = \"" +
                              (d.dir / "missing.key").string() + "\"\n",
                          0600);
  const auto checked = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
  CHECK(checked.exit_code == 2);
  CHECK_THAT(checked.output, Catch::Contains((d.dir / "missing.pem").string() + ": user ") &&
                                 Catch::Contains("cannot read it: No such file or directory"));
  daemon.signal(SIGHUP);
  REQUIRE(notify.wait_for("RELOADING=1").has_value());
  const auto after_reload = notify.wait_for("READY=1");
  REQUIRE(after_reload.has_value());
  CHECK_THAT(*after_reload, Catch::Contains("last reload failed, old configuration kept"));

  auto status = d.status();
  CHECK(status["state"] == "running");
  CHECK(status["reload_failures"] == 1);
  CHECK_THAT(status["last_reload"]["error"].get<std::string>(),
             Catch::Contains("enrolee.ae CAE-valve: certificate_file"));
  CHECK(status["reloads"] == 0);
  CHECK(status["log_level"] == "info");  // the old configuration
  const auto after = credentials();
  CHECK(fingerprint_of(after, "gauge01@mef.example.net") == fingerprint_of(before, "gauge01@mef.example.net"));
  CHECK(after == before);

  // dauthctl reload reports the same refusal, and still nothing changes.
  const auto reload = d.ctl({"--json", "reload"});
  CHECK(reload.exit_code == 1);
  CHECK_THAT(reload.output, Catch::Contains("enrolee.ae CAE-valve: certificate_file"));
  CHECK(credentials() == before);
  status = d.status();
  CHECK(status["reload_failures"] == 2);

  daemon.signal(SIGTERM);
  CHECK(daemon.wait() == std::optional<int>(0));
  check_no_key_bytes(dauth::test::read_text_file(d.log));
}

TEST_CASE("an enrolee table row from the file and from dauthctl enrolees add breaks one rule with one message",
          "[dauthd][control]") {
  Deployment d;
  dauth::test::write_file(d.dir / "pump.kpm", std::string(64, 'b') + "\n", 0600);
  const auto row = [&](const std::string& kpm_id, const std::string& targets) {
    return "\n[[mef.enrolee]]\nkpm_id = \"" + kpm_id + "\"\nkpm_file = \"" + (d.dir / "pump.kpm").string() +
           "\"\nenrolee_id = \"CAE-pump\"\ntargets = " + targets + "\n";
  };
  const auto check_config = [&](const std::string& extra) {
    const std::filesystem::path file = d.dir / "candidate.toml";
    dauth::test::write_file(file, d.config_text("info") + extra, 0600);
    return run_command({DAUTHD_PATH, "--check-config", "-c", file.string()});
  };
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {}, d.log);
  REQUIRE(dauth::test::wait_for_control_socket(d.socket));
  const auto add = [&](const std::string& kpm_id, const std::vector<std::string>& targets) {
    std::vector<std::string> args = {"enrolees", "add", "--enrolee", "CAE-pump", "--kpm-id", kpm_id,
                                     "--psk-file", (d.dir / "pump.kpm").string()};
    for (const auto& target : targets) {
      args.push_back("--target");
      args.push_back(target);
    }
    return d.ctl(args);
  };

  // A KpmID of another MEF.
  const std::string other_mef = "KpmID 'pump@other.example.net' names MEF other.example.net, not mef.example.net";
  const auto by_file = check_config(row("pump@other.example.net", "[]"));
  CHECK(by_file.exit_code == 2);
  CHECK_THAT(by_file.output, Catch::Contains("mef.enrolee[1].kpm_id = \"pump@other.example.net\": " + other_mef));
  const auto by_verb = add("pump@other.example.net", {});
  CHECK(by_verb.exit_code == 2);
  CHECK_THAT(by_verb.output, Catch::Contains("enrolees.add: kpm_id: " + other_mef));

  // A target listed twice: the file always refused it; the verb stored it.
  const auto twice_by_file = check_config(row("pump@mef.example.net", "[\"CAE-valve\", \"CAE-valve\"]"));
  CHECK(twice_by_file.exit_code == 2);
  CHECK_THAT(twice_by_file.output, Catch::Contains("listed twice"));
  const auto twice_by_verb = add("pump@mef.example.net", {"CAE-valve", "CAE-valve"});
  CHECK(twice_by_verb.exit_code == 2);
  CHECK_THAT(twice_by_verb.output, Catch::Contains("enrolees.add: targets: target 'CAE-valve' listed twice"));
  const auto rows = nlohmann::json::parse(d.ctl({"--json", "enrolees", "list"}).output)["enrolees"];
  CHECK(rows.size() == 1);  // only the configured row

  // The MEF's FQDN compares case-insensitively (a DNS name) on both paths.
  CHECK(check_config(row("pump@MEF.example.net", "[]")).exit_code == 0);
  CHECK(add("pump@MEF.example.net", {}).exit_code == 0);

  daemon.signal(SIGTERM);
  CHECK(daemon.wait() == std::optional<int>(0));
}

TEST_CASE("a local AE bootstrap key from the file and from dauthctl credentials add meets one rule",
          "[dauthd][control]") {
  Deployment d;
  const auto config_with = [&](const std::string& kpm_id) {
    return d.config_text("info") + "\n[enrolee]\nmef_fqdn = \"mef.example.net\"\nmef_address = \"127.0.0.1:" +
           std::to_string(d.mef_port) + "\"\nlocal_listen = \"127.0.0.1:" + std::to_string(dauth::test::free_loopback_port()) +
           "\"\n\n[[enrolee.ae]]\nid = \"CAE-gauge\"\nkpm_id = \"" + kpm_id + "\"\nkpm_file = \"" +
           (d.dir / "meter.kpm").string() + "\"\n";
  };
  // An FQDN that differs in case only names the same MEF: the file refused it, dauthctl credentials add took it.
  dauth::test::write_file(d.config, config_with("gauge01@MEF.example.net"), 0600);
  const auto accepted = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
  INFO(accepted.output);
  CHECK(accepted.exit_code == 0);

  dauth::test::write_file(d.config, config_with("gauge01@other.example.net"), 0600);
  const std::string other_mef = "KpmID 'gauge01@other.example.net' names MEF other.example.net, not mef.example.net";
  const auto refused = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
  CHECK(refused.exit_code == 2);
  CHECK_THAT(refused.output, Catch::Contains(other_mef));

  dauth::test::write_file(d.config, config_with("gauge01@mef.example.net"), 0600);
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {}, d.log);
  REQUIRE(dauth::test::wait_for_control_socket(d.socket));
  dauth::test::write_file(d.dir / "new.kpm", std::string(64, 'd') + "\n", 0600);
  const auto by_verb = d.ctl({"credentials", "add", "--kpm-id", "gauge01@other.example.net", "--ae", "CAE-gauge",
                              "--psk-file", (d.dir / "new.kpm").string()});
  CHECK(by_verb.exit_code == 2);
  CHECK_THAT(by_verb.output, Catch::Contains("credentials.add: " + other_mef));

  daemon.signal(SIGTERM);
  CHECK(daemon.wait() == std::optional<int>(0));
}

TEST_CASE("the watchdog is pinged when WATCHDOG_USEC is set", "[dauthd]") {
  Deployment d;
  NotifyListener notify(d.dir / "notify");
  // 200 ms timeout: pings every 100 ms. Only their arrival is checked, not their timing.
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {notify.environment(), "WATCHDOG_USEC=200000"},
                       d.log, /*with_watchdog_pid=*/true);
  REQUIRE(notify.wait_for("READY=1").has_value());
  REQUIRE(notify.wait_for("WATCHDOG=1").has_value());
  REQUIRE(notify.wait_for("WATCHDOG=1").has_value());
  CHECK(d.status()["watchdog_usec"] == 200000);
  daemon.signal(SIGTERM);
  CHECK(daemon.wait() == std::optional<int>(0));
}

TEST_CASE("the control socket answers every failure in one shape and bounds line length", "[dauthd][control]") {
  Deployment d;
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {}, d.log);
  REQUIRE(dauth::test::wait_for_control_socket(d.socket));

  const auto reply = [&](const std::string& bytes) {
    const auto text = dauth::test::control_exchange(d.socket, bytes);
    INFO(text);
    REQUIRE(!text.empty());
    return nlohmann::json::parse(text.substr(0, text.find('\n')));
  };
  CHECK(reply("{\"verb\":\"status\"}\n")["ok"] == true);
  const auto malformed = reply("{not json\n");
  CHECK(malformed["ok"] == false);
  CHECK(malformed["code"] == "parse");
  const auto unknown = reply("{\"verb\":\"frobnicate\"}\n");
  CHECK(unknown["code"] == "invalid_argument");
  CHECK_THAT(unknown["error"].get<std::string>(), Catch::StartsWith("unknown verb 'frobnicate'; known: "));
  CHECK(reply("{\"verb\":\"status\",\"args\":[1]}\n")["error"] == "status: \"args\" must be an object");

  // 70 000 bytes without a newline: refused with "limit", then the connection is closed.
  const std::string oversized(70000, 'x');
  const auto text = dauth::test::control_exchange(d.socket, oversized, /*stop_after_line=*/false);
  REQUIRE(!text.empty());
  const auto limit = nlohmann::json::parse(text.substr(0, text.find('\n')));
  CHECK(limit["ok"] == false);
  CHECK(limit["code"] == "limit");
  CHECK(limit["error"] == "request line longer than 65536 bytes; closing the connection");
  CHECK(text.find('\n') == text.size() - 1);  // one reply, then end of stream

  // The daemon still serves after all of that.
  const auto stats = d.ctl({"--json", "stats"});
  REQUIRE(stats.exit_code == 0);
  const auto counters = nlohmann::json::parse(stats.output);
  CHECK(counters["control_requests_failed_total"].get<int>() >= 4);

  daemon.signal(SIGTERM);
  CHECK(daemon.wait() == std::optional<int>(0));
}

TEST_CASE("verbs of roles not configured fail honestly, and dauthctl prints the reason unchanged", "[dauthd]") {
  Deployment d;
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {}, d.log);
  REQUIRE(dauth::test::wait_for_control_socket(d.socket));

  const auto sessions = d.ctl({"sessions"});
  CHECK(sessions.exit_code == 1);
  CHECK(sessions.output == "sessions: no peer role configured ([peer] section)\n");
  // The MEF role runs here: revoking a KeID it never issued is not_found, with the value in the message.
  const auto revoke = d.ctl({"--json", "revoke", "0123456789ABCDEF0123456789ABCDEF@mef.example.net"});
  CHECK(revoke.exit_code == 1);
  const auto revoke_reply = nlohmann::json::parse(revoke.output);
  CHECK(revoke_reply["code"] == "not_found");
  CHECK_THAT(revoke_reply["error"].get<std::string>(), Catch::Contains("0123456789ABCDEF0123456789ABCDEF@mef.example.net"));
  CHECK(d.ctl({"enrol", "CAE-meter"}).exit_code == 1);
  CHECK(d.ctl({"peers"}).exit_code == 1);
  CHECK(d.ctl({"credentials", "list"}).exit_code == 0);  // any role: here the MEF's enrolee table

  // credentials add reads the key from a file, and refuses a group-readable one before contacting the daemon.
  dauth::test::write_file(d.dir / "new.kpm", kKpmHex, 0644);
  const auto loose = d.ctl({"credentials", "add", "--kpm-id", "x@mef.example.net", "--ae", "CAE-x", "--psk-file",
                            (d.dir / "new.kpm").string()});
  CHECK(loose.exit_code == 2);
  CHECK_THAT(loose.output, Catch::Contains("mode 0644, must not be readable or writable by group or others (chmod 600)"));
  CHECK(d.ctl({"no-such-verb"}).exit_code == 2);

  const auto prometheus = d.ctl({"stats", "--prometheus"});
  CHECK(prometheus.exit_code == 0);
  CHECK_THAT(prometheus.output, Catch::Contains("# TYPE dauth_control_requests_total counter\n"
                                                "dauth_control_requests_total "));
  CHECK_THAT(prometheus.output, Catch::Contains("# TYPE dauth_uptime_seconds gauge\n"));

  daemon.signal(SIGTERM);
  CHECK(daemon.wait() == std::optional<int>(0));
  check_no_key_bytes(dauth::test::read_text_file(d.log));
}

TEST_CASE("dauthd --check-config prints the effective configuration with keys hidden", "[dauthd]") {
  Deployment d;
  const auto good = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
  INFO(good.output);
  CHECK(good.exit_code == 0);
  CHECK_THAT(good.output, Catch::Contains("kpm_file = \"" + (d.dir / "meter.kpm").string() + "\"  # key (hidden)"));
  CHECK_THAT(good.output, Catch::Contains("enrolment_lifetime = 2592000"));  // defaults included
  check_no_key_bytes(good.output);

  dauth::test::write_file(d.config, d.config_text("info") + "unexpected = true\n", 0600);
  const auto bad = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
  CHECK(bad.exit_code == 2);
  CHECK_THAT(bad.output, Catch::Contains(d.config.string() + ":16:1: mef.enrolee[0].unexpected: unknown key"));

  CHECK(run_command({DAUTHD_PATH, "--check-config", "-c", (d.dir / "missing.toml").string()}).exit_code == 2);
  CHECK(run_command({DAUTHD_PATH, "--no-such-option"}).exit_code == 2);
}

TEST_CASE("dauthd refuses to start with a key file others can read, and dauthctl exits 3 with no daemon",
          "[dauthd]") {
  Deployment d;
  ::chmod((d.dir / "master.key").c_str(), 0640);
  const auto refused = run_command({DAUTHD_PATH, "-c", d.config.string()});
  CHECK(refused.exit_code == 2);
  CHECK_THAT(refused.output, Catch::Contains("mode 0640, must not be readable or writable by group or others"));
  CHECK_FALSE(std::filesystem::exists(d.socket));
  check_no_key_bytes(refused.output);

  ::chmod((d.dir / "master.key").c_str(), 0600);
  // The state directory: the key store's own rule and advice (crypto::check_store_directory_mode), with the
  // config position.
  ::chmod((d.dir / "state").c_str(), 0770);
  const auto open_state = run_command({DAUTHD_PATH, "-c", d.config.string()});
  CHECK(open_state.exit_code == 2);
  const std::string where = "daemon.state_directory = \"" + (d.dir / "state").string() + "\"";
  const std::string rule = dauth::crypto::check_store_directory_mode(S_IFDIR | 0770, where).error().message;
  CHECK_THAT(rule, Catch::Contains("mode 0770 is writable by group or others") && Catch::Contains("chmod 700"));
  CHECK_THAT(open_state.output, Catch::Contains(rule));
  CHECK_FALSE(std::filesystem::exists(d.socket));

  const auto unreachable = d.ctl({"status"});
  CHECK(unreachable.exit_code == 3);
  CHECK(d.ctl({"--json", "stats"}).exit_code == 3);
}

TEST_CASE("peer.legacy_onem2m_options reaches the peer node: with libcoap 4.3.1 dauthd refuses to start with it",
          "[dauthd]") {
  // The switch used to be parsed and then dropped: dauthd ran without the legacy option numbers it promised.
  // Now the peer node gets it, and transport refuses it with the reason (its option filter is full).
  Deployment d;
  dauth::test::write_file(d.config,
                          d.config_text("info") + "\n[peer]\nlisten = \"127.0.0.1:" +
                              std::to_string(dauth::test::free_loopback_port()) + "\"\nlegacy_onem2m_options = true\n",
                          0600);
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {}, d.log);
  const auto status = daemon.wait(std::chrono::seconds(10));  // before: still running (killed at the limit)
  REQUIRE(status.has_value());
  CHECK(*status != 0);
  const std::string log = dauth::test::read_text_file(d.log);
  CHECK_THAT(log, Catch::Contains("peer node: accept_legacy_onem2m_options"));
  CHECK_THAT(log, Catch::Contains("two option numbers above 255"));
}

TEST_CASE("a second dauthd on the ports of a running one exits 1 naming the address", "[dauthd]") {
  // libcoap binds with SO_REUSEADDR: the second one used to start and share mef.listen with the first.
  Deployment first;
  NotifyListener notify(first.dir / "notify");
  DaemonProcess running({DAUTHD_PATH, "-c", first.config.string()}, {notify.environment()}, first.log);
  INFO(dauth::test::read_text_file(first.log));
  REQUIRE(notify.wait_for("READY=1").has_value());

  Deployment second;  // its own state, key files and control socket; the first one's MEF port
  second.mef_port = first.mef_port;
  second.write_config("info");
  DaemonProcess refused({DAUTHD_PATH, "-c", second.config.string()}, {}, second.log);
  const auto code = refused.wait(std::chrono::seconds(10));  // before: still running (killed at the limit)
  const std::string log = dauth::test::read_text_file(second.log);
  INFO(log);
  REQUIRE(code.has_value());
  CHECK(*code == 1);
  CHECK_THAT(log, Catch::Contains("cannot listen on coaps://127.0.0.1:" + std::to_string(first.mef_port) +
                                  ": UDP port in use by another socket"));
  CHECK(first.status()["state"] == "running");
  running.signal(SIGTERM);
  CHECK(running.wait() == std::optional<int>(0));
}

TEST_CASE("reload applies the live keys and names each key that needs a restart until the restart", "[dauthd]") {
  // Before, a changed mef.listen got one notice line, and status and the reload reply said plain "ok".
  Deployment d;
  NotifyListener notify(d.dir / "notify");
  DaemonProcess daemon({DAUTHD_PATH, "-c", d.config.string()}, {notify.environment()}, d.log);
  INFO(dauth::test::read_text_file(d.log));
  REQUIRE(notify.wait_for("READY=1").has_value());
  const std::uint16_t running_port = d.mef_port;

  d.mef_port = dauth::test::free_loopback_port();
  d.write_config("debug");
  const auto reply = d.ctl({"reload"});
  INFO(reply.output);
  CHECK(reply.exit_code == 0);
  CHECK_THAT(reply.output, Catch::Contains("applied: daemon.log_level") &&
                               Catch::Contains("needs a restart: mef.listen"));
  const auto json = nlohmann::json::parse(d.ctl({"--json", "reload"}).output);
  CHECK(json["restart_pending"] == nlohmann::json::array({"mef.listen"}));
  auto status = d.status();
  CHECK(status["restart_pending"] == nlohmann::json::array({"mef.listen"}));
  CHECK(status["log_level"] == "debug");          // applied
  CHECK(status["ports"]["mef"] == running_port);  // kept: the MEF still listens where it did
  CHECK_THAT(d.ctl({"status"}).output, Catch::Contains("restart pending: mef.listen"));
  CHECK_THAT(d.ctl({"show"}).output, Catch::Contains("restart pending: mef.listen"));
  const auto reloaded = notify.wait_for("READY=1");
  REQUIRE(reloaded.has_value());
  CHECK_THAT(*reloaded, Catch::Contains("restart pending: mef.listen"));
  CHECK_THAT(dauth::test::read_text_file(d.log), Catch::Contains("reload: needs a restart: mef.listen"));

  // Back to the running value: nothing pending any more.
  d.mef_port = running_port;
  d.write_config("debug");
  REQUIRE(d.ctl({"reload"}).exit_code == 0);
  CHECK(d.status()["restart_pending"] == nlohmann::json::array());

  // A file read only at start, renewed in place under the same name (as certificates are): the reload cannot use
  // it and says so, where it used to report nothing.
  const auto renewed = d.dir / "master.key.new";
  dauth::test::write_file(renewed, kMasterHex + "\n", 0600);
  std::filesystem::rename(renewed, d.dir / "master.key");
  const auto after_renewal = d.ctl({"reload"});
  INFO(after_renewal.output);
  CHECK_THAT(after_renewal.output, Catch::Contains("needs a restart: daemon.master_key_file"));
  CHECK(d.status()["restart_pending"] == nlohmann::json::array({"daemon.master_key_file"}));

  daemon.signal(SIGTERM);
  CHECK(daemon.wait() == std::optional<int>(0));
}

TEST_CASE("dauthd --check-config checks what starting needs: the state directory, the systemd credential, ports",
          "[dauthd][check-config]") {
  Deployment d;
  // A missing state directory used to pass the check; start then failed.
  std::filesystem::remove(d.dir / "state");
  auto checked = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
  INFO(checked.output);
  CHECK(checked.exit_code == 2);
  CHECK_THAT(checked.output,
             Catch::Contains("daemon.state_directory = \"" + (d.dir / "state").string() + "\": No such file"));
  std::filesystem::create_directory(d.dir / "state");
  std::filesystem::permissions(d.dir / "state", std::filesystem::perms::owner_all,
                               std::filesystem::perm_options::replace);

  // The packaged default takes the master key from systemd (LoadCredential=): outside systemd that is a note, not
  // the "$CREDENTIALS_DIRECTORY is not set" error it used to be.
  std::string packaged = d.config_text("info");
  const std::string from_file = "master_key_source = \"file\"\n";
  packaged.replace(packaged.find(from_file), from_file.size(), "master_key_source = \"credential\"\n");
  dauth::test::write_file(d.config, packaged, 0600);
  checked = run_command({"/usr/bin/env", "-u", "CREDENTIALS_DIRECTORY", DAUTHD_PATH, "--check-config", "-c",
                         d.config.string()});
  INFO(checked.output);
  CHECK(checked.exit_code == 0);
  CHECK_THAT(checked.output, Catch::Contains("note: daemon.master_key_credential = \"master-key\": not checked here; "
                                             "the key will come from systemd LoadCredential="));
  d.write_config("info");

  // A port another socket holds is an error naming the key; one the running dauthd of this configuration holds
  // is a note.
  {
    dauth::UniqueFd holder(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = htons(d.mef_port);
    REQUIRE(::bind(holder.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
    checked = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
    INFO(checked.output);
    CHECK(checked.exit_code == 2);
    CHECK_THAT(checked.output, Catch::Contains("mef.listen = \"127.0.0.1:" + std::to_string(d.mef_port) +
                                               "\": UDP port in use by another socket"));
  }
  NotifyListener notify(d.dir / "notify");
  DaemonProcess running({DAUTHD_PATH, "-c", d.config.string()}, {notify.environment()}, d.log);
  REQUIRE(notify.wait_for("READY=1").has_value());
  checked = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
  INFO(checked.output);
  CHECK(checked.exit_code == 0);
  CHECK_THAT(checked.output, Catch::Contains("held by the running dauthd (pid " + std::to_string(running.pid())));
  running.signal(SIGTERM);
  CHECK(running.wait() == std::optional<int>(0));
}

TEST_CASE("dauthd --check-config -u USER sees the key file that user cannot read", "[dauthd][check-config]") {
  // Run as root, the check used to read every key file itself and pass; dauthd then failed as its service user.
  if (::geteuid() != 0) {
    WARN("not root: -u cannot change user; skipped");
    return;
  }
  const passwd* nobody = ::getpwnam("nobody");
  REQUIRE(nobody != nullptr);
  Deployment d;
  for (const auto& path : {d.dir.path(), d.dir / "state", d.config, d.dir / "master.key"}) {
    REQUIRE(::chown(path.c_str(), nobody->pw_uid, nobody->pw_gid) == 0);
  }
  // meter.kpm stays root's, mode 0600.
  auto checked = run_command({DAUTHD_PATH, "--check-config", "-u", "nobody", "-c", d.config.string()});
  INFO(checked.output);
  CHECK(checked.exit_code == 2);
  CHECK_THAT(checked.output, Catch::Contains((d.dir / "meter.kpm").string()) &&
                                 Catch::Contains("Permission denied"));
  // As root, without -u, the same file passes, and the check says who it checked as.
  const auto as_root = run_command({DAUTHD_PATH, "--check-config", "-c", d.config.string()});
  CHECK(as_root.exit_code == 0);
  CHECK_THAT(as_root.output, Catch::Contains("note: checking as root"));

  REQUIRE(::chown((d.dir / "meter.kpm").c_str(), nobody->pw_uid, nobody->pw_gid) == 0);
  checked = run_command({DAUTHD_PATH, "--check-config", "-u", "nobody", "-c", d.config.string()});
  INFO(checked.output);
  CHECK(checked.exit_code == 0);
  CHECK(run_command({DAUTHD_PATH, "--check-config", "-u", "no-such-user-dauth", "-c", d.config.string()}).exit_code ==
        2);
  // Back to root's, so that the TempDir can remove it all.
  for (const auto& path : {d.dir.path(), d.dir / "state", d.config, d.dir / "master.key", d.dir / "meter.kpm"}) {
    REQUIRE(::chown(path.c_str(), 0, 0) == 0);
  }
}

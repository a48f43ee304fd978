// End to end (issue 5): an MEF and two gateway dauthds on 127.0.0.1, AE "meter" (coap-client-notls) on gateway A
// reaching AE "valve" (coap-server-notls) on gateway B through both dauthds. Outcomes are read from what the
// stock tools print and from dauthctl --json; the only log check is that no key ever appears in any log.
#include <signal.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cctype>
#include <filesystem>
#include <regex>
#include <set>
#include <thread>

#include "dauth/crypto/keystore.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/messages.hpp"
#include "dauth/transport/transport.hpp"
#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
  return text;
}

using DirectPeer = StoredTargetKey;
DirectPeer meter_key_from_store(const Deployment& d, const std::string& target = "CAE-valve") {
  return stored_target_key(d, "a", "CAE-meter", crypto::Suid::rspf_key_for_saef, target);
}

Result<transport::Response> send_direct(const Deployment& d, const DirectPeer& peer, const std::string& originator,
                                        transport::Method method = transport::Method::get) {
  transport::Request request;
  request.method = method;
  if (method == transport::Method::put) request.payload = {'x'};
  request.path = {"example_data"};
  request.originator = originator;
  return request_once({"127.0.0.1", d.ports().at("B_PEER")},
                      transport::ClientCredentials::psk(peer.ke_id, peer.key.clone(), peer.target), request);
}

// The refusal body every dauthd answer carries (PROTOCOL.md §2), read by the decoder with its Content-Format.
rspf::ErrorBody error_body_of(const transport::Response& response) {
  REQUIRE(response.content_format == std::optional<std::uint16_t>(60));
  auto body = rspf::decode_error_body(ByteView(response.payload), rspf::ContentFormat::cbor);
  INFO(std::string(response.payload.begin(), response.payload.end()));
  REQUIRE(body.ok());
  return std::move(body).value();
}

}  // namespace

TEST_CASE("proxy path works, policy, originator and impersonation refusals, no key in any log", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_all(d);
  const auto marker = put_marker(d);

  // meter -> valve through A and B: the first use makes B fetch the key from the MEF (A retries, PROTOCOL.md §4).
  const auto get = d.proxied("CAE-meter", "get", "example_data");
  INFO(get.output);
  CHECK(get.exit_code == 0);
  CHECK(get.output.find(marker) != std::string::npos);

  const auto sessions_b = d.ctl_json("b", {"sessions"});
  bool meter_session = false;
  for (const auto& s : sessions_b["sessions"]) meter_session |= s.value("peer_ae_id", "") == "CAE-meter";
  CHECK(meter_session);
  // Every enrolment the MEF answered waited for one journal fdatasync first (durable before the answer).
  const auto mef_stats = d.ctl_json("mef", {"stats"});
  CHECK(mef_stats.value("keystore_fdatasync_total", std::int64_t{0}) >= 2);  // meter's and valve's enrolments
  CHECK(mef_stats.value("keystore_fdatasync_seconds_total", 0.0) > 0.0);

  SECTION("policy: B lets meter GET only; intruder not at all") {
    const auto put = d.proxied("CAE-meter", "put", "example_data", "overwritten");
    INFO(put.output);
    CHECK(put.output.find("4.03") != std::string::npos);
    CHECK(d.direct("get", "example_data").output.find(marker) != std::string::npos);  // not overwritten

    CHECK(d.wait_enrolled("a", "CAE-intruder"));
    const auto intruder = d.proxied("CAE-intruder", "get", "example_data");
    INFO(intruder.output);
    CHECK(intruder.output.find("4.03") != std::string::npos);
    CHECK(intruder.output.find(marker) == std::string::npos);
    CHECK(d.ctl_json("b", {"stats"}).value("peer_denied_total", 0) >= 2);
  }

  SECTION("the local originator must be a configured local AE") {
    const auto nobody = d.proxied("CAE-nobody", "get", "example_data");
    INFO(nobody.output);
    CHECK(nobody.output.find("4.03") != std::string::npos);
    CHECK(nobody.output.find(marker) == std::string::npos);
  }

  SECTION("impersonation: a session authenticated as meter but oneM2M-FR intruder gets 4.03, RSC 4106") {
    d.stop("a", SIGTERM);  // its key store is read below
    const auto peer = meter_key_from_store(d);
    const auto honest = send_direct(d, peer, "CAE-meter");
    REQUIRE(honest.ok());
    CHECK(honest->code == 205);
    const auto forged = send_direct(d, peer, "CAE-intruder");
    REQUIRE(forged.ok());
    CHECK(forged->code == 403);
    CHECK(forged->response_status == std::optional<std::uint32_t>(4106));
    // Every refusal of the peer endpoint carries the error body of PROTOCOL.md §2 (it used to be plain text).
    const auto forged_body = error_body_of(*forged);
    CHECK(forged_body.error == "unauthenticated");
    CHECK(forged_body.detail.find("differs from the authenticated AE-ID CAE-meter") != std::string::npos);
    const auto denied = send_direct(d, peer, "CAE-meter", transport::Method::put);
    REQUIRE(denied.ok());
    CHECK(denied->code == 403);
    const auto denied_body = error_body_of(*denied);
    CHECK(denied_body.error == "denied");
    CHECK(denied_body.detail == "policy: CAE-meter may not PUT CAE-valve");
    CHECK(d.ctl_json("b", {"stats"}).value("peer_impersonation_total", 0) == 1);
  }

  // No key material in any log: key files, master keys, and the enrolment keys the gateways derived.
  for (const char* node : {"a", "b", "mef"}) {
    if (d.running(node)) d.stop(node, SIGTERM);
  }
  const auto logs = lower(d.all_logs());
  REQUIRE_FALSE(logs.empty());
  for (const auto& hex : d.key_files_hex()) CHECK(logs.find(lower(hex)) == std::string::npos);
  auto master = secret_from_hex(d.master_key_hex("a"));
  REQUIRE(master.ok());
  auto store = crypto::KeyStore::open(d.state("a"), std::move(master).value());
  REQUIRE(store.ok());
  std::size_t checked = 0;
  store->for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& record) {
    const auto& e = std::get<crypto::EnrolmentKeyRecord>(record);
    CHECK(logs.find(lower(to_hex(e.ke.view()))) == std::string::npos);
    ++checked;
  });
  CHECK(checked >= 1);
}

namespace {

// Every secret a store holds: bootstrap and enrolee Kpm, Ke, fetched usage-constrained keys, private keys.
std::vector<std::string> secrets_hex_in_store(const Deployment& d, const std::string& node) {
  auto master = secret_from_hex(d.master_key_hex(node));
  REQUIRE(master.ok());
  auto store = crypto::KeyStore::open(d.state(node), std::move(master).value());
  REQUIRE(store.ok());
  std::vector<std::string> secrets;
  auto add = [&](const SecretBuffer& secret) {
    if (!secret.empty()) secrets.push_back(lower(to_hex(secret.view())));
  };
  for (const auto kind : {crypto::RecordKind::bootstrap_key, crypto::RecordKind::enrolee, crypto::RecordKind::enrolment_key,
                          crypto::RecordKind::session_key, crypto::RecordKind::certificate}) {
    store->for_each(kind, [&](const crypto::Record& record) {
      std::visit(
          [&](const auto& r) {
            using R = std::decay_t<decltype(r)>;
            if constexpr (std::is_same_v<R, crypto::BootstrapKeyRecord> || std::is_same_v<R, crypto::EnroleeRecord>) {
              add(r.kpm);
            } else if constexpr (std::is_same_v<R, crypto::EnrolmentKeyRecord>) {
              add(r.ke);
            } else if constexpr (std::is_same_v<R, crypto::SessionKeyRecord>) {
              add(r.key);
            } else if constexpr (std::is_same_v<R, crypto::CertificateRecord>) {
              add(r.private_key_der);
            }
          },
          record);
    });
  }
  return secrets;
}

}  // namespace

TEST_CASE("no key in any log at the most verbose settings: log_level debug and DAUTH_TRANSPORT_DEBUG", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  for (const char* node : {"mef", "a", "b"}) {
    d.edit_config(node, [](std::string text) {
      const std::string info = "log_level = \"info\"";
      const auto at = text.find(info);
      REQUIRE(at != std::string::npos);
      return text.replace(at, info.size(), "log_level = \"debug\"");
    });
    d.set_environment(node, {"DAUTH_TRANSPORT_DEBUG=1"});
  }
  start_all(d);
  const auto marker = put_marker(d);
  // meter -> valve: B fetches the usage-constrained key from the MEF (it travels in a CoAP payload), A derives it.
  const auto get = d.proxied("CAE-meter", "get", "example_data");
  INFO(get.output);
  REQUIRE(get.exit_code == 0);
  REQUIRE(get.output.find(marker) != std::string::npos);
  for (const char* node : {"a", "b", "mef"}) d.stop(node, SIGTERM);

  const auto logs = lower(d.all_logs());
  // The settings were in force: dauthd's debug lines and libcoap's PDU lines were written.
  REQUIRE(logs.find("libcoap: ") != std::string::npos);
  REQUIRE(logs.find("<7>") != std::string::npos);
  std::vector<std::string> secrets = d.key_files_hex();
  for (auto& hex : secrets) hex = lower(hex);
  std::size_t stored = 0;
  for (const char* node : {"mef", "a", "b"}) {
    for (auto& hex : secrets_hex_in_store(d, node)) {
      secrets.push_back(std::move(hex));
      ++stored;
    }
  }
  // At least: Kpm at A and at the MEF, Ke at A, B and the MEF, the fetched key at B, the MEF's CA key.
  CHECK(stored >= 7);
  for (const auto& hex : secrets) {
    INFO("secret starting " << hex.substr(0, 4));
    // Any 8 bytes of a key in a row, in hex, as libcoap's dumps or a careless log line would print them.
    for (std::size_t at = 0; at + 16 <= hex.size(); at += 16) CHECK(logs.find(hex.substr(at, 16)) == std::string::npos);
  }
}

TEST_CASE("SIGTERM leaves a consistent store, kill -9 and restart keep every credential, sessions come back",
          "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_all(d);
  const auto marker = put_marker(d);
  REQUIRE(d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos);

  auto ids = [&](const std::string& node) {
    std::vector<std::string> out;
    const auto listed = d.ctl_json(node, {"credentials", "list"});  // kept alive for the loop
    for (const auto& row : listed["credentials"]) {
      out.push_back(row.value("kind", "") + " " + row.value("id", "") + " " + row.value("fingerprint", ""));
    }
    std::sort(out.begin(), out.end());
    return out;
  };
  const auto a_before = ids("a");
  CHECK(std::count_if(a_before.begin(), a_before.end(), [](const std::string& s) { return s.rfind("enrolment ", 0) == 0; }) == 2);
  const auto b_before = ids("b");
  // meter's key, and perhaps intruder's already: B prefetches the KeIDs its MEF's feed lists for valve.
  CHECK(std::count_if(b_before.begin(), b_before.end(),
                      [](const std::string& s) { return s.rfind("session ", 0) == 0; }) >= 1);

  // kill -9 A: nothing is flushed at exit; every record was fsync'ed when stored.
  d.stop("a", SIGKILL);
  d.start("a");
  CHECK(ids("a") == a_before);  // same KeIDs: the enrolment came back from the store, no new one was made
  CHECK(d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}}).is_object());

  // SIGTERM B: clean exit, and the store opens without a torn tail.
  d.stop("b", SIGTERM);
  CHECK(d.last_exit("b") == std::optional<int>(0));
  {
    auto master = secret_from_hex(d.master_key_hex("b"));
    REQUIRE(master.ok());
    crypto::OpenReport report;
    auto store = crypto::KeyStore::open(d.state("b"), std::move(master).value(), &report);
    REQUIRE(store.ok());
    CHECK_FALSE(report.torn_tail.has_value());
  }
  d.start("b");
  // Every record B had is back; more session keys may arrive meanwhile (feed prefetch), none may be missing.
  const auto b_after = ids("b");
  CHECK(std::includes(b_after.begin(), b_after.end(), b_before.begin(), b_before.end()));

  // Both peers restarted: the next request sets the session up again by itself (A retries on a dead session).
  const auto again = d.proxied("CAE-meter", "get", "example_data");
  INFO(again.output);
  CHECK(again.output.find(marker) != std::string::npos);
}

TEST_CASE("reload (SIGHUP) keeps live sessions and applies the new policy", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_all(d);
  const auto marker = put_marker(d);
  REQUIRE(d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos);
  const auto handshakes = d.ctl_json("b", {"stats"}).value("peer_handshakes_completed_total", 0);
  REQUIRE(handshakes >= 1);

  CHECK(d.verb("b", "reload", nlohmann::json::object()).value("reloads", 0) == 1);
  CHECK(d.verb("a", "reload", nlohmann::json::object()).value("reloads", 0) == 1);
  CHECK(d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos);
  // Same DTLS session: no new handshake on B after the reloads.
  CHECK(d.ctl_json("b", {"stats"}).value("peer_handshakes_completed_total", 0) == handshakes);
}

TEST_CASE("MEF down at start: the enrolee retries with growing backoff and enrols once the MEF is up", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  d.start("a");
  // Collect the backoff delays of the first failed attempts (1 s, 2 s, 4 s ... ± 10 % jitter, Enrolee::
  // next_attempt_delay()): values reported by dauthd, compared with each other, no clock involved.
  std::vector<std::int64_t> delays;
  for (int i = 0; i < 600 && delays.size() < 3; ++i) {
    const auto status = d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}});
    const auto delay = status.value("next_attempt_delay_ms", std::int64_t{0});
    if (status.value("state", "") == "failed" && delay > 0 && (delays.empty() || delays.back() != delay)) {
      delays.push_back(delay);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(delays.size() >= 2);
  for (std::size_t i = 1; i < delays.size(); ++i) {
    CHECK(delays[i] > delays[i - 1]);                // exponential: each step larger
    CHECK(delays[i] <= delays[i - 1] * 2 * 12 / 8);  // about doubling, within the ± 10 % jitter of both steps
  }
  CHECK_FALSE(d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}})["last_error"].is_null());
  d.start("mef");
  CHECK(d.wait_enrolled("a", "CAE-meter", 90));
}

TEST_CASE("peer restart: gateway A's cached session to B is dead, the next request sets up a new one", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_all(d);
  const auto marker = put_marker(d);
  REQUIRE(d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos);
  d.stop("b", SIGTERM);
  d.start("b");
  const auto again = d.proxied("CAE-meter", "get", "example_data");
  INFO(again.output);
  CHECK(again.output.find(marker) != std::string::npos);
  CHECK(d.ctl_json("b", {"stats"}).value("peer_handshakes_completed_total", 0) >= 1);  // B's counters restarted
}

TEST_CASE("peer crash: after kill -9 and restart of B, gateway A drops its dead session and sets up a new one",
          "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_all(d);
  const auto marker = put_marker(d);
  REQUIRE(d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos);
  d.stop("b", SIGKILL);  // no close_notify: A still holds an established session B no longer knows
  d.start("b");
  // A request on the dead session goes unanswered; A must not keep using that session for the next ones.
  bool answered = false;
  for (int attempt = 0; attempt < 3 && !answered; ++attempt) {
    answered = d.proxied("CAE-meter", "get", "example_data").output.find(marker) != std::string::npos;
  }
  CHECK(answered);
  CHECK(d.ctl_json("b", {"stats"}).value("peer_handshakes_completed_total", 0) >= 1);
}

namespace {

std::size_t count_rows(const nlohmann::json& listed, const std::string& kind, const std::string& key,
                       const std::string& value) {
  std::size_t n = 0;
  for (const auto& row : listed["credentials"]) n += row.value("kind", "") == kind && row.value(key, "") == value;
  return n;
}

}  // namespace

TEST_CASE("certificate RSPF: a device certificate enrols, an untrusted one is refused and retried", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  const auto b = d.dir() / "b";
  // valve's device certificate from a CA the MEF does not trust (mef.device_ca is the demo device CA); the right
  // one is kept aside for later.
  std::filesystem::copy_file(b / "valve.pem", b / "valve-good.pem");
  std::filesystem::copy_file(b / "valve.key", b / "valve-good.key");
  REQUIRE(make_pki({"ca", (d.dir() / "rogue-ca").string(), "rogue device CA"}).exit_code == 0);
  REQUIRE(make_pki({"leaf", (d.dir() / "rogue-ca").string(), (b / "valve").string(), "CAE-valve", "URI:CAE-valve"})
              .exit_code == 0);
  d.start("mef");
  d.start("b");

  // Refused in the handshake, and retried with backoff: the daemon stays up, the state says why.
  nlohmann::json status;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(40);
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    status = d.verb("b", "enrol.status", {{"ae_id", "CAE-valve"}});
  } while (status.value("attempts_done", 0) < 2 && std::chrono::steady_clock::now() < deadline);
  INFO(status.dump());
  CHECK(status.value("attempts_done", 0) >= 2);
  CHECK(status.value("state", "") == "failed");
  REQUIRE(status["last_error"].is_string());
  CHECK_THAT(status["last_error"].get<std::string>(), Catch::Contains("handshake"));
  CHECK(d.running("b"));
  CHECK(d.ctl_json("mef", {"stats"}).value("mef_handshakes_failed_total", 0) >= 2);

  // The right device certificate: after a restart valve enrols through the certificate RSPF and gets its AE-ID
  // certificate over EST (certificate_enrolment = true in the demo's gateway B).
  d.stop("b", SIGTERM);
  std::filesystem::copy_file(b / "valve-good.pem", b / "valve.pem", std::filesystem::copy_options::overwrite_existing);
  std::filesystem::copy_file(b / "valve-good.key", b / "valve.key", std::filesystem::copy_options::overwrite_existing);
  d.start("b");
  REQUIRE(d.wait_enrolled("b", "CAE-valve", 30));
  const auto b_listed = d.ctl_json("b", {"credentials", "list"});
  CHECK(count_rows(b_listed, "certificate", "id", "device:CAE-valve") == 1);
  CHECK(count_rows(b_listed, "certificate", "id", "CAE-valve") == 1);  // issued over EST

  // The MEF made exactly one enrolment for valve (none for the refused certificate), from its "cert:" row.
  d.stop("mef", SIGTERM);
  auto master = secret_from_hex(d.master_key_hex("mef"));
  REQUIRE(master.ok());
  auto store = crypto::KeyStore::open(d.state("mef"), std::move(master).value());
  REQUIRE(store.ok());
  std::size_t enrolments = 0;
  store->for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& record) {
    enrolments += std::get<crypto::EnrolmentKeyRecord>(record).enrolee_id == "CAE-valve";
  });
  CHECK(enrolments == 1);
  const auto* row = store->find<crypto::EnroleeRecord>("cert:CAE-valve");
  REQUIRE(row != nullptr);
  CHECK(row->kpm.empty());
}

TEST_CASE("several Enrolment Targets behind one gateway: A reaches both, B's policy holds per local AE", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  // A second served AE on B, "pump" (pre-provisioned key), which meter may reach with GET and PUT; valve stays
  // GET only.
  const auto pump_port = d.add_port("PUMP_PORT");
  write_file(d.dir() / "keys" / "pump.kpm", run_command({"openssl", "rand", "-hex", "32"}).output, 0600);
  const auto pump_kpm = (d.dir() / "keys" / "pump.kpm").string();
  d.edit_config("mef", [&](std::string text) {
    text = std::regex_replace(text, std::regex("targets = \\[\"CAE-valve\"\\]"), "targets = [\"CAE-valve\", \"CAE-pump\"]");
    return text + "\n[[mef.enrolee]]\nkpm_id = \"pump@mef.demo.test\"\nkpm_file = \"" + pump_kpm +
           "\"\nenrolee_id = \"CAE-pump\"\ntargets = [\"CAE-meter\"]\n";
  });
  d.edit_config("b", [&](std::string text) {
    return text + "\n[[enrolee.ae]]\nid = \"CAE-pump\"\nendpoint = \"127.0.0.1:" + std::to_string(pump_port) +
           "\"\nkpm_id = \"pump@mef.demo.test\"\nkpm_file = \"" + pump_kpm +
           "\"\n\n[[peer.policy]]\npeer = \"CAE-meter\"\nlocal_aes = [\"CAE-pump\"]\nmethods = [\"GET\", \"PUT\"]\n";
  });
  d.edit_config("a", [&](std::string text) {
    return text + "\n[[peer.address]]\nae_id = \"CAE-pump\"\naddress = \"127.0.0.1:" +
           std::to_string(d.ports().at("B_PEER")) + "\"\n";
  });
  d.start_ae_server("pump", pump_port);
  start_all(d);
  REQUIRE(d.wait_enrolled("b", "CAE-pump"));

  // Each target gets its own request: different values PUT straight to each server come back through A and B.
  const auto valve_marker = put_marker(d);
  const auto pump_marker = put_marker_at(pump_port);
  const auto from_valve = d.proxied_to("CAE-meter", "CAE-valve", "get", "example_data");
  INFO(from_valve.output);
  CHECK(from_valve.output.find(valve_marker) != std::string::npos);
  const auto from_pump = d.proxied_to("CAE-meter", "CAE-pump", "get", "example_data");
  INFO(from_pump.output);
  CHECK(from_pump.output.find(pump_marker) != std::string::npos);
  CHECK(from_pump.output.find(valve_marker) == std::string::npos);

  // Policy per local AE: PUT is allowed on pump only.
  const auto put_pump = d.proxied_to("CAE-meter", "CAE-pump", "put", "example_data", "from-meter");
  INFO(put_pump.output);
  CHECK(put_pump.output.find("4.03") == std::string::npos);
  const auto put_valve = d.proxied_to("CAE-meter", "CAE-valve", "put", "example_data", "from-meter");
  INFO(put_valve.output);
  CHECK(put_valve.output.find("4.03") != std::string::npos);
  CHECK(d.direct("get", "example_data").output.find(valve_marker) != std::string::npos);  // valve not overwritten
  const auto pump_now = run_command({"coap-client-notls", "-B", "5",
                                     "coap://127.0.0.1:" + std::to_string(pump_port) + "/example_data"});
  CHECK(pump_now.output.find("from-meter") != std::string::npos);
  // B fetched one key per (KeID, target AE) from the MEF, as that AE.
  CHECK(d.ctl_json("b", {"stats"}).value("key_fetches_succeeded_total", 0) >= 2);

  // The session's handshake decides whom it serves, and requests on it keep that: a client that spells the KeID's
  // MEF name in capitals (DNS names compare case-insensitively, so B's lookup finds the key) and names pump by SNI
  // reaches pump with meter's rights.
  d.stop("a", SIGTERM);  // its key store is read here
  auto to_pump = meter_key_from_store(d, "CAE-pump");
  const auto at = to_pump.ke_id.find('@');
  REQUIRE(at != std::string::npos);
  std::transform(to_pump.ke_id.begin() + static_cast<std::ptrdiff_t>(at), to_pump.ke_id.end(), to_pump.ke_id.begin() +
                 static_cast<std::ptrdiff_t>(at), [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  const auto direct_pump = send_direct(d, to_pump, "CAE-meter");
  INFO((direct_pump.ok() ? std::string("ok") : direct_pump.error().to_string()));
  REQUIRE(direct_pump.ok());
  CHECK(direct_pump->code == 205);
  CHECK(std::string(direct_pump->payload.begin(), direct_pump->payload.end()).find("from-meter") != std::string::npos);
  // An SNI that names neither served AE reaches none of them (no fallback to the first one): refused in the
  // handshake.
  to_pump.target = "gateway.example.net";
  CHECK_FALSE(send_direct(d, to_pump, "CAE-meter").ok());
}

TEST_CASE("certificate peer sessions: meter -> valve over X.509 with the AE-ID certificates issued over EST", "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_with_certificate_peer_sessions(d);
  const auto marker = put_marker(d);

  const auto get = d.proxied("CAE-meter", "get", "example_data");
  INFO(get.output);
  CHECK(get.output.find(marker) != std::string::npos);
  const auto sessions_b = d.ctl_json("b", {"sessions"});
  bool x509_meter = false;
  bool psk_meter = false;
  for (const auto& s : sessions_b["sessions"]) {
    x509_meter |= s.value("peer_ae_id", "") == "CAE-meter" && s.value("kind", "") == "x509";
    psk_meter |= s.value("peer_ae_id", "") == "CAE-meter" && s.value("kind", "") == "psk";
  }
  CHECK(x509_meter);
  CHECK_FALSE(psk_meter);  // the request did not go over the enrolment-key session

  // The same policy holds for the certificate's AE-ID: PUT is refused; intruder has no certificate at all.
  const auto put = d.proxied("CAE-meter", "put", "example_data", "overwritten");
  INFO(put.output);
  CHECK(put.output.find("4.03") != std::string::npos);
  CHECK(d.direct("get", "example_data").output.find(marker) != std::string::npos);
  REQUIRE(d.wait_enrolled("a", "CAE-intruder"));
  const auto intruder = d.proxied("CAE-intruder", "get", "example_data");
  INFO(intruder.output);
  CHECK(intruder.output.find("4.03") != std::string::npos);
  CHECK(intruder.output.find(marker) == std::string::npos);
}

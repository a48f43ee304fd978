// ESPrim end to end (PROTOCOL.md §7): gateway A protects meter's request to valve (peer.address esprim =
// "required"), gateway B opens it, checks it and answers protected. Then the test itself plays a rogue originator
// with meter's keys, read from A's stopped key store: an object naming another AE as its originator (4116), one
// with a byte changed (4115), one sent twice, and one sent again after B restarted are refused, and none reaches
// valve. A dauthd with ESPrim off is refused by A with a reason, never reached unprotected.
#include <signal.h>

#include <atomic>
#include <cctype>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>

#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/esprim.hpp"
#include "dauth/transport/transport.hpp"
#include "daemon_process.hpp"
#include "e2e_support.hpp"
#include "loopback_ports.hpp"
#include "support.hpp"

using namespace dauth;
using namespace dauth::test;
namespace esp = dauth::rspf::esprim;

namespace {

std::string text_of(const Bytes& bytes) { return std::string(bytes.begin(), bytes.end()); }

// The outer message of PROTOCOL.md §7.3, as any hop sees it.
transport::Request outer_message(const esp::SecurityInfo& info, const std::string& receiver = "CAE-valve") {
  transport::Request outer;
  outer.method = transport::Method::post;
  outer.path = {"esprim"};
  outer.query = {"to=" + receiver};
  outer.content_format = 50;
  const std::string body = esp::to_json_text(info);
  outer.payload.assign(body.begin(), body.end());
  return outer;
}
transport::Request protected_message(const std::string& compact) {
  esp::SecurityInfo info;
  info.type = 5;
  info.object = compact;
  return outer_message(info);
}

// The RSC of a plain refusal (PROTOCOL.md §7.4), REQUIREd to be one.
esp::Rsc refusal_rsc(const Result<transport::Response>& answer) {
  REQUIRE(answer.ok());
  INFO("CoAP " << answer->code << ": " << text_of(answer->payload));
  REQUIRE(answer->code >= 400);
  auto refusal = esp::parse_refusal_body(text_of(answer->payload));
  REQUIRE(refusal.has_value());
  return refusal->rsc;
}

// Turns one character of the ciphertext part (the fourth) into another base64url character.
std::string with_ciphertext_altered(std::string compact) {
  std::size_t part = 0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < compact.size(); ++i) {
    if (compact[i] == '.' && ++part == 3) at = i + 2;
  }
  REQUIRE(at < compact.size());
  compact[at] = compact[at] == 'A' ? 'B' : 'A';
  return compact;
}

}  // namespace

TEST_CASE("ESPrim through two dauthds and a rogue originator refused with the right codes", "[e2e][esprim]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  const std::string b_peer = "127.0.0.1:" + std::to_string(d.ports().at("B_PEER"));
  d.insert_config_line("a", "address = \"" + b_peer + "\"", "esprim = \"required\"");
  start_all(d);
  const auto marker = put_marker(d);

  // meter -> A -> B -> valve and back, protected end to end.
  const auto answer = d.proxied("CAE-meter", "get", "example_data");
  INFO(answer.output);
  REQUIRE(answer.output.find(marker) != std::string::npos);
  const auto b_stats = d.ctl_json("b", {"stats"});
  CHECK(b_stats.value("esprim_accepted_total", 0) >= 1);
  CHECK(d.ctl_json("a", {"stats"}).value("esprim_answered_total", 0) >= 1);
  // PUT is not in B's policy for meter: refused by B inside the protection (4.03, RSC 4103).
  const auto put = d.proxied("CAE-meter", "put", "example_data", "overwritten");
  INFO(put.output);
  CHECK(put.output.find("4.03") != std::string::npos);
  CHECK(d.direct("get", "example_data").output.find(marker) != std::string::npos);

  // B restarts: A's receiver rand object is gone there (4114); A asks for the new one and sends again, unseen by
  // meter.
  const auto sent_before = d.ctl_json("a", {"stats"}).value("esprim_sent_total", 0);
  d.stop("b", SIGTERM);
  d.start("b");
  const auto after_restart = d.proxied("CAE-meter", "get", "example_data");
  INFO(after_restart.output);
  CHECK(after_restart.output.find(marker) != std::string::npos);
  CHECK(d.ctl_json("a", {"stats"}).value("esprim_sent_total", 0) >= sent_before + 2);
  CHECK(d.wait_for_log("a", "sending again", 10));

  // The rogue originator: meter's keys from A's store, its own objects.
  d.stop("a", SIGTERM);
  const auto session_key = stored_target_key(d, "a", "CAE-meter", crypto::Suid::rspf_key_for_saef, "CAE-valve");
  const auto pairwise = stored_target_key(d, "a", "CAE-meter", crypto::Suid::rspf_key_for_esprim, "CAE-valve");
  const transport::Peer b{"127.0.0.1", d.ports().at("B_PEER")};
  const auto hop = transport::ClientCredentials::psk(session_key.ke_id, session_key.key.clone(), "CAE-valve");
  esp::Originator originator;
  esp::SecurityInfo ask;
  ask.type = 3;
  const auto rand_answer = request_once(b, hop, outer_message(ask));
  REQUIRE(rand_answer.ok());
  REQUIRE(rand_answer->code == 205);
  auto info = esp::parse_security_info(text_of(rand_answer->payload));
  REQUIRE(info.ok());
  REQUIRE(info->type == 4);
  REQUIRE(info->receiver_rand.has_value());
  REQUIRE(originator.set_receiver_rand(pairwise.ke_id, "CAE-valve", *info->receiver_rand).ok());

  const auto request_from = [&](const std::string& from, const std::string& request_id) {
    esp::InnerRequest inner;
    inner.operation = 2;
    inner.to = "CAE-valve";
    inner.from = from;
    inner.request_id = request_id;
    inner.path = {"example_data"};
    auto sent = originator.protect(pairwise.ke_id, pairwise.key, inner);
    REQUIRE(sent.ok());
    return std::move(sent).value();
  };

  // Ours, honest: answered, and the answer opens.
  const auto honest = request_from("CAE-meter", "rogue-1");
  const auto honest_answer = request_once(b, hop, protected_message(honest.compact));
  REQUIRE(honest_answer.ok());
  REQUIRE(honest_answer->code == 205);
  auto answer_info = esp::parse_security_info(text_of(honest_answer->payload));
  REQUIRE(answer_info.ok());
  auto inner_answer = originator.open_response(honest, answer_info->object);
  REQUIRE(inner_answer.ok());
  CHECK(inner_answer->coap_code == 205);
  CHECK(text_of(inner_answer->content).find(marker) != std::string::npos);
  const auto delivered_before = d.ctl_json("b", {"stats"}).value("peer_delivered_total", 0);

  // One pass, no SECTIONs: each would start the deployment again.
  INFO("the same object again is a replay");
  CHECK(refusal_rsc(request_once(b, hop, protected_message(honest.compact))) == esp::Rsc::replayed);

  INFO("one byte changed on the way: 4115");
  const auto fresh = request_from("CAE-meter", "rogue-2");
  CHECK(refusal_rsc(request_once(b, hop, protected_message(with_ciphertext_altered(fresh.compact)))) ==
        esp::Rsc::bad_mac);

  INFO("meter's key, intruder named as the originator: 4116");
  const auto forged = request_from("CAE-intruder", "rogue-3");
  CHECK(refusal_rsc(request_once(b, hop, protected_message(forged.compact))) == esp::Rsc::impersonation);
  CHECK(d.ctl_json("b", {"stats"}).value("esprim_impersonation_total", 0) == 1);
  INFO("bad input: not JSON, a seci without epo, an object that is no JWE: each refused with 4111");
  esp::SecurityInfo not_jwe;
  not_jwe.type = 5;
  not_jwe.object = "not.a.jwe";
  auto not_json = outer_message(ask);
  not_json.payload = {'{', '"', 'm', '2'};
  auto no_epo = outer_message(ask);
  const std::string no_epo_body = R"({"m2m:seci":{"sit":5}})";
  no_epo.payload.assign(no_epo_body.begin(), no_epo_body.end());
  for (const auto& bad : {not_json, no_epo, outer_message(not_jwe)}) {
    CHECK(refusal_rsc(request_once(b, hop, bad)) == esp::Rsc::unsupported_option);
  }
  // Nothing refused reached valve, and B still serves.
  CHECK(d.ctl_json("b", {"stats"}).value("peer_delivered_total", 0) == delivered_before);
  const auto still = request_from("CAE-meter", "rogue-5");
  CHECK(request_once(b, hop, protected_message(still.compact))->code == 205);

  INFO("after B restarts, neither a replay nor a new object under the old rand object is accepted");
  const auto unsent = request_from("CAE-meter", "rogue-4");
  d.stop("b", SIGTERM);
  d.start("b");
  CHECK(refusal_rsc(request_once(b, hop, protected_message(honest.compact))) == esp::Rsc::unknown_receiver_rand_id);
  CHECK(refusal_rsc(request_once(b, hop, protected_message(unsent.compact))) == esp::Rsc::unknown_receiver_rand_id);
  CHECK(d.ctl_json("b", {"stats"}).value("peer_delivered_total", 0) == 0);

  // No key of the exchange in any log: the pairwise key, the session key of meter's DTLS session, and the
  // sessionESPrimKey of our session (derived by the Originator; its objects opened under it).
  d.stop("b", SIGTERM);
  d.stop("mef", SIGTERM);
  std::string logs = d.all_logs();
  for (char& c : logs) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  REQUIRE_FALSE(logs.empty());
  CHECK(logs.find(to_hex(pairwise.key.view())) == std::string::npos);
  CHECK(logs.find(to_hex(session_key.key.view())) == std::string::npos);
  REQUIRE(honest.session_key);
  CHECK(logs.find(to_hex(honest.session_key->view())) == std::string::npos);
}

TEST_CASE("ESPrim required but the peer's dauthd has it off: refused at A, never sent unprotected", "[e2e][esprim]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  const std::string b_peer = "127.0.0.1:" + std::to_string(d.ports().at("B_PEER"));
  d.insert_config_line("a", "address = \"" + b_peer + "\"", "esprim = \"required\"");
  d.insert_config_line("b", "listen = \"" + b_peer + "\"", "esprim = \"off\"");
  start_all(d);
  const auto marker = put_marker(d);
  const auto answer = d.proxied("CAE-meter", "get", "example_data");
  INFO(answer.output);
  CHECK(answer.output.find("5.02") != std::string::npos);
  CHECK(answer.output.find(marker) == std::string::npos);
  CHECK(d.wait_for_log("a", "does not support ESPrim", 10));
  CHECK(d.ctl_json("b", {"stats"}).value("peer_delivered_total", 0) == 0);
}

// ---- through hops that must not read it (PROTOCOL.md §7, docs/relay.md) ----------------------------------------

namespace {

std::string hex_of_text(const std::string& text) {
  static const char* digits = "0123456789abcdef";
  std::string hex;
  for (const unsigned char c : text) {
    hex += digits[c >> 4];
    hex += digits[c & 15];
  }
  return hex;
}

SecretBuffer key_of_text(const std::string& text) { return SecretBuffer::copy_of(ByteView::of(text)); }

// A next hop in this process that changes one byte of what it forwards: of the request's ESPrim object, or of the
// answer's. It accepts A's hop identity and forwards to B under its own ([[peer.hop_client]] "alter" at B).
class AlteringHop {
 public:
  // request / answer: one byte of every ESPrim object; forged_refusal: the first object is delivered, its answer
  // dropped and a plain 4114 returned instead (which no hop can be kept from doing: refusals are unprotected).
  enum class Alter { request, answer, forged_refusal };
  AlteringHop(const std::string& key_text, transport::Peer b, Alter what) : b_(std::move(b)), what_(what) {
    transport::NodeConfig config;
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = 0;
    config.psk_lookup = [key_text](const transport::PskRequest& request) -> Result<transport::PskGrant> {
      if (request.identity != "gateway-a") return make_error(Errc::not_found, "unknown identity");
      return transport::PskGrant{key_of_text(key_text), "", ""};
    };
    auto node = transport::Node::create(std::move(config));
    REQUIRE(node.ok());
    node_ = std::move(node).value();
    node_->add_route(transport::Method::post, {}, transport::Access::secure,
                     [this, key_text](const transport::Session&, const transport::Request& request,
                                      transport::Responder responder) {
                       // Proxy-Uri coaps://<B>/esprim?to=<AE-ID>: sent on with Uri-Path and Uri-Query.
                       transport::Request forwarded;
                       forwarded.method = request.method;
                       forwarded.path = {"esprim"};
                       const auto query = request.proxy_uri.find('?');
                       if (query != std::string::npos) forwarded.query = {request.proxy_uri.substr(query + 1)};
                       forwarded.content_format = request.content_format;
                       forwarded.payload = what_ == Alter::request ? altered(request.payload) : request.payload;
                       const bool forge = what_ == Alter::forged_refusal && altered_ == 0 && is_object(request.payload);
                       if (forge) ++altered_;
                       auto shared = std::make_shared<transport::Responder>(std::move(responder));
                       node_->request(b_, transport::ClientCredentials::psk("alter", key_of_text(key_text), ""),
                                      std::move(forwarded),
                                      [this, shared, forge](Result<transport::Response> answer,
                                                            const transport::Session*) {
                                        if (forge) {
                                          transport::Response forged;
                                          forged.code = 403;
                                          forged.content_format = 50;
                                          const std::string body =
                                              esp::refusal_body({esp::Rsc::unknown_receiver_rand_id, "forged"});
                                          forged.payload.assign(body.begin(), body.end());
                                          shared->respond(std::move(forged));
                                          return;
                                        }
                                        if (!answer) {
                                          shared->respond(transport::Response::with_text(502, "B did not answer"));
                                          return;
                                        }
                                        transport::Response back = std::move(answer).value();
                                        if (what_ == Alter::answer && back.code == 205) back.payload = altered(back.payload);
                                        shared->respond(std::move(back));
                                      });
                     });
  }
  std::uint16_t port() const { return node_->secure_port(); }
  transport::Node& node() { return *node_; }
  int altered_count() const { return altered_; }

 private:
  static bool is_object(const Bytes& payload) {
    auto info = esp::parse_security_info(text_of(payload));
    return info.ok() && info->type == 5;
  }
  Bytes altered(const Bytes& payload) {
    auto info = esp::parse_security_info(text_of(payload));
    REQUIRE(info.ok());
    REQUIRE(info->type == 5);
    info->object = with_ciphertext_altered(info->object);
    ++altered_;
    const std::string body = esp::to_json_text(*info);
    return Bytes(body.begin(), body.end());
  }
  transport::Peer b_;
  Alter what_;
  int altered_ = 0;
  std::unique_ptr<transport::Node> node_;
};

// Runs a proxied request of meter on another thread while `pump` drives an in-process hop.
CommandResult proxied_while(const Deployment& d, const std::string& method, const std::string& path,
                            const std::string& payload, transport::Node& pump) {
  std::atomic<bool> done{false};
  CommandResult result;
  std::thread client([&] {
    result = d.proxied("CAE-meter", method, path, payload);
    done = true;
  });
  pump.run_until([&] { return done.load(); }, std::chrono::seconds(120));
  client.join();
  return result;
}

}  // namespace

TEST_CASE("ESPrim through a stock forward proxy and a dauthd relay: no hop reads it and an altered byte is caught",
          "[e2e][esprim][relay]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  if (!have_program("coap-server-gnutls")) {
    WARN("coap-server-gnutls not installed (libcoap3-bin); the relay path test is skipped");
    return;
  }
  Deployment d;
  const auto dir = d.dir();
  const std::string b_peer = "127.0.0.1:" + std::to_string(d.ports().at("B_PEER"));
  const std::uint16_t r_port = d.add_port("R_PEER");
  const std::uint16_t proxy_base = free_loopback_ports(2);  // the stock proxy: CoAP on base, DTLS on base + 1
  // Hop keys: the stock proxy takes its key as text (-k); dauthd's key files hold the hex of that text.
  const std::string proxy_key_text = run_command({"openssl", "rand", "-hex", "16"}).output.substr(0, 32);
  const std::string alter_key_text = run_command({"openssl", "rand", "-hex", "16"}).output.substr(0, 32);
  write_file(dir / "keys" / "proxy.key", hex_of_text(proxy_key_text), 0600);
  write_file(dir / "keys" / "alter.key", hex_of_text(alter_key_text), 0600);
  write_file(dir / "keys" / "r-b.key", run_command({"openssl", "rand", "-hex", "32"}).output, 0600);

  // A: ESPrim to valve, via the stock proxy.
  d.insert_config_line("a", "address = \"" + b_peer + "\"", "esprim = \"required\"\nvia = \"proxy-p\"");
  d.edit_config("a", [&](std::string text) {
    return text + "\n[[peer.hop]]\nname = \"proxy-p\"\naddress = \"127.0.0.1:" + std::to_string(proxy_base + 1) +
           "\"\nidentity = \"gateway-a\"\nkey_file = \"" + (dir / "keys" / "proxy.key").string() +
           "\"\n\n[[peer.hop]]\nname = \"alter\"\naddress = \"127.0.0.1:@ALTER_PORT@\"\nidentity = \"gateway-a\""
           "\nkey_file = \"" + (dir / "keys" / "alter.key").string() +
           "\"\n\n[[peer.hop]]\nname = \"alter-answer\"\naddress = \"127.0.0.1:@ALTER_ANSWER_PORT@\"\n"
           "identity = \"gateway-a\"\nkey_file = \"" + (dir / "keys" / "alter.key").string() +
           "\"\n\n[[peer.hop]]\nname = \"forge\"\naddress = \"127.0.0.1:@FORGE_PORT@\"\n"
           "identity = \"gateway-a\"\nkey_file = \"" + (dir / "keys" / "alter.key").string() + "\"\n";
  });
  // B: accepts the relay and the altering hop; meter may also PUT (the marker goes in a request body).
  d.edit_config("b", [&](std::string text) {
    text = replace_all(text, "methods = [\"GET\"]", "methods = [\"GET\", \"PUT\", \"POST\"]");
    return text + "\n[[peer.hop_client]]\nidentity = \"relay-r\"\nkey_file = \"" + (dir / "keys" / "r-b.key").string() +
           "\"\n\n[[peer.hop_client]]\nidentity = \"alter\"\nkey_file = \"" + (dir / "keys" / "alter.key").string() +
           "\"\n";
  });
  // R: a dauthd relay that accepts the stock proxy's upstream identity and forwards to B only.
  std::filesystem::create_directories(dir / "r" / "state");
  std::filesystem::permissions(dir / "r", std::filesystem::perms::owner_all, std::filesystem::perm_options::replace);
  write_file(dir / "r" / "master.key", run_command({"openssl", "rand", "-hex", "32"}).output, 0600);
  write_file(dir / "r.toml",
             "[daemon]\nstate_directory = \"" + (dir / "r" / "state").string() + "\"\ncontrol_socket = \"" +
                 (dir / "r" / "control").string() + "\"\nmaster_key_source = \"file\"\nmaster_key_file = \"" +
                 (dir / "r" / "master.key").string() + "\"\nlog_level = \"debug\"\n\n[peer]\nlisten = \"127.0.0.1:" +
                 std::to_string(r_port) + "\"\n\n[[peer.hop_client]]\nidentity = \"proxy-p\"\nkey_file = \"" +
                 (dir / "keys" / "proxy.key").string() + "\"\n\n[[peer.hop]]\nname = \"gateway-b\"\naddress = \"" +
                 b_peer + "\"\nidentity = \"relay-r\"\nkey_file = \"" + (dir / "keys" / "r-b.key").string() +
                 "\"\n\n[relay]\nenable = true\nallow = [\"" + b_peer + "\"]\n",
             0600);
  DaemonProcess relay({DAUTHD_PATH, "--config", (dir / "r.toml").string()}, {}, dir / "r.log");
  REQUIRE(wait_for_control_socket(dir / "r" / "control"));
  // The stock proxy: forwards every Proxy-Uri to R (its next hop), over DTLS-PSK as proxy-p; -v 7 logs each PDU
  // it handles, so its log shows what it could read.
  DaemonProcess proxy({"/usr/bin/env", "coap-server-gnutls", "-A", "127.0.0.1", "-p", std::to_string(proxy_base),
                       "-k", proxy_key_text, "-u", "proxy-p", "-P",
                       "coaps://127.0.0.1:" + std::to_string(r_port) + ",proxy.invalid", "-v", "7"},
                      {}, dir / "proxy.log");
  for (int i = 0; i < 100 && read_text_file(dir / "proxy.log").find("created DTLS endpoint") == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(read_text_file(dir / "proxy.log").find("created DTLS endpoint") != std::string::npos);

  AlteringHop alter_request(alter_key_text, transport::Peer{"127.0.0.1", d.ports().at("B_PEER")},
                            AlteringHop::Alter::request);
  AlteringHop alter_answer(alter_key_text, transport::Peer{"127.0.0.1", d.ports().at("B_PEER")},
                           AlteringHop::Alter::answer);
  AlteringHop forge(alter_key_text, transport::Peer{"127.0.0.1", d.ports().at("B_PEER")},
                    AlteringHop::Alter::forged_refusal);
  d.edit_config("a", [&](std::string text) {
    text = replace_all(text, "@ALTER_PORT@", std::to_string(alter_request.port()));
    text = replace_all(text, "@ALTER_ANSWER_PORT@", std::to_string(alter_answer.port()));
    return replace_all(text, "@FORGE_PORT@", std::to_string(forge.port()));
  });
  start_all(d);

  // meter -> A -> stock proxy -> dauthd relay -> B -> valve: a PUT carrying a marker, then a GET reading it back.
  const std::string marker = "esprim-marker-" + run_command({"openssl", "rand", "-hex", "8"}).output.substr(0, 16);
  const auto put = d.proxied("CAE-meter", "put", "example_data", marker);
  INFO(put.output);
  REQUIRE(put.exit_code == 0);
  REQUIRE(put.output.find("4.") == std::string::npos);
  CHECK(d.direct("get", "example_data").output.find(marker) != std::string::npos);  // it reached valve
  const auto get = d.proxied("CAE-meter", "get", "example_data");
  INFO(get.output);
  CHECK(get.output.find(marker) != std::string::npos);  // and came back through the hops
  CHECK(d.ctl_json("b", {"stats"}).value("esprim_accepted_total", 0) >= 2);
  // The hops saw the outer messages (the checks below are not empty), never what is inside.
  const auto proxy_log = read_text_file(dir / "proxy.log");
  const auto relay_log = read_text_file(dir / "r.log");
  CHECK(proxy_log.find("m2m:seci") != std::string::npos);
  CHECK(relay_log.find("esprim") != std::string::npos);
  for (const std::string& secret : {marker, std::string("example_data"), std::string("CAE-meter")}) {
    INFO(secret);
    CHECK(proxy_log.find(secret) == std::string::npos);
    CHECK(relay_log.find(secret) == std::string::npos);
  }

  // A hop that changes one byte of the object: B refuses it with 4115, valve gets nothing.
  d.edit_config("a", [](std::string text) { return replace_all(text, "via = \"proxy-p\"", "via = \"alter\""); });
  REQUIRE(d.ctl("a", {"reload"}).exit_code == 0);
  const auto delivered_before = d.ctl_json("b", {"stats"}).value("peer_delivered_total", 0);
  const auto altered = proxied_while(d, "get", "example_data", "", alter_request.node());
  INFO(altered.output);
  CHECK(alter_request.altered_count() >= 1);
  CHECK(altered.output.find("4.03") != std::string::npos);
  CHECK(altered.output.find(marker) == std::string::npos);
  CHECK(d.ctl_json("b", {"stats"}).value("peer_delivered_total", 0) == delivered_before);
  CHECK(d.ctl_json("b", {"stats"}).value("esprim_refused_total", 0) >= 1);
  CHECK(d.wait_for_log("a", "RSC 4115", 10));

  // A hop that changes one byte of the protected answer: A refuses it, and meter gets 5.02 without the content.
  d.edit_config("a", [](std::string text) { return replace_all(text, "via = \"alter\"", "via = \"alter-answer\""); });
  REQUIRE(d.ctl("a", {"reload"}).exit_code == 0);
  const auto answer_altered = proxied_while(d, "get", "example_data", "", alter_answer.node());
  INFO(answer_altered.output);
  CHECK(alter_answer.altered_count() >= 1);
  CHECK(answer_altered.output.find("5.02") != std::string::npos);
  CHECK(answer_altered.output.find(marker) == std::string::npos);
  CHECK(d.ctl_json("a", {"stats"}).value("esprim_answers_rejected_total", 0) >= 1);

  // A hop forges 4114 after B carried out a POST: A sends it again (same rqi) and B does not carry it out twice.
  d.edit_config("a", [](std::string text) { return replace_all(text, "via = \"alter-answer\"", "via = \"forge\""); });
  REQUIRE(d.ctl("a", {"reload"}).exit_code == 0);
  const auto b_before = d.ctl_json("b", {"stats"});
  const auto posted = proxied_while(d, "post", "example_data", "posted-once", forge.node());
  INFO(posted.output);
  CHECK(forge.altered_count() == 1);
  CHECK(posted.output.find("4.03") != std::string::npos);
  const auto b_after = d.ctl_json("b", {"stats"});
  CHECK(b_after.value("peer_delivered_total", 0) == b_before.value("peer_delivered_total", 0) + 1);
  CHECK(b_after.value("esprim_refused_total", 0) == b_before.value("esprim_refused_total", 0) + 1);
  CHECK(d.wait_for_log("b", "already carried out", 10));
}

// ESPrim end to end (PROTOCOL.md §7): gateway A protects meter's request to valve (peer.address esprim =
// "required"), gateway B opens it, checks it and answers protected. Then the test itself plays a rogue originator
// with meter's keys, read from A's stopped key store: an object naming another AE as its originator (4116), one
// with a byte changed (4115), one sent twice, and one sent again after B restarted are refused, and none reaches
// valve. A dauthd with ESPrim off is refused by A with a reason, never reached unprotected.
#include <signal.h>

#include <catch2/catch.hpp>
#include <string>

#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/esprim.hpp"
#include "dauth/transport/transport.hpp"
#include "e2e_support.hpp"

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
  // Nothing refused reached valve.
  CHECK(d.ctl_json("b", {"stats"}).value("peer_delivered_total", 0) == delivered_before);

  INFO("after B restarts, neither a replay nor a new object under the old rand object is accepted");
  const auto unsent = request_from("CAE-meter", "rogue-4");
  d.stop("b", SIGTERM);
  d.start("b");
  CHECK(refusal_rsc(request_once(b, hop, protected_message(honest.compact))) == esp::Rsc::unknown_receiver_rand_id);
  CHECK(refusal_rsc(request_once(b, hop, protected_message(unsent.compact))) == esp::Rsc::unknown_receiver_rand_id);
  CHECK(d.ctl_json("b", {"stats"}).value("peer_delivered_total", 0) == 0);
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

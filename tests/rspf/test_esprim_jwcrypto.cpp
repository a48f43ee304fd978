// ESPrim against an independent peer (tests/rspf/esprim_reference.py): python3-jwcrypto for the JWE and Python's
// hmac for sessionESPrimKey, computed there from the pairwise key and the two rand objects' canonical texts. The
// pairwise key travels to the child on its stdin only.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <string>

#include "dauth/rspf/esprim.hpp"
#include "support.hpp"

namespace {

using namespace dauth;
using namespace dauth::rspf::esprim;
using nlohmann::json;

constexpr const char* kKid = "00112233445566778899aabbccddeeff@mef.example.net";
constexpr const char* kSender = "C-sensor";
constexpr const char* kTarget = "C-meter";

const std::string kScript = std::string(DAUTH_SOURCE_DIR) + "/tests/rspf/esprim_reference.py";

// Runs the reference peer with one request; the answer's JSON, or a failure with the child's reason.
json reference(json request) {
  const auto result = dauth::test::run_command({"/usr/bin/python3", kScript}, request.dump());
  INFO("esprim_reference.py " << request["op"].get<std::string>() << ": " << result.output);
  REQUIRE(result.exit_code == 0);
  return json::parse(result.output);
}

InnerRequest request_to(std::string rqi) {
  InnerRequest request;
  request.operation = 3;
  request.to = kTarget;
  request.from = kSender;
  request.request_id = std::move(rqi);
  request.path = {"config"};
  request.content_format = 50;
  request.content = {'{', '}'};
  return request;
}

}  // namespace

TEST_CASE("ESPrim objects interoperate with python3-jwcrypto and Python's hmac", "[esprim][interop]") {
  if (dauth::test::run_command({"/usr/bin/python3", "-c", "import jwcrypto"}).exit_code != 0) {
    // The independent JOSE peer is part of what this test proves; scripts/install-deps installs it.
    FAIL("python3-jwcrypto is not installed for /usr/bin/python3: run scripts/install-deps");
  }
  const SecretBuffer pairwise = SecretBuffer::random(32);
  const std::string pairwise_hex = to_hex(pairwise.view());  // test key: on the child's stdin only
  Receiver receiver;
  const RandObject rand = receiver.current_rand_object();
  const json receiver_rand = json::parse(canonical_text(rand));
  // What the daemon does with a received object: the key for a known kid, none for any other.
  const auto deliver = [&](const std::string& compact) -> Checked<OpenedRequest> {
    auto inspected = receiver.inspect(compact);
    if (auto* refusal = std::get_if<Refusal>(&inspected)) return *refusal;
    const Inspected& header = std::get<Inspected>(inspected);
    return receiver.open(header, header.header.kid == kKid ? &pairwise : nullptr, kSender, kTarget);
  };

  SECTION("objects made by the Originator open in jwcrypto with a key computed in Python") {
    Originator originator;
    REQUIRE(originator.set_receiver_rand(kKid, kTarget, rand).ok());
    const InnerRequest request = request_to("rq-1");
    auto first = originator.protect(kKid, pairwise, request);
    REQUIRE(first.ok());
    const json opened = reference({{"op", "open"}, {"pairwise", pairwise_hex}, {"receiver_rand", receiver_rand},
                                   {"jwe", first->compact}, {"cty", kRequestMediaType},
                                   {"expect", {{"kid", kKid}, {"seq", 0}, {"ori", first->ori}}}});
    CHECK(opened["plaintext"] == to_json_text(request));
    CHECK(opened["header"].contains("oro"));
    const json originator_rand = opened["header"]["oro"];

    // The receiver's answer, and a later request without oro (the originator object given separately).
    const OpenedRequest at_receiver = std::get<OpenedRequest>(deliver(first->compact));
    InnerResponse response;
    response.request_id = "rq-1";
    response.coap_code = 204;
    const std::string answer = std::get<std::string>(receiver.protect_response(at_receiver, response));
    const json opened_answer =
        reference({{"op", "open"}, {"pairwise", pairwise_hex}, {"receiver_rand", receiver_rand},
                   {"originator_rand", originator_rand}, {"jwe", answer}, {"cty", kResponseMediaType},
                   {"expect", {{"kid", kKid}, {"seq", 0}}}});
    CHECK(opened_answer["plaintext"] == to_json_text(response));
    REQUIRE(originator.open_response(*first, answer).ok());
    auto second = originator.protect(kKid, pairwise, request_to("rq-2"));
    REQUIRE(second.ok());
    const json opened_second =
        reference({{"op", "open"}, {"pairwise", pairwise_hex}, {"receiver_rand", receiver_rand},
                   {"originator_rand", originator_rand}, {"jwe", second->compact}, {"cty", kRequestMediaType},
                   {"expect", {{"seq", 1}}}});
    CHECK_FALSE(opened_second["header"].contains("oro"));
    CHECK(opened_second["plaintext"] == to_json_text(request_to("rq-2")));

    // Python refuses what it must: another pairwise key.
    const auto refused = dauth::test::run_command(
        {"/usr/bin/python3", kScript},
        json{{"op", "open"}, {"pairwise", to_hex(SecretBuffer::random(32).view())}, {"receiver_rand", receiver_rand},
             {"jwe", first->compact}, {"cty", kRequestMediaType}}
            .dump());
    CHECK(refused.exit_code != 0);
  }

  SECTION("objects made in Python are accepted by the Receiver and its answers open in Python") {
    const InnerRequest request = request_to("py-1");
    const json made = reference({{"op", "make"}, {"pairwise", pairwise_hex}, {"receiver_rand", receiver_rand},
                                 {"kid", kKid}, {"seq", 0}, {"plaintext", to_json_text(request)}});
    auto opened = deliver(made["jwe"].get<std::string>());
    if (auto* refusal = std::get_if<Refusal>(&opened)) FAIL(refusal->reason);
    const OpenedRequest& at_receiver = std::get<OpenedRequest>(opened);
    CHECK(to_json_text(at_receiver.request) == to_json_text(request));
    CHECK(at_receiver.ori == made["originator_rand"]["esri"]);

    InnerResponse response;
    response.request_id = "py-1";
    response.rsc = 4000;
    response.coap_code = 404;
    response.content = {'n', 'o'};
    const std::string answer = std::get<std::string>(receiver.protect_response(at_receiver, response));
    const json opened_answer =
        reference({{"op", "open"}, {"pairwise", pairwise_hex}, {"receiver_rand", receiver_rand},
                   {"originator_rand", made["originator_rand"]}, {"jwe", answer}, {"cty", kResponseMediaType},
                   {"expect", {{"kid", kKid}, {"seq", 0}, {"ori", at_receiver.ori}, {"rri", rand.id}}}});
    CHECK(opened_answer["plaintext"] == to_json_text(response));

    // The session goes on without oro; a replay of the first object is refused.
    const json next = reference({{"op", "make"}, {"pairwise", pairwise_hex}, {"receiver_rand", receiver_rand},
                                 {"originator_rand", made["originator_rand"]}, {"kid", kKid}, {"seq", 1},
                                 {"oro", false}, {"plaintext", to_json_text(request_to("py-2"))}});
    auto opened_next = deliver(next["jwe"].get<std::string>());
    REQUIRE(std::holds_alternative<OpenedRequest>(opened_next));
    CHECK(std::get<OpenedRequest>(opened_next).request.request_id == "py-2");
    auto replayed = deliver(made["jwe"].get<std::string>());
    REQUIRE(std::holds_alternative<Refusal>(replayed));
    CHECK(std::get<Refusal>(replayed).rsc == Rsc::replayed);
  }

  SECTION("objects tampered with in Python are refused with the right code") {
    const std::pair<const char*, Rsc> cases[] = {
        {"header", Rsc::bad_mac},     {"iv", Rsc::bad_mac},           {"ciphertext", Rsc::bad_mac},
        {"tag", Rsc::bad_mac},        {"kid", Rsc::unknown_key_id},   {"ori", Rsc::unsupported_option},
        {"rri", Rsc::unknown_receiver_rand_id},
    };
    for (const auto& [tamper, rsc] : cases) {
      const json made = reference({{"op", "make"}, {"pairwise", pairwise_hex}, {"receiver_rand", receiver_rand},
                                   {"kid", kKid}, {"seq", 0}, {"plaintext", to_json_text(request_to("t"))},
                                   {"tamper", tamper}});
      auto result = deliver(made["jwe"].get<std::string>());
      INFO("tampered " << tamper);
      REQUIRE(std::holds_alternative<Refusal>(result));
      CHECK(std::get<Refusal>(result).rsc == rsc);
    }
    CHECK(receiver.stats().sessions == 0);
    // An ori no session knows, without oro: 4113.
    const json without_oro = reference({{"op", "make"}, {"pairwise", pairwise_hex}, {"receiver_rand", receiver_rand},
                                        {"kid", kKid}, {"seq", 0}, {"oro", false},
                                        {"plaintext", to_json_text(request_to("t"))}});
    auto result = deliver(without_oro["jwe"].get<std::string>());
    REQUIRE(std::holds_alternative<Refusal>(result));
    CHECK(std::get<Refusal>(result).rsc == Rsc::unknown_originator_rand_id);
  }
}

// RSPF message encodings (docs/PROTOCOL.md §3–5): round trips in CBOR and JSON, cross-checked with nlohmann's own
// CBOR codec as an independent implementation, and refusals that name the key.
#include <catch2/catch.hpp>

#include <cstring>
#include <nlohmann/json.hpp>
#include <sodium.h>

#include "dauth/rspf/messages.hpp"
#include "dauth/rspf/role_support.hpp"

using dauth::ByteView;
using dauth::Bytes;
using dauth::SecretBuffer;
using nlohmann::json;
namespace rspf = dauth::rspf;

namespace {
Bytes cbor(const json& document) { return json::to_cbor(document); }
Bytes text(const std::string& s) { return Bytes(s.begin(), s.end()); }
const char* kKeId = "00112233445566778899AABBCCDDEEFF@mef.example.net";
}  // namespace

TEST_CASE("enrolment request and response round-trip in CBOR and JSON", "[messages]") {
  for (auto format : {rspf::ContentFormat::cbor, rspf::ContentFormat::json}) {
    rspf::EnrolmentRequest request{true, false, false};
    auto decoded = rspf::decode_enrolment_request(rspf::encode(request, format), format);
    REQUIRE(decoded.ok());
    REQUIRE(decoded->cert_enrolment);
    REQUIRE_FALSE(decoded->maf_enrolment);

    rspf::EnrolmentResponse response{kKeId, "CAE-meter", {"CAE-valve", "/in-cse/CAE-x"}, 1900000000,
                                     {{"certEnrolment", "/.well-known/est"}}};
    auto back = rspf::decode_enrolment_response(rspf::encode(response, format), format);
    REQUIRE(back.ok());
    REQUIRE(back->ke_id == kKeId);
    REQUIRE(back->enrolee_id == "CAE-meter");
    REQUIRE(back->targets == response.targets);
    REQUIRE(back->expiry == 1900000000);
    REQUIRE(back->instructions.size() == 1);
    REQUIRE(back->instructions[0].uri == "/.well-known/est");
  }
}

TEST_CASE("the enrolment request uses TS-0003's three indications by name", "[messages]") {
  const json wire = json::from_cbor(rspf::encode(rspf::EnrolmentRequest{false, false, true}, rspf::ContentFormat::cbor));
  REQUIRE(wire == json({{"certEnrolment", false}, {"mafEnrolment", false}, {"remoteMgmt", true}}));
  auto lenient = rspf::decode_enrolment_request(text(R"({"certEnrolment":true,"future":1})"), rspf::ContentFormat::json);
  REQUIRE(lenient.ok());
  REQUIRE(lenient->cert_enrolment);
}

TEST_CASE("malformed and mistyped messages are refused with the key named", "[messages]") {
  auto bad_type = rspf::decode_enrolment_request(cbor({{"certEnrolment", "yes"}}), rspf::ContentFormat::cbor);
  REQUIRE_THAT(bad_type.error().message, Catch::Contains("\"certEnrolment\" must be a boolean"));
  auto not_map = rspf::decode_enrolment_request(cbor(json::array({1, 2})), rspf::ContentFormat::cbor);
  REQUIRE_THAT(not_map.error().message, Catch::Contains("top level must be a map"));
  auto garbage = rspf::decode_enrolment_request(text("\xff\x00\x13"), rspf::ContentFormat::cbor);
  REQUIRE(garbage.error().code == dauth::Errc::parse);
  auto truncated = cbor({{"certEnrolment", true}});
  truncated.pop_back();
  REQUIRE_FALSE(rspf::decode_enrolment_request(truncated, rspf::ContentFormat::cbor).ok());
  auto missing = rspf::decode_enrolment_response(cbor({{"keId", kKeId}}), rspf::ContentFormat::cbor);
  REQUIRE_THAT(missing.error().message, Catch::Contains("\"enroleeId\" is missing"));
  auto bad_target = rspf::decode_enrolment_response(
      cbor({{"keId", kKeId}, {"enroleeId", "CAE-a"}, {"targets", {"no spaces"}}, {"expiry", 1}}),
      rspf::ContentFormat::cbor);
  REQUIRE_THAT(bad_target.error().message, Catch::Contains("'no spaces'"));
  auto bad_ke_id = rspf::decode_enrolment_response(
      cbor({{"keId", "ABC@mef"}, {"enroleeId", "CAE-a"}, {"targets", json::array()}, {"expiry", 1}}),
      rspf::ContentFormat::cbor);
  REQUIRE_THAT(bad_ke_id.error().message, Catch::Contains("KeID"));
  const Bytes huge(rspf::kMaxPayloadSize + 1, 0xa0);
  REQUIRE(rspf::decode_enrolment_request(huge, rspf::ContentFormat::cbor).error().code == dauth::Errc::limit);
}

TEST_CASE("the fetchCredentials answer: our CBOR writer and reader agree with nlohmann's codec", "[messages]") {
  rspf::FetchCredentialsResponse response{SecretBuffer::random(32), "CAE-meter", 86400};
  const SecretBuffer wire = rspf::encode(response);
  const json independent = json::from_cbor(wire.data(), wire.data() + wire.size());
  REQUIRE(independent["enroleeId"] == "CAE-meter");
  REQUIRE(independent["lifetime"] == 86400);
  REQUIRE(response.credential.equals(ByteView(independent["credential"].get_binary())));

  // nlohmann encodes (maps sorted, other integer widths), ours decodes.
  json document = {{"credential", json::binary(std::vector<std::uint8_t>(32, 7))},
                   {"enroleeId", "/in-cse/CAE-m"},
                   {"lifetime", 70000},
                   {"unknown", {{"nested", json::array({1, "two", 3.5})}}}};
  auto decoded = rspf::decode_fetch_credentials_response(cbor(document));
  REQUIRE(decoded.ok());
  REQUIRE(decoded->enrolee_id == "/in-cse/CAE-m");
  REQUIRE(decoded->lifetime_s == 70000);
  REQUIRE(decoded->credential.equals(ByteView(std::vector<std::uint8_t>(32, 7))));
}

TEST_CASE("the fetchCredentials reader refuses every malformed shape", "[messages]") {
  const auto key = json::binary(std::vector<std::uint8_t>(32, 1));
  const json good = {{"credential", key}, {"enroleeId", "CAE-a"}, {"lifetime", 5}};
  REQUIRE(rspf::decode_fetch_credentials_response(cbor(good)).ok());
  struct Case {
    json document;
    const char* says;
  };
  const Case cases[] = {
      {{{"credential", json::binary(std::vector<std::uint8_t>(31, 1))}, {"enroleeId", "CAE-a"}, {"lifetime", 5}},
       "32 bytes"},
      {{{"credential", "text"}, {"enroleeId", "CAE-a"}, {"lifetime", 5}}, "32 bytes"},
      {{{"credential", key}, {"enroleeId", "CAE a"}, {"lifetime", 5}}, "'CAE a'"},
      {{{"credential", key}, {"enroleeId", "CAE-a"}, {"lifetime", 0}}, "positive"},
      {{{"credential", key}, {"enroleeId", "CAE-a"}, {"lifetime", -4}}, "positive"},
      {{{"credential", key}, {"enroleeId", "CAE-a"}}, "\"lifetime\" is missing"},
      {{{"enroleeId", "CAE-a"}, {"lifetime", 5}}, "\"credential\" is missing"},
      {json::array({1}), "must be a CBOR map"},
  };
  for (const auto& c : cases) {
    auto result = rspf::decode_fetch_credentials_response(cbor(c.document));
    INFO(c.document.dump());
    REQUIRE_FALSE(result.ok());
    REQUIRE_THAT(result.error().message, Catch::Contains(c.says));
  }
  Bytes wire = cbor(good);
  for (std::size_t cut = 0; cut < wire.size(); ++cut) {
    REQUIRE_FALSE(rspf::decode_fetch_credentials_response(ByteView(wire.data(), cut)).ok());
  }
  wire.push_back(0);
  REQUIRE_THAT(rspf::decode_fetch_credentials_response(wire).error().message, Catch::Contains("1 bytes after the"));
  // Indefinite-length items and absurd counts are refused, not followed.
  REQUIRE_FALSE(rspf::decode_fetch_credentials_response(text("\xbf\xff")).ok());
  REQUIRE_FALSE(rspf::decode_fetch_credentials_response(text("\xbb\xff\xff\xff\xff\xff\xff\xff\xff")).ok());
  // Deep nesting under an unknown key stops at the depth limit.
  Bytes deep = {0xa1, 0x61, 'x'};
  deep.insert(deep.end(), 40, 0x81);
  deep.push_back(0x00);
  REQUIRE_FALSE(rspf::decode_fetch_credentials_response(deep).ok());
}

TEST_CASE("error bodies and the credential feed round-trip", "[messages]") {
  for (auto format : {rspf::ContentFormat::cbor, rspf::ContentFormat::json}) {
    auto error = rspf::decode_error_body(rspf::encode(rspf::ErrorBody{"denied", "not a target"}, format), format);
    REQUIRE(error.ok());
    REQUIRE(error->detail == "not a target");
    rspf::CredentialFeed feed{{kKeId}, {"00112233445566778899aabbccddeeff@MEF.example.net"}};
    auto back = rspf::decode_credential_feed(rspf::encode(feed, format), format);
    REQUIRE(back.ok());
    REQUIRE(back->issued == std::vector<std::string>{kKeId});
    REQUIRE(back->revoked == std::vector<std::string>{kKeId});  // canonicalised
  }
}

TEST_CASE("the credential feed is byte-exact as PROTOCOL.md §4 shows, and capped at 1024 KeIDs per list",
          "[messages]") {
  const Bytes cbor = rspf::encode(rspf::CredentialFeed{{kKeId}, {}}, rspf::ContentFormat::cbor);
  std::string hex;
  for (const auto byte : cbor) {
    static constexpr char kDigits[] = "0123456789abcdef";
    hex += kDigits[byte >> 4];
    hex += kDigits[byte & 0xf];
  }
  std::string ke_id_hex;
  for (const char c : std::string(kKeId)) {
    static constexpr char kDigits[] = "0123456789abcdef";
    ke_id_hex += kDigits[static_cast<unsigned char>(c) >> 4];
    ke_id_hex += kDigits[static_cast<unsigned char>(c) & 0xf];
  }
  // { "issued": [KeID], "revoked": [] }: map(2), text(6) "issued", array(1), text(48) KeID, text(7) "revoked", [].
  CHECK(hex == "a2" "66697373756564" "81" "7830" + ke_id_hex + "67" "7265766f6b6564" "80");
  const Bytes json_text = rspf::encode(rspf::CredentialFeed{{kKeId}, {}}, rspf::ContentFormat::json);
  CHECK(std::string(json_text.begin(), json_text.end()) == std::string("{\"issued\":[\"") + kKeId + "\"],\"revoked\":[]}");

  rspf::CredentialFeed full;
  full.issued.assign(rspf::kMaxCredentialFeedEntries, kKeId);
  REQUIRE(rspf::decode_credential_feed(rspf::encode(full, rspf::ContentFormat::cbor), rspf::ContentFormat::cbor).ok());
  full.issued.push_back(kKeId);
  REQUIRE_FALSE(
      rspf::decode_credential_feed(rspf::encode(full, rspf::ContentFormat::cbor), rspf::ContentFormat::cbor).ok());
}

TEST_CASE("the versioned credential feed is byte-exact as PROTOCOL.md §4 shows, and malformed versions are refused",
          "[messages]") {
  const auto hex_of = [](const Bytes& bytes) {
    static constexpr char kDigits[] = "0123456789abcdef";
    std::string hex;
    for (const auto byte : bytes) {
      hex += kDigits[byte >> 4];
      hex += kDigits[byte & 0xf];
    }
    return hex;
  };
  const std::string ke_id_hex = hex_of(Bytes(kKeId, kKeId + std::strlen(kKeId)));
  rspf::CredentialFeed whole{{kKeId}, {}, 7, std::nullopt, 4660};
  // { "epoch": 4660, "issued": [KeID], "revoked": [], "version": 7 }
  CHECK(hex_of(rspf::encode(whole, rspf::ContentFormat::cbor)) ==
        "a4" "6565706f6368" "191234" "66697373756564" "81" "7830" + ke_id_hex + "67" "7265766f6b6564" "80" "67"
        "76657273696f6e" "07");
  rspf::CredentialFeed delta{{}, {kKeId}, 7, 6, 4660};
  // { "epoch": 4660, "issued": [], "revoked": [KeID], "since": 6, "version": 7 }
  CHECK(hex_of(rspf::encode(delta, rspf::ContentFormat::cbor)) ==
        "a5" "6565706f6368" "191234" "66697373756564" "80" "67" "7265766f6b6564" "81" "7830" + ke_id_hex + "65"
        "73696e6365" "06" "67" "76657273696f6e" "07");
  const Bytes json_text = rspf::encode(delta, rspf::ContentFormat::json);
  CHECK(std::string(json_text.begin(), json_text.end()) ==
        std::string("{\"epoch\":4660,\"issued\":[],\"revoked\":[\"") + kKeId + "\"],\"since\":6,\"version\":7}");
  for (auto format : {rspf::ContentFormat::cbor, rspf::ContentFormat::json}) {
    auto back = rspf::decode_credential_feed(rspf::encode(delta, format), format);
    REQUIRE(back.ok());
    CHECK(back->version == 7);
    CHECK(back->since == 6);
    CHECK(back->epoch == 4660);
    CHECK(back->revoked == std::vector<std::string>{kKeId});
    auto unversioned = rspf::decode_credential_feed(rspf::encode(rspf::CredentialFeed{{kKeId}, {}}, format), format);
    REQUIRE(unversioned.ok());
    CHECK_FALSE(unversioned->version.has_value());
  }

  const auto refused = [](const std::string& json_body) {
    auto decoded = rspf::decode_credential_feed(ByteView::of(json_body), rspf::ContentFormat::json);
    REQUIRE_FALSE(decoded.ok());
    return decoded.error().message;
  };
  CHECK(refused(R"({"issued":[],"since":3})") == "credential feed: \"since\" without \"version\"");
  CHECK(refused(R"({"issued":[],"version":7})") == "credential feed: \"epoch\" and \"version\" go together");
  CHECK(refused(R"({"epoch":1,"issued":[]})") == "credential feed: \"epoch\" and \"version\" go together");
  CHECK(refused(R"({"epoch":-2,"issued":[],"version":7})").find("\"epoch\" must be an unsigned integer") !=
        std::string::npos);
  CHECK(refused(R"({"issued":[],"since":8,"version":7})") == "credential feed: \"since\" 8 is above \"version\" 7");
  CHECK(refused(R"({"issued":[],"version":-1})").find("\"version\" must be an unsigned integer") != std::string::npos);
  CHECK(refused(R"({"issued":[],"version":"7"})").find("\"version\" must be an unsigned integer") != std::string::npos);
  CHECK(refused(R"({"issued":["not a KeID"],"version":7})").find("\"issued\" must be an array of KeIDs") !=
        std::string::npos);
  const std::string oversized(rspf::kMaxCredentialFeedSize + 1, ' ');
  auto too_big = rspf::decode_credential_feed(ByteView::of(oversized), rspf::ContentFormat::json);
  REQUIRE_FALSE(too_big.ok());
  CHECK(too_big.error().code == dauth::Errc::limit);
  CHECK(too_big.error().message.find("exceeds 131072") != std::string::npos);
}

TEST_CASE("fetchCredentials paths parse and print", "[messages]") {
  auto path = rspf::parse_fetch_credentials_path({"fetchCredentials", kKeId, "22"});
  REQUIRE(path.ok());
  REQUIRE(path->suid == dauth::crypto::Suid::rspf_key_for_saef);
  REQUIRE(rspf::fetch_credentials_path(path->ke_id, path->suid) ==
          std::vector<std::string>{"fetchCredentials", kKeId, "22"});
  REQUIRE(rspf::parse_fetch_credentials_path({"fetchCredentials", kKeId}).error().code == dauth::Errc::not_found);
  auto esprim = rspf::parse_fetch_credentials_path({"fetchCredentials", kKeId, "23"});
  REQUIRE(esprim.ok());
  REQUIRE(esprim->suid == dauth::crypto::Suid::rspf_key_for_esprim);
  REQUIRE(rspf::fetch_credentials_path(esprim->ke_id, esprim->suid) ==
          std::vector<std::string>{"fetchCredentials", kKeId, "23"});
  REQUIRE_FALSE(rspf::parse_fetch_credentials_path({"fetchCredentials", kKeId, "24"}).ok());
  REQUIRE_FALSE(rspf::parse_fetch_credentials_path({"fetchCredentials", "nope", "22"}).ok());
  REQUIRE(rspf::content_format_from(60).ok());
  REQUIRE(rspf::content_format_from(42).error().code == dauth::Errc::unsupported);
}

TEST_CASE("CBOR that nlohmann's reader throws on is refused as a parse error (fuzz regression)", "[messages]") {
  // Found by fuzz_rspf_messages: a map nested in a map claiming 2^64-1 entries made nlohmann throw out_of_range.
  const std::string found = "o29jZWxtZW50cgB0RUVucm9sbWVudPXBbWFmRW5ydG9sbWVudPT1wW1udPT1wW1hu0Vhu0Vucm9FbnJvXWxtavQ=";
  std::vector<std::uint8_t> input(found.size());
  std::size_t length = 0;
  REQUIRE(sodium_base642bin(input.data(), input.size(), found.data(), found.size(), nullptr, &length, nullptr,
                            sodium_base64_VARIANT_ORIGINAL) == 0);
  input.resize(length);
  for (auto format : {rspf::ContentFormat::cbor, rspf::ContentFormat::json}) {
    auto result = rspf::decode_enrolment_request(input, format);
    REQUIRE_FALSE(result.ok());
    REQUIRE(result.error().code == dauth::Errc::parse);
  }
  Bytes deep(30, 0x81);
  deep.push_back(0xa0);
  REQUIRE_THAT(rspf::decode_enrolment_request(deep, rspf::ContentFormat::cbor).error().message,
               Catch::Contains("nesting"));
}

namespace {
// CBOR text-string item of raw bytes (which need not be UTF-8): major type 3, length below 24.
Bytes cbor_text(const std::string& bytes) {
  Bytes out;
  out.reserve(1 + bytes.size());
  out.push_back(static_cast<std::uint8_t>(0x60 | bytes.size()));
  for (const char c : bytes) out.push_back(static_cast<std::uint8_t>(c));
  return out;
}
Bytes cbor_map(std::initializer_list<std::pair<Bytes, Bytes>> entries) {
  Bytes out{static_cast<std::uint8_t>(0xa0 | entries.size())};
  for (const auto& [key, value] : entries) {
    out.insert(out.end(), key.begin(), key.end());
    out.insert(out.end(), value.begin(), value.end());
  }
  return out;
}
const Bytes kTrue{0xf5};
const Bytes kFalse{0xf4};
}  // namespace

TEST_CASE("CBOR text strings must be valid UTF-8 and map keys must not repeat in every RSPF message",
          "[messages][strict]") {
  const auto cert = cbor_text("certEnrolment");
  struct Case {
    const char* name;
    Bytes wire;
    const char* says;
  };
  const Case cases[] = {
      {"invalid UTF-8 key", cbor_map({{cert, kTrue}, {cbor_text("x\xff"), kTrue}}), "not valid UTF-8"},
      {"invalid UTF-8 value", cbor_map({{cert, kTrue}, {cbor_text("note"), cbor_text("\xc3\x28")}}),
       "not valid UTF-8"},
      {"overlong encoding", cbor_map({{cert, kTrue}, {cbor_text("note"), cbor_text("\xc0\xaf")}}), "not valid UTF-8"},
      {"UTF-16 surrogate", cbor_map({{cert, kTrue}, {cbor_text("note"), cbor_text("\xed\xa0\x80")}}),
       "not valid UTF-8"},
      {"truncated sequence", cbor_map({{cert, kTrue}, {cbor_text("note"), cbor_text("ok\xe2\x82")}}),
       "not valid UTF-8"},
      {"above U+10FFFF", cbor_map({{cert, kTrue}, {cbor_text("note"), cbor_text("\xf4\x90\x80\x80")}}),
       "not valid UTF-8"},
      {"duplicate key", cbor_map({{cert, kFalse}, {cert, kTrue}}), "'certEnrolment' appears more than once"},
      {"duplicate unknown key", cbor_map({{cert, kTrue}, {cbor_text("x"), kTrue}, {cbor_text("x"), kFalse}}),
       "'x' appears more than once"},
      {"duplicate key in a nested map",
       cbor_map({{cert, kTrue}, {cbor_text("x"), cbor_map({{cbor_text("a"), kTrue}, {cbor_text("a"), kTrue}})}}),
       "'a' appears more than once"},
      {"integer map key", cbor_map({{cert, kTrue}, {Bytes{0x01}, kTrue}}), "map key is not a text string"},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    auto request = rspf::decode_enrolment_request(c.wire, rspf::ContentFormat::cbor);
    REQUIRE_FALSE(request.ok());
    CHECK(request.error().code == dauth::Errc::parse);
    CHECK_THAT(request.error().message, Catch::Contains(c.says));
    // The same check guards every decoder, the hand-written fetchCredentials reader included.
    CHECK_THAT(rspf::decode_error_body(c.wire, rspf::ContentFormat::cbor).error().message, Catch::Contains(c.says));
    CHECK_THAT(rspf::decode_credential_feed(c.wire, rspf::ContentFormat::cbor).error().message,
               Catch::Contains(c.says));
    CHECK_THAT(rspf::decode_enrolment_response(c.wire, rspf::ContentFormat::cbor).error().message,
               Catch::Contains(c.says));
    CHECK_THAT(rspf::decode_revocation_list(c.wire, rspf::ContentFormat::cbor).error().message,
               Catch::Contains(c.says));
    CHECK_THAT(rspf::decode_fetch_credentials_response(c.wire).error().message, Catch::Contains(c.says));
  }
  // A repeated known key in the fetchCredentials answer: the hand-written reader would have let the last one win.
  const auto key = cbor_text("credential");
  Bytes credential{0x58, 0x20};
  credential.insert(credential.end(), 32, 7);
  const auto twice = cbor_map({{key, credential},
                               {cbor_text("enroleeId"), cbor_text("CAE-a")},
                               {cbor_text("lifetime"), Bytes{0x05}},
                               {key, credential}});
  CHECK_THAT(rspf::decode_fetch_credentials_response(twice).error().message,
             Catch::Contains("'credential' appears more than once"));

  // Valid UTF-8 of every length and distinct keys still pass.
  auto fine = rspf::decode_enrolment_request(
      cbor_map({{cert, kTrue}, {cbor_text("note"), cbor_text("\x7f\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80")}}),
      rspf::ContentFormat::cbor);
  REQUIRE(fine.ok());
  CHECK(fine->cert_enrolment);
}

TEST_CASE("a JSON map key that repeats is refused too", "[messages][strict]") {
  auto twice = rspf::decode_enrolment_request(text(R"({"certEnrolment":false,"certEnrolment":true})"),
                                              rspf::ContentFormat::json);
  REQUIRE_FALSE(twice.ok());
  CHECK_THAT(twice.error().message, Catch::Contains("'certEnrolment' appears more than once"));
  auto nested = rspf::decode_enrolment_request(text(R"({"certEnrolment":true,"x":{"a":1,"b":{"a":2},"a":3}})"),
                                               rspf::ContentFormat::json);
  REQUIRE_FALSE(nested.ok());
  CHECK_THAT(nested.error().message, Catch::Contains("'a' appears more than once"));
  // The same key in sibling or nested maps is not a repetition.
  auto siblings = rspf::decode_enrolment_request(
      text(R"({"certEnrolment":true,"x":[{"a":1},{"a":2}],"y":{"a":{"a":3}}})"), rspf::ContentFormat::json);
  REQUIRE(siblings.ok());
  auto invalid =
      rspf::decode_enrolment_request(text("{\"certEnrolment\":true,\"x\xff\":1}"), rspf::ContentFormat::json);
  REQUIRE_FALSE(invalid.ok());
  CHECK(invalid.error().code == dauth::Errc::parse);
}

TEST_CASE("a peer's refusal text is read without control characters and at bounded length") {
  // The detail is the peer's own text; it reaches the log and dauthctl show (issue 15 review: ESC sequences).
  dauth::transport::Response answer;
  answer.code = 403;
  answer.content_format = static_cast<std::uint16_t>(rspf::ContentFormat::cbor);
  const std::string detail = "policy\x1b]0;owned\x07 line\nbreak \xc2\x9b" "31m" + std::string(200, 'x');  // within the body's 256 bytes
  answer.payload = rspf::encode(rspf::ErrorBody{"denied\r", detail}, rspf::ContentFormat::cbor);
  const std::string message = rspf::error_from_response("CAE-valve", answer).message;
  INFO(message);
  CHECK(message.rfind("CAE-valve answered 4.03: denied?: policy?]0;owned? line?break ?31mxxx", 0) == 0);
  for (const char c : message) CHECK((static_cast<unsigned char>(c) >= 0x20 && c != 0x7f));
  CHECK(message.size() < 300);
  CHECK(message.substr(message.size() - 3) == "...");
}

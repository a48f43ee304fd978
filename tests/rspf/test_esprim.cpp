// ESPrim (rspf/esprim.hpp): rand objects, the session key, the replay window, and Originator and Receiver against
// each other with a fake clock. Objects are tampered with the way a hop could: a header member changed and the header
// re-encoded, a character of the IV, ciphertext or tag changed.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "dauth/crypto/jose.hpp"
#include "dauth/rspf/esprim.hpp"
#include "support.hpp"

namespace {

using namespace dauth;
using namespace dauth::rspf::esprim;
using nlohmann::json;

constexpr const char* kKid = "00112233445566778899aabbccddeeff@mef.example.net";
constexpr const char* kSender = "C-sensor";
constexpr const char* kTarget = "C-meter";
constexpr std::int64_t kStart = 1767225600;  // 2026-01-01T00:00:00Z

Bytes bytes_of(std::string_view text) { return Bytes(text.begin(), text.end()); }

Bytes counting_bytes(std::uint8_t first, std::size_t size) {
  Bytes out(size);
  for (std::size_t i = 0; i < size; ++i) out[i] = static_cast<std::uint8_t>(first + i);
  return out;
}

SecretBuffer pairwise_key() { return SecretBuffer::copy_of(counting_bytes(100, 32)); }

// A clock the test moves.
struct FakeClock {
  std::shared_ptr<std::int64_t> now = std::make_shared<std::int64_t>(kStart);
  rspf::UnixClock clock() const {
    auto shared = now;
    return [shared] { return *shared; };
  }
  void advance(std::int64_t seconds) const { *now += seconds; }
};

template <class T>
const Refusal& refusal_of(const Checked<T>& checked) {
  REQUIRE(std::holds_alternative<Refusal>(checked));
  return std::get<Refusal>(checked);
}
template <class T>
const T& value_of(const Checked<T>& checked) {
  if (const auto* refusal = std::get_if<Refusal>(&checked)) {
    FAIL("refused " << static_cast<int>(refusal->rsc) << ": " << refusal->reason);
  }
  return std::get<T>(checked);
}

std::vector<std::string> split_dots(const std::string& compact) {
  std::vector<std::string> parts(1);
  for (char c : compact) {
    if (c == '.') {
      parts.emplace_back();
    } else {
      parts.back().push_back(c);
    }
  }
  return parts;
}
std::string join_dots(const std::vector<std::string>& parts) {
  std::string out;
  for (std::size_t i = 0; i < parts.size(); ++i) out += (i ? "." : "") + parts[i];
  return out;
}

json header_of(const std::string& compact) {
  auto decoded = crypto::base64url_decode(split_dots(compact)[0]);
  REQUIRE(decoded.ok());
  return json::parse(decoded->begin(), decoded->end());
}
// The object with its protected header replaced (the rest as it was: the tag no longer covers the header).
std::string with_header(const std::string& compact, const json& header) {
  auto parts = split_dots(compact);
  const std::string text = header.dump();
  parts[0] = crypto::base64url_encode(ByteView::of(text));
  return join_dots(parts);
}
// One character of part `index` changed to another base64url character that keeps the decoded size.
std::string with_part_changed(const std::string& compact, std::size_t index) {
  auto parts = split_dots(compact);
  REQUIRE(!parts[index].empty());
  char& c = parts[index][0];
  c = c == 'A' ? 'B' : 'A';
  return join_dots(parts);
}

InnerRequest request_to(std::string to, std::string from, std::string rqi) {
  InnerRequest request;
  request.operation = 1;
  request.to = std::move(to);
  request.from = std::move(from);
  request.request_id = std::move(rqi);
  request.path = {"api", "readings"};
  request.query = {"since=10"};
  request.content_format = 50;
  request.accept = 50;
  request.content = bytes_of(R"({"kwh":12.5})");
  return request;
}

// Originator and Receiver of one test, sharing a fake clock and one pairwise key.
struct Pair {
  FakeClock time;
  SecretBuffer key = pairwise_key();
  Receiver receiver;
  Originator originator;
  int next_rqi = 0;

  explicit Pair(ReceiverConfig config = {}) : receiver(with_clock(std::move(config))), originator(originator_config()) {
    fetch_rand();
  }
  ReceiverConfig with_clock(ReceiverConfig config) const {
    config.clock = time.clock();
    return config;
  }
  OriginatorConfig originator_config() const {
    OriginatorConfig config;
    config.clock = time.clock();
    return config;
  }
  // What the daemon does on a sit 3 / sit 4 exchange.
  void fetch_rand(const std::string& kid = kKid) {
    const RandObject rand = receiver.current_rand_object();
    REQUIRE(originator.set_receiver_rand(kid, kTarget, rand).ok());
  }
  ProtectedRequest protect(const std::string& from = kSender, const std::string& kid = kKid) {
    auto sent = originator.protect(kid, key, request_to(kTarget, from, "rqi-" + std::to_string(next_rqi++)));
    REQUIRE(sent.ok());
    return std::move(*sent);
  }
  Checked<OpenedRequest> deliver(const std::string& compact, const SecretBuffer* pairwise,
                                 const std::string& receiver_ae_id = kTarget) {
    auto inspected = receiver.inspect(compact);
    if (auto* refusal = std::get_if<Refusal>(&inspected)) return *refusal;
    return receiver.open(std::get<Inspected>(inspected), pairwise, kSender, receiver_ae_id);
  }
  Checked<OpenedRequest> deliver(const std::string& compact) { return deliver(compact, &key); }
  // A full exchange: protect, open at the receiver, answer, open the answer.
  InnerResponse exchange() {
    const ProtectedRequest sent = protect();
    const OpenedRequest opened = value_of(deliver(sent.compact));
    InnerResponse response;
    response.request_id = opened.request.request_id;
    response.content = bytes_of("ok");
    auto answer = originator.open_response(sent, value_of(receiver.protect_response(opened, response)));
    REQUIRE(answer.ok());
    return *answer;
  }
};

Rsc rsc_of(const Checked<OpenedRequest>& checked) { return refusal_of(checked).rsc; }

}  // namespace

// ---- rand objects and the session key -----------------------------------------------------------------------------

TEST_CASE("A rand object's canonical text has sorted members without spaces and parses back", "[esprim]") {
  RandObject object;
  object.id = crypto::base64url_encode(counting_bytes(0, 16));
  object.value = counting_bytes(16, 16);
  object.expiry = kStart;
  object.key_gen_algs = {1};
  object.protocol_algs = {12};
  const std::string text = canonical_text(object);
  CHECK(text ==
        R"({"eska":[1],"espa":[12],"esri":"AAECAwQFBgcICQoLDA0ODw","esrv":"EBESExQVFhcYGRobHB0eHw",)"
        R"("esrx":"20260101T000000"})");
  // Member order and spacing are free on input; the canonical text is not.
  auto parsed = parse_rand_object(
      R"({ "esrx": "20260101T000000", "esrv": "EBESExQVFhcYGRobHB0eHw", "esri": "AAECAwQFBgcICQoLDA0ODw",
           "espa": [12], "eska": [1] })");
  REQUIRE(parsed.ok());
  CHECK(canonical_text(*parsed) == text);
  CHECK(parsed->expiry == kStart);
  CHECK(parsed->value == object.value);

  const RandObject made = make_rand_object(kStart + 3600);
  CHECK(made.id.size() == 22);
  CHECK(made.value.size() == 16);
  CHECK(made.key_gen_algs == std::vector<int>{kKeyGenHmacSha256});
  CHECK(made.protocol_algs == std::vector<int>{kProtocolJweA256Gcm});
  CHECK(make_rand_object(kStart).id != made.id);
  auto again = parse_rand_object(canonical_text(made));
  REQUIRE(again.ok());
  CHECK(canonical_text(*again) == canonical_text(made));
}

TEST_CASE("esrx is a oneM2M timestamp in UTC, read strictly", "[esprim]") {
  const auto text_of = [](std::int64_t expiry) {
    RandObject object = make_rand_object(expiry);
    return json::parse(canonical_text(object))["esrx"].get<std::string>();
  };
  CHECK(text_of(0) == "19700101T000000");
  CHECK(text_of(951827696) == "20000229T123456");  // a leap day
  CHECK(text_of(4107542399) == "21000228T235959");  // 2100 is no leap year
  CHECK(text_of(4107542400) == "21000301T000000");
  const auto expiry_of = [](const std::string& esrx) -> Result<std::int64_t> {
    auto object = parse_rand_object(R"({"esri":"AAECAwQFBgcICQoLDA0ODw","esrv":"EBESExQVFhcYGRobHB0eHw","esrx":")" +
                                    esrx + R"(","eska":[1],"espa":[12]})");
    if (!object) return std::move(object).error();
    return object->expiry;
  };
  CHECK(*expiry_of("20000229T123456") == 951827696);
  CHECK(*expiry_of("99991231T235959") == 253402300799);
  for (const char* bad : {"20010229T000000", "21000229T000000", "20260431T000000", "20261301T000000",
                          "20260001T000000", "20260100T000000", "20260101T240000", "20260101T006000",
                          "20260101T000060", "20260101T000000Z", "20260101 000000", "2026-01-01T00:00",
                          "19691231T235959", "2026010T1000000", "+2026010T000000", ""}) {
    INFO(bad);
    CHECK_FALSE(expiry_of(bad).ok());
  }
}

TEST_CASE("A rand object with a wrong size or type or an unknown member is refused", "[esprim]") {
  const json good = json::parse(canonical_text(make_rand_object(kStart)));
  REQUIRE(parse_rand_object(good.dump()).ok());
  const auto refused = [&](const char* member, const json& value) {
    json changed = good;
    if (value.is_null()) {
      changed.erase(member);
    } else {
      changed[member] = value;
    }
    return !parse_rand_object(changed.dump()).ok();
  };
  CHECK(refused("esri", crypto::base64url_encode(counting_bytes(0, 15))));
  CHECK(refused("esri", crypto::base64url_encode(counting_bytes(0, 17))));
  CHECK(refused("esri", "AAECAwQFBgcICQoLDA0ODw=="));  // padding
  CHECK(refused("esri", 12));
  CHECK(refused("esrv", crypto::base64url_encode(counting_bytes(0, 32))));
  CHECK(refused("esrv", json::array()));
  CHECK(refused("esrx", kStart));
  CHECK(refused("eska", json::array()));
  CHECK(refused("espa", json::array()));
  CHECK(refused("eska", json::array({"1"})));
  CHECK(refused("espa", json::array({1.5})));
  CHECK(refused("espa", json::array({-1})));
  CHECK(refused("eska", 1));
  CHECK(refused("extra", "x"));
  for (const char* member : {"esri", "esrv", "esrx", "eska", "espa"}) CHECK(refused(member, json()));
  CHECK_FALSE(parse_rand_object("[]").ok());
  CHECK_FALSE(parse_rand_object(R"({"esri":"a","esri":"b"})").ok());
  // A repeated member is refused even when both values are the same.
  std::string doubled = good.dump();
  doubled.insert(1, R"("eska":[1],)");
  CHECK_FALSE(parse_rand_object(doubled).ok());
}

TEST_CASE("sessionESPrimKey matches an HMAC-SHA-256 computed by Python's hmac module", "[esprim]") {
  RandObject receiver;
  receiver.id = crypto::base64url_encode(counting_bytes(0, 16));
  receiver.value = counting_bytes(16, 16);
  receiver.expiry = kStart;
  receiver.key_gen_algs = {1};
  receiver.protocol_algs = {12};
  RandObject originator = receiver;
  originator.id = crypto::base64url_encode(counting_bytes(32, 16));
  originator.value = counting_bytes(48, 16);
  originator.expiry = kStart - 1;
  // python3: hmac.new(bytes(range(100,132)), (canon(r)+canon(o)+label).encode(), hashlib.sha256).hexdigest()
  const SecretBuffer key = derive_session_key(pairwise_key(), receiver, originator);
  CHECK(to_hex(key.view()) == "7d450d69fe7cfa085049316bd91803550d42c050ab466904913be8728a30a82d");
  CHECK_FALSE(derive_session_key(pairwise_key(), originator, receiver).equals(key));
}

// ---- the replay window --------------------------------------------------------------------------------------------

namespace {

struct ReplayStep {
  std::uint64_t seq;
  bool fresh;
};
struct ReplayScenario {
  const char* name;
  std::vector<ReplayStep> steps;
};

// A request object for seq under a session the test makes by hand (the Originator only counts upwards).
std::string object_for_seq(const SecretBuffer& session_key, const RandObject& receiver, const RandObject& originator,
                           std::uint64_t seq) {
  json header = {{"alg", "dir"}, {"enc", "A256GCM"}, {"kid", kKid}, {"cty", kRequestMediaType},
                 {"ori", originator.id}, {"rri", receiver.id}, {"seq", seq},
                 {"oro", json::parse(canonical_text(originator))}};
  // One rqi per (session, seq): a create is carried out at most once per rqi.
  const std::string plaintext =
      to_json_text(request_to(kTarget, kSender, "rqi-" + originator.id + "-" + std::to_string(seq)));
  auto compact = crypto::jwe_encrypt_dir_a256gcm(session_key, header.dump(), ByteView::of(plaintext));
  REQUIRE(compact.ok());
  return *compact;
}

}  // namespace

TEST_CASE("The replay window accepts each seq once inside 64 and never wraps", "[esprim][replay]") {
  constexpr std::uint64_t kTop = kMaxSeq;
  const std::vector<ReplayScenario> scenarios = {
      {"first message 0", {{0, true}, {0, false}, {1, true}, {0, false}}},
      {"large first seq", {{1000, true}, {937, true}, {936, false}, {1000, false}, {999, true}, {1001, true}}},
      {"in order", {{0, true}, {1, true}, {2, true}, {3, true}, {2, false}}},
      {"out of order inside the window",
       {{10, true}, {5, true}, {7, true}, {5, false}, {9, true}, {10, false}, {11, true}, {6, true}, {7, false}}},
      {"window edge", {{100, true}, {37, true}, {36, false}, {37, false}, {101, true}, {37, false}, {38, true}}},
      {"duplicate", {{3, true}, {3, false}, {2, true}, {2, false}, {3, false}}},
      {"jump by more than 64 clears the window",
       {{0, true}, {1, true}, {2, true}, {3, true}, {70, true}, {7, true}, {6, false}, {3, false}, {70, false}}},
      {"jump by exactly 64",
       {{10, true}, {11, true}, {75, true}, {11, false}, {74, true}, {12, true}, {10, false}, {74, false}}},
      {"jump by 63 keeps the old highest", {{10, true}, {11, true}, {74, true}, {11, false}, {10, false}, {12, true}}},
      {"top of the range",
       {{kTop - 1, true}, {kTop, true}, {kTop, false}, {kTop - 1, false}, {kTop - 63, true}, {kTop - 64, false},
        {kTop + 1, false}, {std::numeric_limits<std::uint64_t>::max(), false}}},
      {"from 0 to the top", {{0, true}, {kTop, true}, {0, false}, {kTop - 63, true}}},
      {"beyond the range first", {{kTop + 1, false}, {std::numeric_limits<std::uint64_t>::max(), false}, {0, true}}},
  };

  // The same table through a real Receiver: fresh means opened, not fresh means 4103 (4111 above kMaxSeq: the
  // header itself is out of range).
  FakeClock time;
  ReceiverConfig config;
  config.clock = time.clock();
  Receiver receiver(config);
  const RandObject rand = receiver.current_rand_object();
  const SecretBuffer pairwise = pairwise_key();

  for (const auto& scenario : scenarios) {
    SECTION(scenario.name) {
      ReplayWindow window;
      const RandObject originator = make_rand_object(rand.expiry);
      const SecretBuffer session_key = derive_session_key(pairwise, rand, originator);
      std::size_t index = 0;
      for (const auto& step : scenario.steps) {
        INFO("step " << index++ << ": seq " << step.seq);
        CHECK(window.is_fresh(step.seq) == step.fresh);
        window.record(step.seq);
        CHECK_FALSE(window.is_fresh(step.seq));

        auto inspected = receiver.inspect(object_for_seq(session_key, rand, originator, step.seq));
        if (step.seq > kMaxSeq) {
          CHECK(refusal_of(inspected).rsc == Rsc::unsupported_option);
          continue;
        }
        auto opened = receiver.open(value_of(inspected), &pairwise, kSender, kTarget);
        if (step.fresh) {
          CHECK(value_of(opened).seq == step.seq);
        } else {
          CHECK(refusal_of(opened).rsc == Rsc::replayed);
          CHECK(refusal_of(opened).coap_code() == 403);
          CHECK(refusal_of(opened).reason.find("replayed ESPrim object (seq " + std::to_string(step.seq) + ")") == 0);
        }
      }
    }
  }
}

TEST_CASE("After a restart every earlier receiver rand object is unknown", "[esprim][replay]") {
  Pair pair;
  const ProtectedRequest first = pair.protect();
  value_of(pair.deliver(first.compact));
  const ProtectedRequest second = pair.protect();
  // The restarted receiver has no memory of the object, its sessions or their windows: all of it is refused.
  ReceiverConfig config;
  config.clock = pair.time.clock();
  pair.receiver = Receiver(config);
  CHECK(pair.receiver.current_rand_object().id != first.rri);
  CHECK(rsc_of(pair.deliver(first.compact)) == Rsc::unknown_receiver_rand_id);
  CHECK(rsc_of(pair.deliver(second.compact)) == Rsc::unknown_receiver_rand_id);
  // The originator forgets the object on 4114, asks again and starts a new session at seq 0.
  pair.originator.on_refusal(second, Rsc::unknown_receiver_rand_id);
  CHECK(pair.originator.needs_receiver_rand(kKid, kTarget));
  pair.fetch_rand();
  const ProtectedRequest resent = pair.protect();
  CHECK(resent.seq == 0);
  CHECK(resent.ori != first.ori);
  CHECK(value_of(pair.deliver(resent.compact)).request.request_id == resent.request_id);
}

// ---- originator and receiver --------------------------------------------------------------------------------------

TEST_CASE("A request travels from originator to receiver and its answer back", "[esprim]") {
  Pair pair;
  const ProtectedRequest sent = pair.protect();
  CHECK(sent.seq == 0);
  CHECK(sent.kid == kKid);
  CHECK(sent.receiver_ae_id == kTarget);
  const json header = header_of(sent.compact);
  CHECK(header["alg"] == "dir");
  CHECK(header["enc"] == "A256GCM");
  CHECK(header["cty"] == kRequestMediaType);
  CHECK(header["ori"] == sent.ori);
  CHECK(header["rri"] == sent.rri);
  CHECK(header["oro"]["esri"] == sent.ori);
  // The originator object does not outlive the receiver's.
  CHECK(header["oro"]["esrx"] == json::parse(canonical_text(pair.receiver.current_rand_object()))["esrx"]);

  auto inspected = pair.receiver.inspect(sent.compact);
  const ReceivedHeader& seen = value_of(inspected).header;
  CHECK(seen.kid == kKid);
  CHECK(seen.seq == 0);
  REQUIRE(seen.originator_rand);
  CHECK(seen.originator_rand->id == sent.ori);
  const OpenedRequest opened = value_of(pair.receiver.open(value_of(inspected), &pair.key, kSender, kTarget));
  const InnerRequest expected = request_to(kTarget, kSender, sent.request_id);
  CHECK(to_json_text(opened.request) == to_json_text(expected));
  CHECK(opened.request.content == expected.content);
  CHECK(opened.session_key->equals(*sent.session_key));
  CHECK(pair.receiver.stats().sessions == 1);

  InnerResponse response;
  response.rsc = rsc_for_coap_code(205);
  response.coap_code = 205;
  response.request_id = opened.request.request_id;
  response.content_format = 50;
  response.content = bytes_of(R"({"kwh":12.5})");
  const std::string answer = value_of(pair.receiver.protect_response(opened, response));
  const json answer_header = header_of(answer);
  CHECK(answer_header["cty"] == kResponseMediaType);
  CHECK(answer_header["seq"] == 0);
  CHECK_FALSE(answer_header.contains("oro"));
  auto received = pair.originator.open_response(sent, answer);
  REQUIRE(received.ok());
  CHECK(to_json_text(*received) == to_json_text(response));

  // Answered: the next requests carry no oro and count on; the receiver still knows the session.
  const ProtectedRequest next = pair.protect();
  CHECK(next.seq == 1);
  CHECK(next.ori == sent.ori);
  CHECK_FALSE(header_of(next.compact).contains("oro"));
  CHECK(value_of(pair.deliver(next.compact)).seq == 1);
  CHECK(pair.receiver.stats().sessions == 1);
}

TEST_CASE("Each tampering with a request object is refused with its code", "[esprim]") {
  Pair pair;
  const ProtectedRequest first = pair.protect();
  const ProtectedRequest second = pair.protect();  // still with oro (nothing answered yet)

  SECTION("a header member changed and re-encoded breaks the tag") {
    for (const auto& [member, value] :
         {std::pair<const char*, json>{"seq", 7}, {"cty", kResponseMediaType}, {"extra", "x"}}) {
      json header = header_of(first.compact);
      header[member] = value;
      INFO(member);
      CHECK(rsc_of(pair.deliver(with_header(first.compact, header))) == Rsc::bad_mac);
    }
  }
  SECTION("IV, ciphertext and tag") {
    for (std::size_t part : {2, 3, 4}) {
      INFO("part " << part);
      CHECK(rsc_of(pair.deliver(with_part_changed(first.compact, part))) == Rsc::bad_mac);
    }
  }
  SECTION("kid: another kid with this key breaks the tag, a kid without a key is 4112") {
    json header = header_of(first.compact);
    header["kid"] = "ffeeddccbbaa99887766554433221100@mef.example.net";
    const std::string changed = with_header(first.compact, header);
    CHECK(rsc_of(pair.deliver(changed)) == Rsc::bad_mac);
    CHECK(rsc_of(pair.deliver(changed, nullptr)) == Rsc::unknown_key_id);
    CHECK(rsc_of(pair.deliver(first.compact, nullptr)) == Rsc::unknown_key_id);
  }
  SECTION("ori: not the oro's esri is 4111, an ori without session or oro is 4113") {
    json header = header_of(first.compact);
    header["ori"] = crypto::base64url_encode(counting_bytes(1, 16));
    CHECK(rsc_of(pair.deliver(with_header(first.compact, header))) == Rsc::unsupported_option);
    header.erase("oro");
    CHECK(rsc_of(pair.deliver(with_header(first.compact, header))) == Rsc::unknown_originator_rand_id);
  }
  SECTION("rri: one never issued is 4114") {
    json header = header_of(first.compact);
    header["rri"] = crypto::base64url_encode(counting_bytes(1, 16));
    CHECK(rsc_of(pair.deliver(with_header(first.compact, header))) == Rsc::unknown_receiver_rand_id);
  }
  SECTION("oro absent on the first message is 4113") {
    json header = header_of(first.compact);
    header.erase("oro");
    CHECK(rsc_of(pair.deliver(with_header(first.compact, header))) == Rsc::unknown_originator_rand_id);
  }
  SECTION("alg, enc, crit, zip, seq out of range, a missing member and a malformed object are 4111") {
    const auto changed = [&](const char* member, const json& value) {
      json header = header_of(first.compact);
      if (value.is_null()) {
        header.erase(member);
      } else {
        header[member] = value;
      }
      return with_header(first.compact, header);
    };
    for (const auto& compact :
         {changed("alg", "A256KW"), changed("enc", "A128GCM"), changed("crit", json::array({"seq"})),
          changed("zip", "DEF"), changed("seq", kMaxSeq + 1), changed("seq", -1), changed("seq", 1.0),
          changed("seq", "1"), changed("kid", ""), changed("kid", json()), changed("ori", json()),
          changed("rri", json()), changed("cty", json()), changed("seq", json()), changed("alg", json()),
          changed("oro", "x"), changed("rro", json::object()), std::string("not a JWE"),
          first.compact + ".x", split_dots(first.compact)[0] + "...."}) {
      INFO(compact.substr(0, 120));
      CHECK(rsc_of(pair.deliver(compact)) == Rsc::unsupported_option);
    }
    // A repeated header member: one text, one meaning.
    const std::string header_text = header_of(first.compact).dump();
    auto parts = split_dots(first.compact);
    parts[0] = crypto::base64url_encode(ByteView::of(R"({"seq":5,)" + header_text.substr(1)));
    CHECK(rsc_of(pair.deliver(join_dots(parts))) == Rsc::unsupported_option);
  }
  SECTION("a replayed object is refused after the original was accepted, the out-of-order one is not") {
    CHECK(value_of(pair.deliver(second.compact)).seq == 1);
    CHECK(value_of(pair.deliver(first.compact)).seq == 0);
    CHECK(rsc_of(pair.deliver(first.compact)) == Rsc::replayed);
    CHECK(rsc_of(pair.deliver(second.compact)) == Rsc::replayed);
  }
  SECTION("inner fr of another AE and a wrong inner to are impersonation") {
    const ProtectedRequest other_from = pair.protect("C-other");
    const Refusal refusal = refusal_of(pair.deliver(other_from.compact));
    CHECK(refusal.rsc == Rsc::impersonation);
    CHECK(refusal.reason.find("C-other") == std::string::npos);  // no value of the plaintext
    // Nor whom the key is bound to: the reason crosses every hop in the plain refusal.
    CHECK(refusal.reason.find(kSender) == std::string::npos);
    CHECK(rsc_of(pair.deliver(first.compact, &pair.key, "C-other-target")) == Rsc::impersonation);
    // Refused objects created no session: the first genuine one still needs and has its oro.
    CHECK(pair.receiver.stats().sessions == 0);
    CHECK(value_of(pair.deliver(first.compact)).seq == 0);
  }
  SECTION("rro must be the receiver object the rri names") {
    json header = header_of(first.compact);
    header["rro"] = json::parse(canonical_text(make_rand_object(kStart + 60)));
    CHECK(rsc_of(pair.deliver(with_header(first.compact, header))) == Rsc::unsupported_option);
  }
  SECTION("an inner primitive that does not parse after decryption is 5210") {
    const RandObject rand = pair.receiver.current_rand_object();
    const RandObject originator = make_rand_object(rand.expiry);
    const SecretBuffer session_key = derive_session_key(pair.key, rand, originator);
    json header = {{"alg", "dir"}, {"enc", "A256GCM"}, {"kid", kKid}, {"cty", kRequestMediaType},
                   {"ori", originator.id}, {"rri", rand.id}, {"seq", 0},
                   {"oro", json::parse(canonical_text(originator))}};
    auto compact = crypto::jwe_encrypt_dir_a256gcm(session_key, header.dump(), ByteView::of(R"({"op":9,"secret-member":1})"));
    REQUIRE(compact.ok());
    const Refusal refusal = refusal_of(pair.deliver(*compact));
    CHECK(refusal.rsc == Rsc::decryption_error);
    CHECK(refusal.coap_code() == 500);
    CHECK(refusal.reason.find("secret-member") == std::string::npos);
  }
  SECTION("a forged object neither starts a session nor moves a window") {
    json header = header_of(first.compact);
    header["seq"] = 1000;
    CHECK(rsc_of(pair.deliver(with_header(first.compact, header))) == Rsc::bad_mac);
    CHECK(pair.receiver.stats().sessions == 0);
    CHECK(value_of(pair.deliver(first.compact)).seq == 0);
    CHECK(rsc_of(pair.deliver(with_header(first.compact, header))) == Rsc::bad_mac);
    CHECK(value_of(pair.deliver(second.compact)).seq == 1);
  }
  SECTION("refusal reasons name the check and the object, never key or plaintext") {
    const Refusal refusal = refusal_of(pair.deliver(with_part_changed(first.compact, 4)));
    CHECK(refusal.reason.find("tag") != std::string::npos);
    CHECK(refusal.reason.find(first.ori) != std::string::npos);
    CHECK(refusal.reason.find(first.rri) != std::string::npos);
    CHECK(refusal.reason.find("seq 0") != std::string::npos);
    CHECK(refusal.reason.find(to_hex(pair.key.view())) == std::string::npos);
    CHECK(refusal.reason.find(to_hex(first.session_key->view())) == std::string::npos);
    CHECK(refusal.reason.find("readings") == std::string::npos);
  }
}

TEST_CASE("A request object is never taken as an answer and an answer never as a request", "[esprim]") {
  Pair pair;
  const ProtectedRequest sent = pair.protect();
  const OpenedRequest opened = value_of(pair.deliver(sent.compact));
  InnerResponse response;
  response.request_id = opened.request.request_id;
  const std::string answer = value_of(pair.receiver.protect_response(opened, response));

  // The answer sent back to the receiver: same session and key, so only cty tells them apart.
  CHECK(rsc_of(pair.deliver(answer)) == Rsc::unsupported_option);
  // The request reflected to the originator.
  auto reflected = pair.originator.open_response(sent, sent.compact);
  REQUIRE_FALSE(reflected.ok());
  CHECK(reflected.error().message.find("not a response") != std::string::npos);

  // The answer to another request (another seq), a changed tag, another rqi.
  const ProtectedRequest later = pair.protect();
  CHECK_FALSE(pair.originator.open_response(later, answer).ok());
  auto forged = pair.originator.open_response(sent, with_part_changed(answer, 4));
  REQUIRE_FALSE(forged.ok());
  CHECK(forged.error().code == Errc::crypto);
  InnerResponse other = response;
  other.request_id = "rqi-of-another";
  auto wrong_rqi = pair.originator.open_response(sent, value_of(pair.receiver.protect_response(opened, other)));
  REQUIRE_FALSE(wrong_rqi.ok());
  CHECK(wrong_rqi.error().message.find("rqi") != std::string::npos);
  // Nothing of that stopped oro: only a good answer does.
  CHECK(header_of(pair.protect().compact).contains("oro"));
  REQUIRE(pair.originator.open_response(sent, answer).ok());
  CHECK_FALSE(header_of(pair.protect().compact).contains("oro"));
}

TEST_CASE("The originator resends oro after 4113 and asks for a new receiver object after 4114", "[esprim]") {
  Pair pair;
  pair.exchange();
  const ProtectedRequest without_oro = pair.protect();
  CHECK_FALSE(header_of(without_oro.compact).contains("oro"));
  pair.originator.on_refusal(without_oro, Rsc::unknown_originator_rand_id);
  const ProtectedRequest with_oro = pair.protect();
  CHECK(header_of(with_oro.compact).contains("oro"));
  CHECK(with_oro.ori == without_oro.ori);
  pair.originator.on_refusal(with_oro, Rsc::bad_mac);  // anything else changes nothing
  CHECK_FALSE(pair.originator.needs_receiver_rand(kKid, kTarget));
  pair.originator.on_refusal(with_oro, Rsc::unknown_receiver_rand_id);
  CHECK(pair.originator.needs_receiver_rand(kKid, kTarget));
  auto refused = pair.originator.protect(kKid, pair.key, request_to(kTarget, kSender, "r"));
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().code == Errc::not_found);
  // A refusal of a request under an object that was replaced since changes nothing.
  pair.time.advance(1800);  // the receiver hands out a new object
  pair.fetch_rand();
  pair.originator.on_refusal(with_oro, Rsc::unknown_receiver_rand_id);
  CHECK_FALSE(pair.originator.needs_receiver_rand(kKid, kTarget));
}

TEST_CASE("The originator keeps a session per kid and receiver and refuses unusable receiver objects", "[esprim]") {
  Pair pair;
  CHECK(pair.originator.needs_receiver_rand("other-kid@mef.example.net", kTarget));
  CHECK(pair.originator.needs_receiver_rand(kKid, "C-elsewhere"));
  const RandObject rand = pair.receiver.current_rand_object();
  // The same object again keeps the session (seq goes on); a new one starts over.
  pair.protect();
  REQUIRE(pair.originator.set_receiver_rand(kKid, kTarget, rand).ok());
  CHECK(pair.protect().seq == 1);

  RandObject unsupported = make_rand_object(kStart + 600);
  unsupported.protocol_algs = {13};
  CHECK(pair.originator.set_receiver_rand(kKid, kTarget, unsupported).error().code == Errc::unsupported);
  unsupported = make_rand_object(kStart + 600);
  unsupported.key_gen_algs = {2};
  CHECK(pair.originator.set_receiver_rand(kKid, kTarget, unsupported).error().code == Errc::unsupported);
  CHECK(pair.originator.set_receiver_rand(kKid, kTarget, make_rand_object(kStart)).error().code == Errc::expired);
  RandObject malformed = make_rand_object(kStart + 600);
  malformed.value.pop_back();
  CHECK(pair.originator.set_receiver_rand(kKid, kTarget, malformed).error().code == Errc::parse);
  malformed = make_rand_object(kStart + 600);
  malformed.id = "not base64url!";
  CHECK(pair.originator.set_receiver_rand(kKid, kTarget, malformed).error().code == Errc::parse);
  CHECK(pair.protect().seq == 2);  // refused objects changed nothing

  // refresh_margin_s: 60 s before expiry the originator asks for a new object.
  pair.time.advance(rand.expiry - kStart - 61);
  CHECK_FALSE(pair.originator.needs_receiver_rand(kKid, kTarget));
  pair.time.advance(2);
  CHECK(pair.originator.needs_receiver_rand(kKid, kTarget));
  pair.fetch_rand();
  const ProtectedRequest renewed = pair.protect();
  CHECK(renewed.seq == 0);
  CHECK(renewed.rri != rand.id);
  CHECK(header_of(renewed.compact).contains("oro"));
  CHECK(value_of(pair.deliver(renewed.compact)).seq == 0);

  // Past its expiry a receiver object protects nothing more.
  const RandObject current = pair.receiver.current_rand_object();
  pair.time.advance(current.expiry - *pair.time.now);
  auto expired = pair.originator.protect(kKid, pair.key, request_to(kTarget, kSender, "late"));
  REQUIRE_FALSE(expired.ok());
  CHECK(expired.error().code == Errc::not_found);
  CHECK(pair.originator.needs_receiver_rand(kKid, kTarget));
}

TEST_CASE("The receiver rotates its rand object at half its lifetime and keeps at most four", "[esprim][rotation]") {
  FakeClock time;
  ReceiverConfig config;
  config.rand_lifetime_s = 3600;
  config.clock = time.clock();
  Receiver receiver(config);
  const RandObject first = receiver.current_rand_object();
  CHECK(first.expiry == kStart + 3600);
  time.advance(1799);
  CHECK(receiver.current_rand_object().id == first.id);
  time.advance(1);
  const RandObject second = receiver.current_rand_object();
  CHECK(second.id != first.id);
  CHECK(second.expiry == kStart + 1800 + 3600);
  CHECK(receiver.stats().live_rand_objects == 2);
  CHECK(receiver.stats().rand_objects_made == 2);

  // Objects stay valid until their expiry, then are dropped.
  const SecretBuffer key = pairwise_key();
  const auto open_under = [&](const RandObject& rand) {
    const RandObject originator = make_rand_object(rand.expiry);
    auto inspected = receiver.inspect(object_for_seq(derive_session_key(key, rand, originator), rand, originator, 0));
    return receiver.open(value_of(inspected), &key, kSender, kTarget);
  };
  value_of(open_under(first));
  time.advance(1799);  // first expires at kStart + 3600
  value_of(open_under(first));
  time.advance(1);
  CHECK(rsc_of(open_under(first)) == Rsc::unknown_receiver_rand_id);
  CHECK(receiver.stats().live_rand_objects == 1);

  // A fifth live object retires the oldest (short lifetime: rotation on every call).
  ReceiverConfig quick = config;
  quick.rand_lifetime_s = 1;
  Receiver busy(quick);
  std::vector<RandObject> made;
  for (int i = 0; i < 4; ++i) made.push_back(busy.current_rand_object());
  CHECK(busy.stats().live_rand_objects == 4);
  for (const auto& rand : made) CHECK(busy.current_rand_object().id != rand.id);  // each call a new one
  CHECK(busy.stats().live_rand_objects == 4);
  CHECK(busy.stats().rand_objects_made == 8);
  const RandObject& oldest = made[0];
  const RandObject originator = make_rand_object(oldest.expiry);
  auto inspected = busy.inspect(object_for_seq(derive_session_key(key, oldest, originator), oldest, originator, 0));
  CHECK(rsc_of(busy.open(value_of(inspected), &key, kSender, kTarget)) == Rsc::unknown_receiver_rand_id);
}

TEST_CASE("A receiver object with max sessions retires early and its sessions go on", "[esprim][rotation]") {
  ReceiverConfig config;
  config.max_sessions_per_rand = 2;
  Pair pair(config);
  const RandObject rand = pair.receiver.current_rand_object();
  // Three originators (three kids) under the same receiver object.
  const std::vector<std::string> kids = {kKid, "k2@mef.example.net", "k3@mef.example.net"};
  std::vector<ProtectedRequest> sent;
  for (const auto& kid : kids) {
    REQUIRE(pair.originator.set_receiver_rand(kid, kTarget, rand).ok());
    sent.push_back(pair.protect(kSender, kid));
  }
  value_of(pair.deliver(sent[0].compact));
  value_of(pair.deliver(sent[1].compact));
  CHECK(rsc_of(pair.deliver(sent[2].compact)) == Rsc::unknown_receiver_rand_id);
  CHECK(pair.receiver.stats().sessions == 2);
  // The two sessions go on; a new current object takes the third.
  CHECK(value_of(pair.deliver(pair.protect(kSender, kids[0]).compact)).seq == 1);
  const RandObject next = pair.receiver.current_rand_object();
  CHECK(next.id != rand.id);
  pair.originator.on_refusal(sent[2], Rsc::unknown_receiver_rand_id);
  REQUIRE(pair.originator.set_receiver_rand(kids[2], kTarget, next).ok());
  CHECK(value_of(pair.deliver(pair.protect(kSender, kids[2]).compact)).rri == next.id);
  CHECK(pair.receiver.stats().sessions == 3);
}

TEST_CASE("An originator object that outlives the receiver object is refused", "[esprim][rotation]") {
  Pair pair;
  const RandObject rand = pair.receiver.current_rand_object();
  for (std::int64_t expiry : {rand.expiry + 1, kStart}) {
    const RandObject originator = make_rand_object(expiry);
    const std::string compact =
        object_for_seq(derive_session_key(pair.key, rand, originator), rand, originator, 0);
    INFO(expiry);
    CHECK(rsc_of(pair.deliver(compact)) == Rsc::unsupported_option);
  }
  const RandObject earlier = make_rand_object(rand.expiry - 100);
  const SecretBuffer session_key = derive_session_key(pair.key, rand, earlier);
  value_of(pair.deliver(object_for_seq(session_key, rand, earlier, 0)));
  CHECK(pair.receiver.stats().sessions == 1);
  // When the originator object expires its session ends: its oro is no good any more, and without one the ori is
  // unknown.
  pair.time.advance(rand.expiry - 100 - kStart);
  json header = header_of(object_for_seq(session_key, rand, earlier, 1));
  header.erase("oro");
  CHECK(rsc_of(pair.deliver(with_header(object_for_seq(session_key, rand, earlier, 1), header))) ==
        Rsc::unknown_originator_rand_id);
  CHECK(pair.receiver.stats().sessions == 0);
  CHECK(rsc_of(pair.deliver(object_for_seq(session_key, rand, earlier, 2))) == Rsc::unsupported_option);
}

// ---- inner primitives and outer bodies ----------------------------------------------------------------------------

TEST_CASE("Inner primitives omit empty members and parse back", "[esprim]") {
  InnerRequest bare;
  bare.operation = 2;
  bare.to = kTarget;
  bare.from = kSender;
  bare.request_id = "r1";
  CHECK(to_json_text(bare) == R"({"fr":"C-sensor","op":2,"path":[],"rqi":"r1","to":"C-meter"})");
  const InnerRequest full = request_to(kTarget, kSender, "r2");
  CHECK(to_json_text(full) == R"({"acc":50,"cf":50,"fr":"C-sensor","op":1,"path":["api","readings"],)"
                              R"("pc":"eyJrd2giOjEyLjV9","query":["since=10"],"rqi":"r2","to":"C-meter"})");
  auto parsed = parse_inner_request(to_json_text(full));
  REQUIRE(parsed.ok());
  CHECK(to_json_text(*parsed) == to_json_text(full));
  CHECK(parsed->content == full.content);

  InnerResponse response;
  response.rsc = 4000;
  response.coap_code = 404;
  response.request_id = "r2";
  CHECK(to_json_text(response) == R"({"coap":404,"rqi":"r2","rsc":4000})");
  response.content_format = 0;
  response.content = bytes_of("gone");
  auto again = parse_inner_response(to_json_text(response));
  REQUIRE(again.ok());
  CHECK(to_json_text(*again) == to_json_text(response));

  CHECK(rsc_for_coap_code(201) == 2000);
  CHECK(rsc_for_coap_code(404) == 4000);
  CHECK(rsc_for_coap_code(503) == 5000);

  for (const char* bad : {R"({"op":5,"to":"a","fr":"b","rqi":"c","path":[]})",
                          R"({"op":1,"to":"a","fr":"b","rqi":"c"})", R"({"op":1,"to":"","fr":"b","rqi":"c","path":[]})",
                          R"({"op":1,"to":"a","fr":"b","rqi":"c","path":[1]})",
                          R"({"op":1,"to":"a","fr":"b","rqi":"c","path":[],"query":[]})",
                          R"({"op":1,"to":"a","fr":"b","rqi":"c","path":[],"pc":""})",
                          R"({"op":1,"to":"a","fr":"b","rqi":"c","path":[],"pc":"a+b"})",
                          R"({"op":1,"to":"a","fr":"b","rqi":"c","path":[],"cf":65536})",
                          R"({"op":1,"to":"a","fr":"b","rqi":"c","path":[],"x":1})",
                          R"({"op":1,"op":1,"to":"a","fr":"b","rqi":"c","path":[]})", "[]", "{"}) {
    INFO(bad);
    CHECK_FALSE(parse_inner_request(bad).ok());
  }
  for (const char* bad : {R"({"rsc":2000,"coap":305,"rqi":"r"})", R"({"rsc":2000,"coap":232,"rqi":"r"})",
                          R"({"rsc":2000,"coap":205})", R"({"rsc":-1,"coap":205,"rqi":"r"})",
                          R"({"rsc":2000,"coap":205,"rqi":"r","to":"x"})"}) {
    INFO(bad);
    CHECK_FALSE(parse_inner_response(bad).ok());
  }
}

TEST_CASE("m2m:seci bodies and plain refusal bodies", "[esprim]") {
  SecurityInfo ask;
  ask.type = 3;
  CHECK(to_json_text(ask) == R"({"m2m:seci":{"sit":3}})");
  auto ask_back = parse_security_info(to_json_text(ask));
  REQUIRE(ask_back.ok());
  CHECK(ask_back->type == 3);

  SecurityInfo rand;
  rand.type = 4;
  rand.receiver_rand = make_rand_object(kStart);
  auto rand_back = parse_security_info(to_json_text(rand));
  REQUIRE(rand_back.ok());
  REQUIRE(rand_back->receiver_rand);
  CHECK(canonical_text(*rand_back->receiver_rand) == canonical_text(*rand.receiver_rand));
  CHECK(to_json_text(rand) == R"({"m2m:seci":{"rro":)" + canonical_text(*rand.receiver_rand) + R"(,"sit":4}})");

  SecurityInfo object;
  object.object = "a.b.c.d.e";
  CHECK(to_json_text(object) == R"({"m2m:seci":{"epo":"a.b.c.d.e","sit":5}})");
  auto object_back = parse_security_info(to_json_text(object));
  REQUIRE(object_back.ok());
  CHECK(object_back->object == "a.b.c.d.e");

  for (const char* bad : {R"({"m2m:seci":{"sit":4}})", R"({"m2m:seci":{"sit":5}})", R"({"m2m:seci":{"sit":6}})",
                          R"({"m2m:seci":{"sit":3,"epo":"x"}})", R"({"m2m:seci":{"sit":4,"rro":{}}})",
                          R"({"m2m:seci":{"sit":5,"epo":""}})", R"({"sit":5,"epo":"x"})", R"({"m2m:seci":5})",
                          R"({"m2m:seci":{"sit":5,"epo":"x"},"other":1})", "null"}) {
    INFO(bad);
    CHECK_FALSE(parse_security_info(bad).ok());
  }

  const Refusal refusal{Rsc::unknown_receiver_rand_id, "unknown rri 'x'"};
  CHECK(refusal_body(refusal) == R"({"dbg":"unknown rri 'x'","rsc":4114})");
  auto read = parse_refusal_body(refusal_body(refusal));
  REQUIRE(read);
  CHECK(read->rsc == Rsc::unknown_receiver_rand_id);
  CHECK(read->reason == refusal.reason);
  CHECK(read->coap_code() == 403);
  CHECK(Refusal{Rsc::replayed, ""}.coap_code() == 403);
  CHECK(Refusal{Rsc::encryption_error, ""}.coap_code() == 500);
  CHECK_FALSE(parse_refusal_body(R"({"rsc":4000,"dbg":"x"})"));
  CHECK_FALSE(parse_refusal_body(R"({"dbg":"x"})"));
  CHECK_FALSE(parse_refusal_body("not json"));
}

TEST_CASE("A create resent after a refusal a hop forged is carried out once and other methods again", "[esprim][replay]") {
  Pair pair;
  // The first send is delivered; a hop drops the answer and forges 4114: the originator starts a new session.
  auto first = pair.originator.protect(kKid, pair.key, request_to(kTarget, kSender, "rqi-create"));
  REQUIRE(first.ok());
  value_of(pair.deliver(first->compact));
  pair.originator.on_refusal(*first, Rsc::unknown_receiver_rand_id);
  REQUIRE(pair.originator.needs_receiver_rand(kKid, kTarget));
  pair.fetch_rand();
  auto again = pair.originator.protect(kKid, pair.key, request_to(kTarget, kSender, "rqi-create"));
  REQUIRE(again.ok());
  CHECK(again->ori != first->ori);  // a new session: the window alone would not see the repeat
  const Refusal refused = refusal_of(pair.deliver(again->compact));
  CHECK(refused.rsc == Rsc::replayed);
  CHECK(refused.reason.find("already carried out") != std::string::npos);
  // A create with another rqi goes through, and so does a retrieve repeated with the same rqi (it may be repeated).
  auto other = pair.originator.protect(kKid, pair.key, request_to(kTarget, kSender, "rqi-other"));
  REQUIRE(other.ok());
  value_of(pair.deliver(other->compact));
  auto get = request_to(kTarget, kSender, "rqi-read");
  get.operation = 2;
  for (int i = 0; i < 2; ++i) {
    auto read = pair.originator.protect(kKid, pair.key, get);
    REQUIRE(read.ok());
    value_of(pair.deliver(read->compact));
  }
}

TEST_CASE("A session serves the receiving AE it was made for", "[esprim]") {
  Pair pair;
  pair.exchange();  // the session holds: the next objects carry no oro
  // The next object of that session, redirected by a hop to another AE behind the same dauthd (outer to=).
  const auto next = pair.protect();
  CHECK(refusal_of(pair.deliver(next.compact, &pair.key, "C-other")).rsc == Rsc::unknown_originator_rand_id);
  value_of(pair.deliver(next.compact));
}

TEST_CASE("The checks that need no key come before the key lookup", "[esprim]") {
  Pair pair;
  const auto sent = pair.protect();
  auto inspected = pair.receiver.inspect(sent.compact);
  REQUIRE(std::holds_alternative<Inspected>(inspected));
  CHECK_FALSE(pair.receiver.check_before_key(std::get<Inspected>(inspected), kTarget).has_value());  // oro: fine
  value_of(pair.deliver(sent.compact));
  auto unknown_rri = header_of(sent.compact);
  unknown_rri["rri"] = "AAAAAAAAAAAAAAAAAAAAAA";
  auto forged = pair.receiver.inspect(with_header(sent.compact, unknown_rri));
  REQUIRE(std::holds_alternative<Inspected>(forged));
  const auto early = pair.receiver.check_before_key(std::get<Inspected>(forged), kTarget);
  REQUIRE(early.has_value());
  CHECK(early->rsc == Rsc::unknown_receiver_rand_id);
}

TEST_CASE("A short-lived receiver object is not asked for again before each request", "[esprim][rotation]") {
  ReceiverConfig config;
  config.rand_lifetime_s = 60;
  Pair pair(config);
  pair.time.advance(25);  // still handed out: 35 s left, less than the 60 s margin
  pair.fetch_rand();
  CHECK_FALSE(pair.originator.needs_receiver_rand(kKid, kTarget));
  pair.time.advance(27);  // 8 s left: less than a quarter of the 35 s it had
  CHECK(pair.originator.needs_receiver_rand(kKid, kTarget));
}

TEST_CASE("One key cannot fill a receiver object with sessions and make it retire", "[esprim][rotation]") {
  Pair pair;
  const RandObject rand = pair.receiver.current_rand_object();
  const auto new_session = [&] {
    const RandObject originator = make_rand_object(rand.expiry);
    auto inspected = pair.receiver.inspect(
        object_for_seq(derive_session_key(pair.key, rand, originator), rand, originator, 0));
    return pair.receiver.open(value_of(inspected), &pair.key, kSender, kTarget);
  };
  for (int i = 0; i < 64; ++i) value_of(new_session());
  const Refusal refused = refusal_of(new_session());
  CHECK(refused.rsc == Rsc::replayed);
  CHECK(refused.reason.find("its maximum") != std::string::npos);
  CHECK(pair.receiver.current_rand_object().id == rand.id);  // not retired: other keys' sessions go on
}

#include "dauth/rspf/esprim.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <deque>
#include <cstdio>
#include <list>
#include <set>
#include <utility>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/jose.hpp"
#include "repeated_key_watch.hpp"
#include "dauth/crypto/kdf.hpp"

namespace dauth::rspf::esprim {

namespace {

using nlohmann::json;

constexpr std::size_t kRandBytes = 16;         // esri and esrv: 128 bits each
constexpr std::size_t kMaxTextLength = 256;    // kid, ori, rri, AE-IDs, rqi, cty
constexpr std::size_t kMaxAlgIds = 16;         // eska, espa
constexpr std::size_t kMaxUriItems = 64;       // path segments, query items
constexpr std::size_t kMaxUriItemLength = 1024;
// The last second a four-digit year can carry (9999-12-31T23:59:59Z): every expiry is clamped to [0, this].
constexpr std::int64_t kLatestTimestamp = 253402300799;
constexpr std::string_view kAlgDir = "dir";
constexpr std::string_view kEncA256Gcm = "A256GCM";

// ---- JSON reading ------------------------------------------------------------------------------------------------

// A JSON object from text. Repeated member names are refused (RFC 7515 §4 allows it, and it keeps one meaning per
// text: no reader may pick another "kid" or "seq" than ours).
Result<json> parse_object(std::string_view text, std::string_view what) {
  RepeatedKeyWatch repeats;
  json document;
  try {
    document = json::parse(text.begin(), text.end(), repeats.callback(), false);
  } catch (const json::exception&) {
    // Not e.what(): it quotes the input, and the input may be a decrypted primitive.
    return make_error(Errc::parse, std::string(what) + ": not well-formed JSON");
  }
  if (document.is_discarded()) return make_error(Errc::parse, std::string(what) + ": not well-formed JSON");
  if (const auto& repeated_key = repeats.repeated()) {
    return make_error(Errc::parse, std::string(what) + ": member " + crypto::quote_for_error(*repeated_key) +
                                       " appears more than once");
  }
  if (!document.is_object()) return make_error(Errc::parse, std::string(what) + ": must be a JSON object");
  return document;
}

// Typed member access with errors that name the object and the member.
class Members {
 public:
  Members(const json& object, std::string_view what) : object_(object), what_(what) {}

  // Every member must be one of `allowed`: an unknown one would be dropped silently on the way through.
  Result<void> only(std::initializer_list<std::string_view> allowed) const {
    for (const auto& item : object_.items()) {
      if (std::find(allowed.begin(), allowed.end(), item.key()) == allowed.end()) {
        return make_error(Errc::parse, what_ + ": unknown member " + crypto::quote_for_error(item.key()));
      }
    }
    return ok_result();
  }
  const json* find(const char* key) const {
    const auto it = object_.find(key);
    return it == object_.end() ? nullptr : &*it;
  }
  Result<std::string> text(const char* key, std::size_t max_length = kMaxTextLength, bool may_be_empty = false) const {
    const json* value = find(key);
    if (value == nullptr) return missing(key);
    if (!value->is_string()) return wrong(key, "a text string");
    const auto& text = value->get_ref<const std::string&>();
    if ((text.empty() && !may_be_empty) || text.size() > max_length) {
      return wrong(key, "a text string of " + std::string(may_be_empty ? "0" : "1") + "–" +
                            std::to_string(max_length) + " bytes");
    }
    return text;
  }
  Result<std::uint64_t> integer(const char* key, std::uint64_t min, std::uint64_t max) const {
    const json* value = find(key);
    if (value == nullptr) return missing(key);
    return integer_of(*value, key, min, max);
  }
  // Absent: nullopt.
  Result<std::optional<std::uint64_t>> optional_integer(const char* key, std::uint64_t min, std::uint64_t max) const {
    const json* value = find(key);
    if (value == nullptr) return std::optional<std::uint64_t>{};
    auto number = integer_of(*value, key, min, max);
    if (!number) return std::move(number).error();
    return std::optional<std::uint64_t>{*number};
  }
  // Absent: empty when `required` is false.
  Result<std::vector<std::string>> texts(const char* key, bool required) const {
    const json* value = find(key);
    if (value == nullptr) {
      if (required) return missing(key);
      return std::vector<std::string>{};
    }
    if (!value->is_array() || value->size() > kMaxUriItems) {
      return wrong(key, "an array of at most " + std::to_string(kMaxUriItems) + " text strings");
    }
    std::vector<std::string> out;
    for (const auto& item : *value) {
      if (!item.is_string() || item.get_ref<const std::string&>().size() > kMaxUriItemLength) {
        return wrong(key, "an array of text strings of at most " + std::to_string(kMaxUriItemLength) + " bytes");
      }
      out.push_back(item.get<std::string>());
    }
    return out;
  }
  // Absent: empty. Present: base64url of at least one byte ("omitted when empty": one text per content).
  Result<Bytes> content(const char* key) const {
    const json* value = find(key);
    if (value == nullptr) return Bytes{};
    if (!value->is_string() || value->get_ref<const std::string&>().empty()) {
      return wrong(key, "a non-empty base64url text");
    }
    auto bytes = crypto::base64url_decode(value->get_ref<const std::string&>());
    if (!bytes) return make_error(Errc::parse, what_ + ": member \"" + key + "\": " + bytes.error().message);
    return bytes;
  }
  Error missing(const char* key) const {
    return make_error(Errc::parse, what_ + ": required member \"" + key + "\" is missing");
  }
  Error wrong(const char* key, const std::string& expected) const {
    return make_error(Errc::parse, what_ + ": member \"" + key + "\" must be " + expected);
  }

 private:
  Result<std::uint64_t> integer_of(const json& value, const char* key, std::uint64_t min, std::uint64_t max) const {
    // is_number_unsigned: written without a sign, fraction or exponent ("1.0" and "1e0" are floats, refused).
    if (!value.is_number_unsigned() || value.get<std::uint64_t>() < min || value.get<std::uint64_t>() > max) {
      return wrong(key, "an integer " + std::to_string(min) + "–" + std::to_string(max));
    }
    return value.get<std::uint64_t>();
  }

  const json& object_;
  std::string what_;
};

// Invalid UTF-8 (a CoAP Uri-Path may carry any bytes) becomes U+FFFD instead of an exception.
std::string dump(const json& document) { return document.dump(-1, ' ', false, json::error_handler_t::replace); }

// ---- oneM2M timestamps -------------------------------------------------------------------------------------------

// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil, for years >= 0).
std::int64_t days_from_civil(std::int64_t year, unsigned month, unsigned day) {
  year -= month <= 2 ? 1 : 0;
  const std::int64_t era = year / 400;
  const auto year_of_era = static_cast<unsigned>(year - era * 400);
  const unsigned day_of_year = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1;
  const unsigned day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
  return era * 146097 + static_cast<std::int64_t>(day_of_era) - 719468;
}

bool is_leap_year(std::int64_t year) { return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0; }

unsigned days_in_month(std::int64_t year, unsigned month) {
  static constexpr unsigned kDays[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
  return month == 2 && is_leap_year(year) ? 29 : kDays[month - 1];
}

std::int64_t clamp_expiry(std::int64_t expiry) { return std::clamp<std::int64_t>(expiry, 0, kLatestTimestamp); }

// "YYYYMMDDTHHMMSS" in UTC (TS-0004 §6.3.3 m2m:timestamp, basic ISO 8601 without fractions or zone).
std::string format_timestamp(std::int64_t unix_seconds) {
  const std::int64_t seconds = clamp_expiry(unix_seconds);
  std::int64_t days = seconds / 86400;
  const std::int64_t second_of_day = seconds % 86400;
  // H. Hinnant's civil_from_days, for days >= 0.
  days += 719468;
  const std::int64_t era = days / 146097;
  const auto day_of_era = static_cast<unsigned>(days - era * 146097);
  const unsigned year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146096) / 365;
  const unsigned day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
  const unsigned shifted_month = (5 * day_of_year + 2) / 153;
  const unsigned day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
  const unsigned month = shifted_month < 10 ? shifted_month + 3 : shifted_month - 9;
  const std::int64_t year = static_cast<std::int64_t>(year_of_era) + era * 400 + (month <= 2 ? 1 : 0);
  const auto second_in_day = static_cast<unsigned>(second_of_day);  // the clamp keeps every field small
  char text[64];
  std::snprintf(text, sizeof text, "%04u%02u%02uT%02u%02u%02u", static_cast<unsigned>(year), month, day,
                second_in_day / 3600, second_in_day / 60 % 60, second_in_day % 60);
  return text;
}

// The strict reverse of format_timestamp: exactly 15 characters, a real date from 1970 on, no leap second.
Result<std::int64_t> parse_timestamp(std::string_view text) {
  const auto refuse = [&] {
    return make_error(Errc::parse, "timestamp " + crypto::quote_for_error(text) +
                                       ": must be YYYYMMDDTHHMMSS (UTC, a date from 1970 on)");
  };
  if (text.size() != 15 || text[8] != 'T') return refuse();
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (i != 8 && (text[i] < '0' || text[i] > '9')) return refuse();
  }
  const auto number = [&](std::size_t at, std::size_t digits) {
    unsigned value = 0;
    for (std::size_t i = at; i < at + digits; ++i) value = value * 10 + static_cast<unsigned>(text[i] - '0');
    return value;
  };
  const std::int64_t year = number(0, 4);
  const unsigned month = number(4, 2);
  const unsigned day = number(6, 2);
  const unsigned hour = number(9, 2);
  const unsigned minute = number(11, 2);
  const unsigned second = number(13, 2);
  if (year < 1970 || month < 1 || month > 12 || day < 1 || day > days_in_month(year, month) || hour > 23 ||
      minute > 59 || second > 59) {
    return refuse();
  }
  return days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second;
}

// ---- rand objects ------------------------------------------------------------------------------------------------

json rand_to_json(const RandObject& object) {
  json document = json::object();
  document["esri"] = object.id;
  document["esrv"] = crypto::base64url_encode(object.value);
  document["esrx"] = format_timestamp(object.expiry);
  document["eska"] = object.key_gen_algs;
  document["espa"] = object.protocol_algs;
  return document;
}

Result<void> check_alg_ids(const std::vector<int>& ids, const char* name) {
  if (ids.empty() || ids.size() > kMaxAlgIds) {
    return make_error(Errc::parse, std::string("rand object: ") + name + " must list 1–" +
                                       std::to_string(kMaxAlgIds) + " algorithm IDs");
  }
  return ok_result();
}

// What parse_rand_object and set_receiver_rand both require of an object.
Result<void> check_rand_object(const RandObject& object) {
  const auto id = crypto::base64url_decode(object.id);
  if (!id || id->size() != kRandBytes) {
    return make_error(Errc::parse, "rand object: esri " + crypto::quote_for_error(object.id) +
                                       " must be base64url of " + std::to_string(kRandBytes) + " bytes");
  }
  if (object.value.size() != kRandBytes) {
    return make_error(Errc::parse, "rand object: esrv must be " + std::to_string(kRandBytes) + " bytes, not " +
                                       std::to_string(object.value.size()));
  }
  if (object.expiry != clamp_expiry(object.expiry)) {
    return make_error(Errc::parse, "rand object: esrx outside 1970–9999");
  }
  if (auto ok = check_alg_ids(object.key_gen_algs, "eska"); !ok) return ok;
  return check_alg_ids(object.protocol_algs, "espa");
}

Result<std::vector<int>> alg_ids_of(const json& value, const char* name) {
  const auto wrong = [&] {
    return make_error(Errc::parse, std::string("rand object: member \"") + name + "\" must be an array of 1–" +
                                       std::to_string(kMaxAlgIds) + " integers 0–65535");
  };
  if (!value.is_array() || value.empty() || value.size() > kMaxAlgIds) return wrong();
  std::vector<int> ids;
  for (const auto& item : value) {
    if (!item.is_number_unsigned() || item.get<std::uint64_t>() > 65535) return wrong();
    ids.push_back(static_cast<int>(item.get<std::uint64_t>()));
  }
  return ids;
}

Result<RandObject> rand_from_json(const json& document) {
  if (!document.is_object()) return make_error(Errc::parse, "rand object: must be a JSON object");
  const Members members(document, "rand object");
  if (auto ok = members.only({"esri", "esrv", "esrx", "eska", "espa"}); !ok) return std::move(ok).error();
  RandObject object;
  auto id = members.text("esri");
  if (!id) return std::move(id).error();
  object.id = std::move(*id);
  auto value = members.text("esrv");
  if (!value) return std::move(value).error();
  auto value_bytes = crypto::base64url_decode(*value);
  if (!value_bytes) return make_error(Errc::parse, "rand object: esrv: " + value_bytes.error().message);
  object.value = std::move(*value_bytes);
  auto expiry_text = members.text("esrx");
  if (!expiry_text) return std::move(expiry_text).error();
  auto expiry = parse_timestamp(*expiry_text);
  if (!expiry) return make_error(Errc::parse, "rand object: esrx: " + expiry.error().message);
  object.expiry = *expiry;
  for (const auto& [name, out] : {std::pair{"eska", &object.key_gen_algs}, {"espa", &object.protocol_algs}}) {
    const json* ids = members.find(name);
    if (ids == nullptr) return members.missing(name);
    auto parsed = alg_ids_of(*ids, name);
    if (!parsed) return std::move(parsed).error();
    *out = std::move(*parsed);
  }
  if (auto ok = check_rand_object(object); !ok) return std::move(ok).error();
  return object;
}

bool offers(const RandObject& object) {
  const auto has = [](const std::vector<int>& ids, int id) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  return has(object.key_gen_algs, kKeyGenHmacSha256) && has(object.protocol_algs, kProtocolJweA256Gcm);
}

// ---- the protected header ----------------------------------------------------------------------------------------

// The header members both sides check the same way: alg, enc, no crit or zip, kid/ori/rri/cty texts, seq.
struct CommonHeader {
  std::string kid;
  std::string ori;
  std::string rri;
  std::uint64_t seq = 0;
  std::string media_type;
};

Result<CommonHeader> read_common_header(const Members& members) {
  // crit names extensions that must be understood (RFC 7515 §4.1.11): dauth understands none. zip would make the
  // plaintext something other than the inner primitive.
  for (const char* refused : {"crit", "zip"}) {
    if (members.find(refused) != nullptr) {
      return make_error(Errc::unsupported, std::string("protected header member \"") + refused + "\" is not supported");
    }
  }
  auto alg = members.text("alg");
  if (!alg) return std::move(alg).error();
  auto enc = members.text("enc");
  if (!enc) return std::move(enc).error();
  if (*alg != kAlgDir || *enc != kEncA256Gcm) {
    return make_error(Errc::unsupported, "alg " + crypto::quote_for_error(*alg) + " enc " +
                                             crypto::quote_for_error(*enc) + ": only dir with A256GCM is supported");
  }
  CommonHeader header;
  for (const auto& [name, out] : {std::pair{"kid", &header.kid}, {"ori", &header.ori}, {"rri", &header.rri},
                                  {"cty", &header.media_type}}) {
    auto value = members.text(name);
    if (!value) return std::move(value).error();
    *out = std::move(*value);
  }
  auto seq = members.integer("seq", 0, kMaxSeq);
  if (!seq) return std::move(seq).error();
  header.seq = *seq;
  return header;
}

std::string describe(std::string_view kid, std::string_view ori, std::string_view rri, std::uint64_t seq) {
  return "kid " + crypto::quote_for_error(kid) + " ori " + crypto::quote_for_error(ori) + " rri " +
         crypto::quote_for_error(rri) + " seq " + std::to_string(seq);
}
std::string describe(const ReceivedHeader& header) {
  return describe(header.kid, header.ori, header.rri, header.seq);
}

json header_json(std::string_view kid, std::string_view media_type, std::string_view ori, std::string_view rri,
                 std::uint64_t seq) {
  json header = json::object();
  header["alg"] = kAlgDir;
  header["enc"] = kEncA256Gcm;
  header["kid"] = kid;
  header["cty"] = media_type;
  header["ori"] = ori;
  header["rri"] = rri;
  header["seq"] = seq;
  return header;
}

// What Inspected::object holds: the parsed JWE and the rro (canonical text), which only open() can compare.
struct InspectedObject {
  crypto::JweCompact jwe;
  std::optional<std::string> receiver_rand_text;
};

Refusal refuse(Rsc rsc, std::string reason) { return Refusal{rsc, std::move(reason)}; }

}  // namespace

// ---- free functions ----------------------------------------------------------------------------------------------

int Refusal::coap_code() const {
  return static_cast<std::uint32_t>(rsc) >= 5000 ? 500 : 403;
}

RandObject make_rand_object(std::int64_t expiry) {
  RandObject object;
  Bytes id(kRandBytes);
  random_bytes(id.data(), id.size());
  object.id = crypto::base64url_encode(id);
  object.value.resize(kRandBytes);
  random_bytes(object.value.data(), object.value.size());
  object.expiry = clamp_expiry(expiry);
  object.key_gen_algs = {kKeyGenHmacSha256};
  object.protocol_algs = {kProtocolJweA256Gcm};
  return object;
}

std::string canonical_text(const RandObject& object) { return dump(rand_to_json(object)); }

Result<RandObject> parse_rand_object(std::string_view json_text) {
  auto document = parse_object(json_text, "rand object");
  if (!document) return std::move(document).error();
  return rand_from_json(*document);
}

SecretBuffer derive_session_key(const SecretBuffer& pairwise, const RandObject& receiver,
                                const RandObject& originator) {
  // The message is public (both rand objects travel in clear): only the key and the output are secrets.
  const std::string message = canonical_text(receiver) + canonical_text(originator) + std::string(kSessionKeyLabel);
  return crypto::hmac_sha256(pairwise, ByteView::of(message));
}

// ---- ReplayWindow ------------------------------------------------------------------------------------------------

bool ReplayWindow::is_fresh(std::uint64_t seq) const {
  if (seq > kMaxSeq) return false;  // keeps highest_ + shift and the distances below far from wrapping
  if (!highest_ || seq > *highest_) return true;
  const std::uint64_t distance = *highest_ - seq;
  if (distance >= kReplayWindowSize) return false;
  return ((seen_ >> distance) & 1U) == 0;
}

void ReplayWindow::record(std::uint64_t seq) {
  if (!is_fresh(seq)) return;
  if (!highest_) {
    highest_ = seq;
    seen_ = 1;
    return;
  }
  if (seq > *highest_) {
    const std::uint64_t shift = seq - *highest_;
    seen_ = shift >= kReplayWindowSize ? 1 : (seen_ << shift) | 1U;
    highest_ = seq;
    return;
  }
  seen_ |= std::uint64_t{1} << (*highest_ - seq);
}

// ---- inner primitives --------------------------------------------------------------------------------------------

std::string to_json_text(const InnerRequest& request) {
  json document = json::object();
  document["op"] = request.operation;
  document["to"] = request.to;
  document["fr"] = request.from;
  document["rqi"] = request.request_id;
  document["path"] = request.path;
  if (!request.query.empty()) document["query"] = request.query;
  if (!request.content.empty()) document["pc"] = crypto::base64url_encode(request.content);
  if (request.content_format) document["cf"] = *request.content_format;
  if (request.accept) document["acc"] = *request.accept;
  return dump(document);
}

std::string to_json_text(const InnerResponse& response) {
  json document = json::object();
  document["rsc"] = response.rsc;
  document["coap"] = response.coap_code;
  document["rqi"] = response.request_id;
  if (!response.content.empty()) document["pc"] = crypto::base64url_encode(response.content);
  if (response.content_format) document["cf"] = *response.content_format;
  return dump(document);
}

Result<InnerRequest> parse_inner_request(std::string_view json_text) {
  auto document = parse_object(json_text, "inner request");
  if (!document) return std::move(document).error();
  const Members members(*document, "inner request");
  if (auto ok = members.only({"op", "to", "fr", "rqi", "path", "query", "pc", "cf", "acc"}); !ok) {
    return std::move(ok).error();
  }
  InnerRequest request;
  auto operation = members.integer("op", 1, 4);
  if (!operation) return std::move(operation).error();
  request.operation = static_cast<int>(*operation);
  for (const auto& [name, out] : {std::pair{"to", &request.to}, {"fr", &request.from}, {"rqi", &request.request_id}}) {
    auto value = members.text(name);
    if (!value) return std::move(value).error();
    *out = std::move(*value);
  }
  auto path = members.texts("path", true);
  if (!path) return std::move(path).error();
  request.path = std::move(*path);
  auto query = members.texts("query", false);
  if (!query) return std::move(query).error();
  if (members.find("query") != nullptr && query->empty()) return members.wrong("query", "omitted when empty");
  request.query = std::move(*query);
  auto content = members.content("pc");
  if (!content) return std::move(content).error();
  request.content = std::move(*content);
  for (const auto& [name, out] : {std::pair{"cf", &request.content_format}, {"acc", &request.accept}}) {
    auto value = members.optional_integer(name, 0, 65535);
    if (!value) return std::move(value).error();
    if (*value) *out = static_cast<std::uint16_t>(**value);
  }
  return request;
}

Result<InnerResponse> parse_inner_response(std::string_view json_text) {
  auto document = parse_object(json_text, "inner response");
  if (!document) return std::move(document).error();
  const Members members(*document, "inner response");
  if (auto ok = members.only({"rsc", "coap", "rqi", "pc", "cf"}); !ok) return std::move(ok).error();
  InnerResponse response;
  auto rsc = members.integer("rsc", 0, UINT32_MAX);
  if (!rsc) return std::move(rsc).error();
  response.rsc = static_cast<std::uint32_t>(*rsc);
  // class * 100 + detail: classes 2, 4 and 5, details 0–31 (RFC 7252 §3).
  auto coap = members.integer("coap", 200, 531);
  if (!coap) return std::move(coap).error();
  const auto code_class = *coap / 100;
  if ((code_class != 2 && code_class != 4 && code_class != 5) || *coap % 100 > 31) {
    return members.wrong("coap", "a CoAP response code as class*100+detail (2.xx, 4.xx or 5.xx)");
  }
  response.coap_code = static_cast<int>(*coap);
  auto request_id = members.text("rqi");
  if (!request_id) return std::move(request_id).error();
  response.request_id = std::move(*request_id);
  auto content = members.content("pc");
  if (!content) return std::move(content).error();
  response.content = std::move(*content);
  auto format = members.optional_integer("cf", 0, 65535);
  if (!format) return std::move(format).error();
  if (*format) response.content_format = static_cast<std::uint16_t>(**format);
  return response;
}

std::uint32_t rsc_for_coap_code(int coap_code) {
  if (coap_code >= 200 && coap_code < 300) return 2000;
  if (coap_code >= 400 && coap_code < 500) return 4000;
  return 5000;
}

// ---- outer bodies ------------------------------------------------------------------------------------------------

std::string to_json_text(const SecurityInfo& info) {
  json body = json::object();
  body["sit"] = info.type;
  if (info.receiver_rand) body["rro"] = rand_to_json(*info.receiver_rand);
  if (!info.object.empty()) body["epo"] = info.object;
  json document = json::object();
  document["m2m:seci"] = std::move(body);
  return dump(document);
}

Result<SecurityInfo> parse_security_info(std::string_view json_text) {
  auto document = parse_object(json_text, "m2m:seci body");
  if (!document) return std::move(document).error();
  const Members outer(*document, "m2m:seci body");
  if (auto ok = outer.only({"m2m:seci"}); !ok) return std::move(ok).error();
  const json* body = outer.find("m2m:seci");
  if (body == nullptr) return outer.missing("m2m:seci");
  if (!body->is_object()) return outer.wrong("m2m:seci", "a JSON object");
  const Members members(*body, "m2m:seci");
  auto type = members.integer("sit", 3, 5);
  if (!type) return std::move(type).error();
  SecurityInfo info;
  info.type = static_cast<int>(*type);
  switch (info.type) {
    case 3: {
      if (auto ok = members.only({"sit"}); !ok) return std::move(ok).error();
      break;
    }
    case 4: {
      if (auto ok = members.only({"sit", "rro"}); !ok) return std::move(ok).error();
      const json* rand = members.find("rro");
      if (rand == nullptr) return members.missing("rro");
      auto object = rand_from_json(*rand);
      if (!object) return make_error(Errc::parse, "m2m:seci: rro: " + object.error().message);
      info.receiver_rand = std::move(*object);
      break;
    }
    default: {
      if (auto ok = members.only({"sit", "epo"}); !ok) return std::move(ok).error();
      auto object = members.text("epo", crypto::kMaxJweCompactSize);
      if (!object) return std::move(object).error();
      info.object = std::move(*object);
      break;
    }
  }
  return info;
}

std::string refusal_body(const Refusal& refusal) {
  json body = json::object();
  body["rsc"] = static_cast<std::uint32_t>(refusal.rsc);
  body["dbg"] = refusal.reason;
  return dump(body);
}

std::optional<Refusal> parse_refusal_body(std::string_view json_text) {
  auto document = parse_object(json_text, "refusal body");
  if (!document) return std::nullopt;
  const Members members(*document, "refusal body");
  auto code = members.integer("rsc", 0, UINT32_MAX);
  if (!code) return std::nullopt;
  std::optional<Rsc> rsc;
  for (Rsc known : {Rsc::replayed, Rsc::unsupported_option, Rsc::unknown_key_id, Rsc::unknown_originator_rand_id,
                    Rsc::unknown_receiver_rand_id, Rsc::bad_mac, Rsc::impersonation, Rsc::decryption_error,
                    Rsc::encryption_error}) {
    if (static_cast<std::uint64_t>(known) == *code) rsc = known;
  }
  if (!rsc) return std::nullopt;
  std::string reason;
  if (const json* dbg = members.find("dbg"); dbg != nullptr && dbg->is_string()) reason = dbg->get<std::string>();
  return Refusal{*rsc, std::move(reason)};
}

// ---- Receiver ----------------------------------------------------------------------------------------------------

namespace {

// One originator session under a receiver rand object: (kid, ori).
struct ReceiverSession {
  std::string originator_text;  // canonical text of the originator object
  std::int64_t originator_expiry = 0;
  std::shared_ptr<const SecretBuffer> key;
  ReplayWindow window;
};

struct ReceiverRand {
  RandObject object;
  std::string text;  // canonical
  std::int64_t made_at = 0;
  bool full = false;  // reached max_sessions_per_rand: no longer handed out, no new session on it
  std::map<std::pair<std::string, std::string>, ReceiverSession> sessions;
};

}  // namespace

// The rqis of the latest creates (POST) delivered per (kid, receiving AE): far more than an originator has in
// flight (NSTART), so a resent create always finds its first delivery here.
constexpr std::size_t kDeliveredCreatesPerKey = 256;
// Sessions of one (kid, receiving AE) on one receiver object (see Receiver::open).
constexpr std::size_t kMaxSessionsPerKeyAndRand = 64;

struct Receiver::State {
  ReceiverConfig config;
  // Per kid "\n" receiving AE, oldest first; only verified objects enter, so only keys the MEF issued make rows.
  std::map<std::string, std::deque<std::string>> delivered_creates;
  std::list<ReceiverRand> live;  // oldest first; a list keeps current_rand_object()'s reference valid on rotation
  std::uint64_t made = 0;

  // Expired objects go with their sessions: their rri is unknown from then on (4114).
  void drop_expired(std::int64_t now) {
    live.remove_if([now](const ReceiverRand& rand) { return rand.object.expiry <= now; });
  }
  ReceiverRand* find(std::string_view rri) {
    for (auto& rand : live) {
      if (rand.object.id == rri) return &rand;
    }
    return nullptr;
  }
};

Receiver::Receiver(ReceiverConfig config) : state_(std::make_shared<State>()) {
  state_->config = std::move(config);
  if (!state_->config.clock) state_->config.clock = system_unix_clock();
}

const RandObject& Receiver::current_rand_object() {
  State& state = *state_;
  const std::int64_t now = state.config.clock();
  state.drop_expired(now);
  // Handed out until half of its lifetime has passed: an originator that fetched it late still has half a lifetime.
  if (!state.live.empty()) {
    const ReceiverRand& newest = state.live.back();
    if (!newest.full && now < newest.made_at + state.config.rand_lifetime_s / 2) return newest.object;
  }
  const std::size_t cap = std::max<std::size_t>(state.config.max_live_rand_objects, 1);
  while (state.live.size() >= cap) state.live.pop_front();  // the oldest is retired first, with its sessions
  ReceiverRand rand;
  rand.object = make_rand_object(now + state.config.rand_lifetime_s);
  rand.text = canonical_text(rand.object);
  rand.made_at = now;
  state.live.push_back(std::move(rand));
  ++state.made;
  return state.live.back().object;
}

Checked<Inspected> Receiver::inspect(std::string_view compact) const {
  auto jwe = crypto::parse_jwe_compact(compact);
  if (!jwe) return refuse(Rsc::unsupported_option, "ESPrim object: " + jwe.error().message);
  auto document = parse_object(jwe->protected_header, "ESPrim protected header");
  if (!document) return refuse(Rsc::unsupported_option, document.error().message);
  const Members members(*document, "ESPrim protected header");
  auto common = read_common_header(members);
  if (!common) return refuse(Rsc::unsupported_option, "ESPrim protected header: " + common.error().message);
  Inspected inspected;
  ReceivedHeader& header = inspected.header;
  header.kid = std::move(common->kid);
  header.ori = std::move(common->ori);
  header.rri = std::move(common->rri);
  header.seq = common->seq;
  header.media_type = std::move(common->media_type);
  auto object = std::make_shared<InspectedObject>();
  if (const json* oro = members.find("oro"); oro != nullptr) {
    auto originator = rand_from_json(*oro);
    if (!originator) {
      return refuse(Rsc::unsupported_option, "ESPrim object (" + describe(header) + "): oro: " +
                                                 originator.error().message);
    }
    if (originator->id != header.ori) {
      return refuse(Rsc::unsupported_option, "ESPrim object (" + describe(header) + "): oro's esri " +
                                                 crypto::quote_for_error(originator->id) + " is not its ori");
    }
    if (!offers(*originator)) {
      return refuse(Rsc::unsupported_option, "ESPrim object (" + describe(header) +
                                                 "): oro offers neither key generation 1 nor protocol 12");
    }
    header.originator_rand = std::move(*originator);
  }
  if (const json* rro = members.find("rro"); rro != nullptr) {
    auto receiver = rand_from_json(*rro);
    if (!receiver) {
      return refuse(Rsc::unsupported_option, "ESPrim object (" + describe(header) + "): rro: " +
                                                 receiver.error().message);
    }
    object->receiver_rand_text = canonical_text(*receiver);
  }
  object->jwe = std::move(*jwe);
  inspected.object = std::move(object);
  return inspected;
}

std::optional<Refusal> Receiver::check_before_key(const Inspected& inspected, std::string_view receiver_ae_id) {
  const ReceivedHeader& header = inspected.header;
  const std::string subject = "ESPrim object (" + describe(header) + ")";
  State& state = *state_;
  state.drop_expired(state.config.clock());
  const ReceiverRand* rand = state.find(header.rri);
  if (rand == nullptr) {
    return Refusal{Rsc::unknown_receiver_rand_id,
                   subject + ": unknown rri (never issued, expired, retired, or issued before a restart)"};
  }
  const auto session_id = std::make_pair(header.kid + '\n' + std::string(receiver_ae_id), header.ori);
  if (!header.originator_rand && rand->sessions.find(session_id) == rand->sessions.end()) {
    return Refusal{Rsc::unknown_originator_rand_id, subject + ": no session for this ori and no oro to start one"};
  }
  return std::nullopt;
}

Checked<OpenedRequest> Receiver::open(const Inspected& inspected, const SecretBuffer* pairwise_key,
                                      std::string_view bound_ae_id, std::string_view receiver_ae_id) {
  const ReceivedHeader& header = inspected.header;
  const auto object = std::static_pointer_cast<const InspectedObject>(inspected.object);
  const std::string subject = "ESPrim object (" + describe(header) + ")";
  if (!object) return refuse(Rsc::unsupported_option, subject + ": not inspected");
  if (pairwise_key == nullptr) return refuse(Rsc::unknown_key_id, subject + ": no pairwise key for this kid");
  State& state = *state_;
  const std::int64_t now = state.config.clock();
  state.drop_expired(now);
  ReceiverRand* rand = state.find(header.rri);
  if (rand == nullptr) {
    return refuse(Rsc::unknown_receiver_rand_id,
                  subject + ": unknown rri (never issued, expired, retired, or issued before a restart)");
  }
  if (object->receiver_rand_text && *object->receiver_rand_text != rand->text) {
    return refuse(Rsc::unsupported_option, subject + ": rro differs from the receiver rand object it names");
  }

  // A session serves one receiving AE: the outer to= names the key it was made with.
  const auto session_id = std::make_pair(header.kid + '\n' + std::string(receiver_ae_id), header.ori);
  auto session = rand->sessions.find(session_id);
  if (session != rand->sessions.end() && session->second.originator_expiry <= now) {
    rand->sessions.erase(session);  // its originator object expired: only a new oro can start it again
    session = rand->sessions.end();
  }
  std::shared_ptr<const SecretBuffer> key;
  std::string originator_text;
  if (session != rand->sessions.end()) {
    if (header.originator_rand && canonical_text(*header.originator_rand) != session->second.originator_text) {
      return refuse(Rsc::unsupported_option, subject + ": oro differs from the session's originator rand object");
    }
    key = session->second.key;
  } else {
    if (!header.originator_rand) {
      return refuse(Rsc::unknown_originator_rand_id, subject + ": no session for this ori and no oro to start one");
    }
    const RandObject& originator = *header.originator_rand;
    if (originator.expiry > rand->object.expiry || originator.expiry <= now) {
      return refuse(Rsc::unsupported_option,
                    subject + ": oro expires " + format_timestamp(originator.expiry) +
                        ", which is past or after the receiver rand object's " + format_timestamp(rand->object.expiry));
    }
    key = std::make_shared<const SecretBuffer>(derive_session_key(*pairwise_key, rand->object, originator));
    originator_text = canonical_text(originator);
  }

  auto plaintext = crypto::jwe_decrypt_dir_a256gcm(*key, object->jwe);
  if (!plaintext) {
    if (plaintext.error().code == Errc::crypto) {
      return refuse(Rsc::bad_mac, subject + ": the tag does not verify under the session key");
    }
    return refuse(Rsc::decryption_error, subject + ": " + plaintext.error().message);
  }
  if (header.media_type != kRequestMediaType) {
    return refuse(Rsc::unsupported_option, subject + ": cty " + crypto::quote_for_error(header.media_type) +
                                               " is not a request");
  }
  if (session != rand->sessions.end() && !session->second.window.is_fresh(header.seq)) {
    return refuse(Rsc::replayed, "replayed ESPrim object (seq " + std::to_string(header.seq) + "): " + subject);
  }
  const std::string_view plaintext_text(reinterpret_cast<const char*>(plaintext->data()), plaintext->size());
  // The reasons below name no value of the plaintext: a reason may reach the log and the plain refusal body.
  auto request = parse_inner_request(plaintext_text);
  if (!request) return refuse(Rsc::decryption_error, subject + ": the decrypted inner request is not a primitive");
  if (request->from != bound_ae_id) {
    return refuse(Rsc::impersonation, subject + ": inner fr is not the AE-ID the key is bound to");
  }
  if (request->to != receiver_ae_id) {
    return refuse(Rsc::impersonation,
                  subject + ": inner to is not the receiving AE");
  }

  // A create (POST) is carried out at most once per rqi: a hop that forges a 4113/4114 after B delivered it makes
  // the originator send it again, under a new session and seq (PROTOCOL.md §7.5).
  const std::string delivered_key = header.kid + '\n' + std::string(receiver_ae_id);
  if (request->operation == 1) {
    const auto& delivered = state.delivered_creates[delivered_key];
    if (std::find(delivered.begin(), delivered.end(), request->request_id) != delivered.end()) {
      return refuse(Rsc::replayed, subject + ": a create with this rqi was already carried out");
    }
  }

  // Verified: only now may it create a session or move a window.
  if (session == rand->sessions.end()) {
    if (rand->full || rand->sessions.size() >= state.config.max_sessions_per_rand) {
      rand->full = true;  // the next current_rand_object() makes a new one; sessions on this one go on
      return refuse(Rsc::unknown_receiver_rand_id,
                    subject + ": the receiver rand object has " + std::to_string(rand->sessions.size()) +
                        " sessions, its maximum: retired early, ask for a new one");
    }
    // One key's sessions per object are bounded too: an originator makes one per receiver object (and one per
    // restart), so more is one key filling the object to make it retire and take every other session with it.
    std::size_t of_this_key = 0;
    for (auto it = rand->sessions.lower_bound(std::make_pair(session_id.first, std::string()));
         it != rand->sessions.end() && it->first.first == session_id.first; ++it) {
      ++of_this_key;
    }
    if (of_this_key >= kMaxSessionsPerKeyAndRand) {
      return refuse(Rsc::replayed, subject + ": this key already has " + std::to_string(of_this_key) +
                                       " sessions on this receiver rand object, its maximum");
    }
    ReceiverSession fresh;
    fresh.originator_text = std::move(originator_text);
    fresh.originator_expiry = header.originator_rand->expiry;
    fresh.key = key;
    session = rand->sessions.emplace(session_id, std::move(fresh)).first;
  }
  session->second.window.record(header.seq);
  if (request->operation == 1) {
    auto& delivered = state.delivered_creates[delivered_key];
    delivered.push_back(request->request_id);
    if (delivered.size() > kDeliveredCreatesPerKey) delivered.pop_front();
  }

  OpenedRequest opened;
  opened.request = std::move(*request);
  opened.kid = header.kid;
  opened.ori = header.ori;
  opened.rri = header.rri;
  opened.seq = header.seq;
  opened.session_key = std::move(key);
  return opened;
}

Checked<std::string> Receiver::protect_response(const OpenedRequest& opened, const InnerResponse& response) const {
  const std::string subject = "ESPrim answer (" + describe(opened.kid, opened.ori, opened.rri, opened.seq) + ")";
  if (!opened.session_key) return refuse(Rsc::encryption_error, subject + ": no session key");
  const std::string header =
      dump(header_json(opened.kid, kResponseMediaType, opened.ori, opened.rri, opened.seq));
  const std::string plaintext = to_json_text(response);
  auto compact = crypto::jwe_encrypt_dir_a256gcm(*opened.session_key, header, ByteView::of(plaintext));
  if (!compact) return refuse(Rsc::encryption_error, subject + ": " + compact.error().message);
  return std::move(*compact);
}

Receiver::Stats Receiver::stats() const {
  Stats stats;
  stats.live_rand_objects = state_->live.size();
  for (const auto& rand : state_->live) stats.sessions += rand.sessions.size();
  stats.rand_objects_made = state_->made;
  return stats;
}

// ---- Originator --------------------------------------------------------------------------------------------------

namespace {

// What the originator keeps per (kid, receiver AE-ID).
struct OriginatorPeer {
  RandObject receiver;
  std::string receiver_text;  // canonical
  std::optional<RandObject> own;  // made on the first protect() under this receiver object
  std::shared_ptr<const SecretBuffer> key;
  std::uint64_t next_seq = 0;
  bool send_oro = true;  // until an answer under this session was opened
  // When to ask for the next receiver object: refresh_margin_s before its expiry, or a quarter of the time it had
  // left when it came if that is less (a short-lived object would otherwise be asked for before every request).
  std::int64_t margin_s = 0;
};

}  // namespace

struct Originator::State {
  OriginatorConfig config;
  std::map<std::pair<std::string, std::string>, OriginatorPeer> peers;

  OriginatorPeer* find(std::string_view kid, std::string_view receiver_ae_id) {
    const auto it = peers.find(std::make_pair(std::string(kid), std::string(receiver_ae_id)));
    return it == peers.end() ? nullptr : &it->second;
  }
};

Originator::Originator(OriginatorConfig config) : state_(std::make_shared<State>()) {
  state_->config = std::move(config);
  if (!state_->config.clock) state_->config.clock = system_unix_clock();
}

bool Originator::needs_receiver_rand(std::string_view kid, std::string_view receiver_ae_id) const {
  const OriginatorPeer* peer = state_->find(kid, receiver_ae_id);
  if (peer == nullptr) return true;
  return peer->receiver.expiry - state_->config.clock() < peer->margin_s;
}

Result<void> Originator::set_receiver_rand(std::string_view kid, std::string_view receiver_ae_id,
                                           RandObject receiver) {
  if (auto ok = check_rand_object(receiver); !ok) return ok;
  if (!offers(receiver)) {
    return make_error(Errc::unsupported, "receiver rand object of " + crypto::quote_for_error(receiver_ae_id) +
                                             " offers neither key generation 1 nor protocol 12");
  }
  if (receiver.expiry <= state_->config.clock()) {
    return make_error(Errc::expired, "receiver rand object " + crypto::quote_for_error(receiver.id) + " of " +
                                         crypto::quote_for_error(receiver_ae_id) + " expired at " +
                                         format_timestamp(receiver.expiry));
  }
  std::string text = canonical_text(receiver);
  OriginatorPeer& peer = state_->peers[std::make_pair(std::string(kid), std::string(receiver_ae_id))];
  if (peer.receiver_text == text) return ok_result();  // the same object again: the session goes on
  // A new receiver object starts a new session: a new originator object, seq from 0, oro until answered.
  peer = OriginatorPeer{};
  peer.margin_s = std::min(state_->config.refresh_margin_s, (receiver.expiry - state_->config.clock()) / 4);
  peer.receiver = std::move(receiver);
  peer.receiver_text = std::move(text);
  return ok_result();
}

Result<ProtectedRequest> Originator::protect(std::string_view kid, const SecretBuffer& pairwise_key,
                                             InnerRequest request) {
  const std::string receiver_ae_id = request.to;
  OriginatorPeer* peer = state_->find(kid, receiver_ae_id);
  if (peer == nullptr || peer->receiver.expiry <= state_->config.clock()) {
    return make_error(Errc::not_found, "no valid receiver rand object for kid " + crypto::quote_for_error(kid) +
                                           " and receiver " + crypto::quote_for_error(receiver_ae_id));
  }
  if (!peer->own) {
    peer->own = make_rand_object(peer->receiver.expiry);  // not after the receiver's (PROTOCOL.md §7)
    peer->key = std::make_shared<const SecretBuffer>(derive_session_key(pairwise_key, peer->receiver, *peer->own));
    peer->next_seq = 0;
    peer->send_oro = true;
  }
  if (peer->next_seq > kMaxSeq) {
    return make_error(Errc::limit, "ESPrim session " + describe(kid, peer->own->id, peer->receiver.id, kMaxSeq) +
                                       ": every seq is used, a new receiver rand object is needed");
  }
  const std::uint64_t seq = peer->next_seq;
  json header = header_json(kid, kRequestMediaType, peer->own->id, peer->receiver.id, seq);
  const bool carried_oro = peer->send_oro;
  if (carried_oro) header["oro"] = rand_to_json(*peer->own);
  const std::string plaintext = to_json_text(request);
  auto compact = crypto::jwe_encrypt_dir_a256gcm(*peer->key, dump(header), ByteView::of(plaintext));
  if (!compact) {
    return make_error(Errc::crypto, "ESPrim object (" + describe(kid, peer->own->id, peer->receiver.id, seq) +
                                        "): " + compact.error().message);
  }
  ++peer->next_seq;  // only a seq that was used is consumed; a failed one may be used again (no IV was spent)
  ProtectedRequest sent;
  sent.compact = std::move(*compact);
  sent.kid = std::string(kid);
  sent.receiver_ae_id = receiver_ae_id;
  sent.rri = peer->receiver.id;
  sent.ori = peer->own->id;
  sent.seq = seq;
  sent.request_id = std::move(request.request_id);
  sent.session_key = peer->key;
  sent.carried_oro = carried_oro;
  return sent;
}

Result<InnerResponse> Originator::open_response(const ProtectedRequest& sent, std::string_view compact) {
  const std::string subject = "ESPrim answer to " + describe(sent.kid, sent.ori, sent.rri, sent.seq);
  const auto malformed = [&](const std::string& what) { return make_error(Errc::parse, subject + ": " + what); };
  if (!sent.session_key) return make_error(Errc::invalid_argument, subject + ": the request has no session key");
  auto jwe = crypto::parse_jwe_compact(compact);
  if (!jwe) return malformed(jwe.error().message);
  auto document = parse_object(jwe->protected_header, "protected header");
  if (!document) return malformed(document.error().message);
  const Members members(*document, "protected header");
  auto header = read_common_header(members);
  if (!header) return malformed(header.error().message);
  if (header->kid != sent.kid || header->ori != sent.ori || header->rri != sent.rri || header->seq != sent.seq) {
    return malformed("its header names " + describe(header->kid, header->ori, header->rri, header->seq));
  }
  if (header->media_type != kResponseMediaType) {
    return malformed("cty " + crypto::quote_for_error(header->media_type) + " is not a response");
  }
  if (members.find("oro") != nullptr) return malformed("an answer carries no oro");
  auto plaintext = crypto::jwe_decrypt_dir_a256gcm(*sent.session_key, *jwe);
  if (!plaintext) {
    return make_error(plaintext.error().code, subject + ": " + plaintext.error().message);
  }
  auto response = parse_inner_response(
      std::string_view(reinterpret_cast<const char*>(plaintext->data()), plaintext->size()));
  // No value of the plaintext in these errors: they are logged.
  if (!response) return malformed("the decrypted inner response is not a primitive");
  if (response->request_id != sent.request_id) {
    return malformed("inner rqi is not the request's " + crypto::quote_for_error(sent.request_id));
  }
  // The receiver holds the session now: later requests need no oro.
  if (OriginatorPeer* peer = state_->find(sent.kid, sent.receiver_ae_id);
      peer != nullptr && peer->own && peer->own->id == sent.ori && peer->receiver.id == sent.rri) {
    peer->send_oro = false;
  }
  return response;
}

void Originator::on_refusal(const ProtectedRequest& sent, Rsc rsc) {
  const auto it = state_->peers.find(std::make_pair(sent.kid, sent.receiver_ae_id));
  if (it == state_->peers.end() || it->second.receiver.id != sent.rri) return;  // already replaced
  if (rsc == Rsc::unknown_receiver_rand_id) {
    state_->peers.erase(it);  // needs_receiver_rand() is true from now on
  } else if (rsc == Rsc::unknown_originator_rand_id && it->second.own && it->second.own->id == sent.ori) {
    it->second.send_oro = true;
  }
}

}  // namespace dauth::rspf::esprim

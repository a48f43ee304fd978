#include "dauth/rspf/messages.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <optional>
#include <set>
#include <string_view>
#include <vector>

#include "repeated_key_watch.hpp"

namespace dauth::rspf {

namespace {

using nlohmann::json;

constexpr std::size_t kMaxTargets = 64;
constexpr std::size_t kMaxInstructions = 8;
constexpr std::size_t kMaxTextLength = 256;

Bytes serialise(const json& document, ContentFormat format) {
  if (format == ContentFormat::cbor) return json::to_cbor(document);
  const std::string text = document.dump();
  return Bytes(text.begin(), text.end());
}

Result<void> check_cbor(ByteView payload, std::string_view message);

Result<json> parse(ByteView payload, ContentFormat format, std::string_view message,
                   std::size_t max_size = kMaxPayloadSize) {
  if (payload.size > max_size) {
    return make_error(Errc::limit, std::string(message) + ": payload of " + std::to_string(payload.size) +
                                       " bytes exceeds " + std::to_string(max_size));
  }
  // nlohmann's CBOR reader recurses per nesting level and throws on absurd container counts even with
  // allow_exceptions=false (found by fuzz_rspf_messages), takes invalid UTF-8 in text strings and lets the last of
  // repeated map keys win: our own bounded reader refuses all of that first.
  if (format == ContentFormat::cbor) {
    if (auto strict = check_cbor(payload, message); !strict) return std::move(strict).error();
  }
  const std::uint8_t* end = payload.data + payload.size;
  json document;
  // JSON: nlohmann's lexer refuses invalid UTF-8 itself; a repeated key is seen by RepeatedKeyWatch.
  RepeatedKeyWatch repeats;
  try {
    document = format == ContentFormat::cbor ? json::from_cbor(payload.data, end, true, false)
                                             : json::parse(payload.data, end, repeats.callback(), false);
  } catch (const json::exception& e) {
    return make_error(Errc::parse, std::string(message) + ": " + e.what());
  }
  if (const auto& repeated_key = repeats.repeated()) {
    return make_error(Errc::parse, std::string(message) + ": map key " + crypto::quote_for_error(*repeated_key) +
                                       " appears more than once");
  }
  if (document.is_discarded()) {
    return make_error(Errc::parse, std::string(message) + ": not well-formed " +
                                       (format == ContentFormat::cbor ? "CBOR" : "JSON"));
  }
  if (!document.is_object()) {
    return make_error(Errc::parse, std::string(message) + ": top level must be a map");
  }
  return document;
}

// Typed field access with errors that name the message and the key.
class Fields {
 public:
  Fields(const json& document, std::string_view message) : document_(document), message_(message) {}

  Result<bool> boolean(const char* key, bool fallback) const {
    const auto it = document_.find(key);
    if (it == document_.end()) return fallback;
    if (!it->is_boolean()) return wrong(key, "a boolean");
    return it->get<bool>();
  }
  Result<std::string> text(const char* key) const {
    const auto it = document_.find(key);
    if (it == document_.end()) return missing(key);
    if (!it->is_string() || it->get_ref<const std::string&>().size() > kMaxTextLength) {
      return wrong(key, "a text string of at most " + std::to_string(kMaxTextLength) + " bytes");
    }
    return it->get<std::string>();
  }
  Result<std::int64_t> integer(const char* key) const {
    const auto it = document_.find(key);
    if (it == document_.end()) return missing(key);
    if (!it->is_number_unsigned()) return wrong(key, "an unsigned integer");
    const auto value = it->get<std::uint64_t>();
    if (value > static_cast<std::uint64_t>(INT64_MAX)) return wrong(key, "an integer below 2^63");
    return static_cast<std::int64_t>(value);
  }
  Result<std::vector<std::string>> texts(const char* key, bool required, std::size_t max_items) const {
    const auto it = document_.find(key);
    if (it == document_.end()) {
      if (required) return missing(key);
      return std::vector<std::string>{};
    }
    if (!it->is_array() || it->size() > max_items) {
      return wrong(key, "an array of at most " + std::to_string(max_items) + " text strings");
    }
    std::vector<std::string> out;
    for (const auto& item : *it) {
      if (!item.is_string() || item.get_ref<const std::string&>().size() > kMaxTextLength) {
        return wrong(key, "an array of text strings");
      }
      out.push_back(item.get<std::string>());
    }
    return out;
  }
  const json* raw(const char* key) const {
    const auto it = document_.find(key);
    return it == document_.end() ? nullptr : &*it;
  }
  Error missing(const char* key) const {
    return make_error(Errc::parse, std::string(message_) + ": required key \"" + key + "\" is missing");
  }
  Error wrong(const char* key, const std::string& expected) const {
    return make_error(Errc::parse, std::string(message_) + ": key \"" + key + "\" must be " + expected);
  }

 private:
  const json& document_;
  std::string_view message_;
};

Result<void> check_ae_ids(const std::vector<std::string>& ids, std::string_view message, const char* key) {
  for (const auto& id : ids) {
    if (auto ok = crypto::validate_ae_id(id); !ok) {
      return make_error(Errc::parse, std::string(message) + ": \"" + key + "\": " + ok.error().message);
    }
  }
  return ok_result();
}

// --- A minimal CBOR (RFC 8949) reader and writer for the one message that carries a key. ---

constexpr std::uint8_t kMajorUnsigned = 0;
constexpr std::uint8_t kMajorBytes = 2;
constexpr std::uint8_t kMajorText = 3;
constexpr std::uint8_t kMajorArray = 4;
constexpr std::uint8_t kMajorMap = 5;
constexpr std::uint8_t kMajorTag = 6;
constexpr int kMaxSkipDepth = 8;

struct CborCursor {
  const std::uint8_t* at;
  std::size_t left;

  bool take(std::size_t n, const std::uint8_t*& out) {
    if (n > left) return false;
    out = at;
    at += n;
    left -= n;
    return true;
  }
  // Reads an item head; definite lengths only (indefinite and reserved additional info are refused).
  bool head(std::uint8_t& major, std::uint64_t& argument) {
    const std::uint8_t* byte = nullptr;
    if (!take(1, byte)) return false;
    major = static_cast<std::uint8_t>(*byte >> 5);
    const std::uint8_t info = *byte & 0x1f;
    if (info < 24) {
      argument = info;
      return true;
    }
    if (info > 27) return false;
    const std::size_t size = std::size_t{1} << (info - 24);
    const std::uint8_t* bytes = nullptr;
    if (!take(size, bytes)) return false;
    argument = 0;
    for (std::size_t i = 0; i < size; ++i) argument = (argument << 8) | bytes[i];
    return true;
  }
  bool skip_item(int depth) {
    if (depth > kMaxSkipDepth) return false;
    std::uint8_t major = 0;
    std::uint64_t argument = 0;
    if (!head(major, argument)) return false;
    const std::uint8_t* ignored = nullptr;
    switch (major) {
      case kMajorBytes:
      case kMajorText:
        return argument <= left && take(static_cast<std::size_t>(argument), ignored);
      case kMajorArray:
      case kMajorMap: {
        const std::uint64_t items = major == kMajorMap ? argument * 2 : argument;
        if (argument > left || items > left) return false;  // every item takes at least one byte
        for (std::uint64_t i = 0; i < items; ++i) {
          if (!skip_item(depth + 1)) return false;
        }
        return true;
      }
      case kMajorTag:
        return skip_item(depth + 1);
      default:  // unsigned, negative, simple values and floats: the head was the whole item
        return true;
    }
  }
};

class CborSecretWriter {
 public:
  explicit CborSecretWriter(std::size_t capacity) : out_(capacity) {}
  void head(std::uint8_t major, std::uint64_t argument) {
    const auto type = static_cast<std::uint8_t>(major << 5);
    if (argument < 24) {
      put(static_cast<std::uint8_t>(type | argument));
    } else if (argument <= 0xff) {
      put(type | 24);
      put(static_cast<std::uint8_t>(argument));
    } else if (argument <= 0xffff) {
      put(type | 25);
      for (int shift = 8; shift >= 0; shift -= 8) put(static_cast<std::uint8_t>(argument >> shift));
    } else if (argument <= 0xffffffffULL) {
      put(type | 26);
      for (int shift = 24; shift >= 0; shift -= 8) put(static_cast<std::uint8_t>(argument >> shift));
    } else {
      put(type | 27);
      for (int shift = 56; shift >= 0; shift -= 8) put(static_cast<std::uint8_t>(argument >> shift));
    }
  }
  void bytes(std::uint8_t major, ByteView data) {
    head(major, data.size);
    if (data.size > 0) std::memcpy(out_.data() + used_, data.data, data.size);
    used_ += data.size;
  }
  SecretBuffer finish() { return out_.slice(0, used_); }

 private:
  void put(std::uint8_t byte) { out_.data()[used_++] = byte; }
  SecretBuffer out_;
  std::size_t used_ = 0;
};

constexpr std::size_t kCredentialSize = 32;

// RFC 3629: shortest forms only, no surrogates, nothing above U+10FFFF.
bool valid_utf8(const std::uint8_t* text, std::size_t size) {
  std::size_t i = 0;
  while (i < size) {
    const std::uint8_t lead = text[i];
    if (lead < 0x80) {
      ++i;
      continue;
    }
    // Lead byte: how many continuation bytes follow, its payload bits, and the least code point that needs them.
    std::size_t continuation = 3;
    std::uint32_t point = lead & 0x07U;
    std::uint32_t lowest = 0x10000;
    if ((lead & 0xe0) == 0xc0) {
      continuation = 1;
      point = lead & 0x1fU;
      lowest = 0x80;
    } else if ((lead & 0xf0) == 0xe0) {
      continuation = 2;
      point = lead & 0x0fU;
      lowest = 0x800;
    } else if ((lead & 0xf8) != 0xf0) {
      return false;
    }
    if (continuation >= size - i) return false;
    for (std::size_t k = 1; k <= continuation; ++k) {
      if ((text[i + k] & 0xc0) != 0x80) return false;
      point = (point << 6) | (text[i + k] & 0x3fU);
    }
    if (point < lowest || point > 0x10ffff || (point >= 0xd800 && point <= 0xdfff)) return false;
    i += continuation + 1;
  }
  return true;
}

// The one strict reading every CBOR payload of RSPF gets before its decoder sees it: one well-formed item,
// definite lengths, nesting at most kMaxSkipDepth, text strings in valid UTF-8, maps keyed by text strings that
// do not repeat (RFC 8949 §5.6: a decoder that lets a repeated key win is open to two readers seeing two
// messages). It only reads: the fetchCredentials answer's key is not copied.
class StrictCborCheck {
 public:
  explicit StrictCborCheck(ByteView payload) : cursor_{payload.data, payload.size} {}

  std::optional<std::string> problem() {
    if (!item(0)) return problem_;
    if (cursor_.left != 0) return std::to_string(cursor_.left) + " bytes after the CBOR item";
    return std::nullopt;
  }

 private:
  bool fail(std::string why) {
    problem_ = std::move(why);
    return false;
  }
  bool text(std::uint64_t length, std::string_view* out) {
    const std::uint8_t* bytes = nullptr;
    if (length > cursor_.left || !cursor_.take(static_cast<std::size_t>(length), bytes)) return fail("truncated CBOR");
    if (!valid_utf8(bytes, static_cast<std::size_t>(length))) return fail("a text string is not valid UTF-8");
    if (out != nullptr) *out = std::string_view(reinterpret_cast<const char*>(bytes), static_cast<std::size_t>(length));
    return true;
  }
  bool item(int depth) {
    if (depth > kMaxSkipDepth) return fail("nesting deeper than " + std::to_string(kMaxSkipDepth));
    std::uint8_t major = 0;
    std::uint64_t argument = 0;
    if (!cursor_.head(major, argument)) return fail("truncated CBOR or an indefinite length");
    const std::uint8_t* ignored = nullptr;
    switch (major) {
      case kMajorBytes:
        if (argument > cursor_.left || !cursor_.take(static_cast<std::size_t>(argument), ignored)) {
          return fail("truncated CBOR");
        }
        return true;
      case kMajorText:
        return text(argument, nullptr);
      case kMajorArray:
        if (argument > cursor_.left) return fail("truncated CBOR");  // every item takes at least one byte
        for (std::uint64_t i = 0; i < argument; ++i) {
          if (!item(depth + 1)) return false;
        }
        return true;
      case kMajorMap: {
        if (argument > cursor_.left / 2) return fail("truncated CBOR");
        std::vector<std::string_view> keys;
        keys.reserve(static_cast<std::size_t>(argument));
        for (std::uint64_t i = 0; i < argument; ++i) {
          std::uint8_t key_major = 0;
          std::uint64_t key_length = 0;
          if (!cursor_.head(key_major, key_length)) return fail("truncated CBOR or an indefinite length");
          if (key_major != kMajorText) return fail("a map key is not a text string");
          std::string_view key;
          if (!text(key_length, &key)) return false;
          keys.push_back(key);
          if (!item(depth + 1)) return false;
        }
        std::sort(keys.begin(), keys.end());
        const auto repeated = std::adjacent_find(keys.begin(), keys.end());
        if (repeated != keys.end()) {
          return fail("map key " + crypto::quote_for_error(*repeated) + " appears more than once");
        }
        return true;
      }
      case kMajorTag:
        return item(depth + 1);
      default:  // unsigned, negative, simple values and floats: the head was the whole item
        return true;
    }
  }

  CborCursor cursor_;
  std::string problem_;
};

Result<void> check_cbor(ByteView payload, std::string_view message) {
  if (auto problem = StrictCborCheck(payload).problem()) {
    return make_error(Errc::parse, std::string(message) + ": not accepted as CBOR: " + *problem);
  }
  return ok_result();
}

}  // namespace

Result<ContentFormat> content_format_from(unsigned value) {
  if (value == static_cast<unsigned>(ContentFormat::cbor)) return ContentFormat::cbor;
  if (value == static_cast<unsigned>(ContentFormat::json)) return ContentFormat::json;
  return make_error(Errc::unsupported, "Content-Format " + std::to_string(value) +
                                           " is not accepted (60 application/cbor or 50 application/json)");
}

Bytes encode(const EnrolmentRequest& message, ContentFormat format) {
  return serialise({{"certEnrolment", message.cert_enrolment},
                    {"mafEnrolment", message.maf_enrolment},
                    {"remoteMgmt", message.remote_mgmt}},
                   format);
}

Result<EnrolmentRequest> decode_enrolment_request(ByteView payload, ContentFormat format) {
  constexpr std::string_view kMessage = "enrolment request";
  auto document = parse(payload, format, kMessage);
  if (!document) return std::move(document).error();
  const Fields fields(*document, kMessage);
  EnrolmentRequest message;
  auto cert = fields.boolean("certEnrolment", false);
  auto maf = fields.boolean("mafEnrolment", false);
  auto remote = fields.boolean("remoteMgmt", false);
  for (auto* r : {&cert, &maf, &remote}) {
    if (!*r) return r->error();
  }
  message.cert_enrolment = *cert;
  message.maf_enrolment = *maf;
  message.remote_mgmt = *remote;
  return message;
}

Bytes encode(const EnrolmentResponse& message, ContentFormat format) {
  json document = {{"keId", message.ke_id},
                   {"enroleeId", message.enrolee_id},
                   {"targets", message.targets},
                   {"expiry", message.expiry}};
  if (!message.instructions.empty()) {
    json instructions = json::array();
    for (const auto& i : message.instructions) instructions.push_back({{"type", i.type}, {"uri", i.uri}});
    document["instructions"] = std::move(instructions);
  }
  return serialise(document, format);
}

Result<EnrolmentResponse> decode_enrolment_response(ByteView payload, ContentFormat format) {
  constexpr std::string_view kMessage = "enrolment response";
  auto document = parse(payload, format, kMessage);
  if (!document) return std::move(document).error();
  const Fields fields(*document, kMessage);
  EnrolmentResponse message;
  auto ke_id = fields.text("keId");
  if (!ke_id) return std::move(ke_id).error();
  auto parsed_ke_id = crypto::parse_ke_id(*ke_id);
  if (!parsed_ke_id) return make_error(Errc::parse, std::string(kMessage) + ": " + parsed_ke_id.error().message);
  message.ke_id = parsed_ke_id->text();
  auto enrolee = fields.text("enroleeId");
  if (!enrolee) return std::move(enrolee).error();
  message.enrolee_id = std::move(enrolee).value();
  if (auto ok = check_ae_ids({message.enrolee_id}, kMessage, "enroleeId"); !ok) return std::move(ok).error();
  auto targets = fields.texts("targets", true, kMaxTargets);
  if (!targets) return std::move(targets).error();
  message.targets = std::move(targets).value();
  if (auto ok = check_ae_ids(message.targets, kMessage, "targets"); !ok) return std::move(ok).error();
  auto expiry = fields.integer("expiry");
  if (!expiry) return std::move(expiry).error();
  message.expiry = *expiry;
  if (const json* instructions = fields.raw("instructions")) {
    if (!instructions->is_array() || instructions->size() > kMaxInstructions) {
      return fields.wrong("instructions", "an array of at most " + std::to_string(kMaxInstructions) + " maps");
    }
    for (const auto& item : *instructions) {
      if (!item.is_object()) return fields.wrong("instructions", "an array of maps");
      const Fields instruction(item, "enrolment response instruction");
      auto type = instruction.text("type");
      if (!type) return std::move(type).error();
      auto uri = instruction.text("uri");
      if (!uri) return std::move(uri).error();
      message.instructions.push_back({std::move(type).value(), std::move(uri).value()});
    }
  }
  return message;
}

SecretBuffer encode(const FetchCredentialsResponse& message) {
  // Written by hand into guarded memory: the payload holds the key (RFC 8949 deterministic encoding).
  CborSecretWriter writer(64 + message.credential.size() + message.enrolee_id.size());
  writer.head(kMajorMap, 3);
  writer.bytes(kMajorText, ByteView::of("credential"));
  writer.bytes(kMajorBytes, message.credential.view());
  writer.bytes(kMajorText, ByteView::of("enroleeId"));
  writer.bytes(kMajorText, ByteView::of(message.enrolee_id));
  writer.bytes(kMajorText, ByteView::of("lifetime"));
  writer.head(kMajorUnsigned, static_cast<std::uint64_t>(std::max<std::int64_t>(message.lifetime_s, 0)));
  return writer.finish();
}

Result<FetchCredentialsResponse> decode_fetch_credentials_response(ByteView payload) {
  const std::string kMessage = "fetchCredentials response";
  auto malformed = [&](const std::string& what) { return make_error(Errc::parse, kMessage + ": " + what); };
  if (payload.size > kMaxPayloadSize) return malformed("payload larger than 4096 bytes");
  if (auto strict = check_cbor(payload, kMessage); !strict) return std::move(strict).error();
  CborCursor cursor{payload.data, payload.size};
  std::uint8_t major = 0;
  std::uint64_t entries = 0;
  if (!cursor.head(major, entries) || major != kMajorMap) return malformed("top level must be a CBOR map");
  if (entries > cursor.left) return malformed("truncated CBOR");
  FetchCredentialsResponse message;
  bool have_credential = false;
  bool have_enrolee = false;
  bool have_lifetime = false;
  for (std::uint64_t i = 0; i < entries; ++i) {
    std::uint64_t key_length = 0;
    const std::uint8_t* key = nullptr;
    if (!cursor.head(major, key_length) || major != kMajorText || key_length > cursor.left ||
        !cursor.take(static_cast<std::size_t>(key_length), key)) {
      return malformed("map keys must be text strings (truncated or not CBOR)");
    }
    const std::string_view name(reinterpret_cast<const char*>(key), static_cast<std::size_t>(key_length));
    std::uint64_t argument = 0;
    const std::uint8_t* value = nullptr;
    if (name == "credential") {
      if (!cursor.head(major, argument) || major != kMajorBytes || argument != kCredentialSize ||
          !cursor.take(kCredentialSize, value)) {
        return malformed("\"credential\" must be a byte string of 32 bytes");
      }
      message.credential = SecretBuffer::copy_of(ByteView(value, kCredentialSize));
      have_credential = true;
    } else if (name == "enroleeId") {
      if (!cursor.head(major, argument) || major != kMajorText || argument > kMaxTextLength ||
          !cursor.take(static_cast<std::size_t>(argument), value)) {
        return malformed("\"enroleeId\" must be a text string of at most 256 bytes");
      }
      message.enrolee_id.assign(reinterpret_cast<const char*>(value), static_cast<std::size_t>(argument));
      if (auto ok = crypto::validate_ae_id(message.enrolee_id); !ok) {
        return malformed("\"enroleeId\": " + ok.error().message);
      }
      have_enrolee = true;
    } else if (name == "lifetime") {
      if (!cursor.head(major, argument) || major != kMajorUnsigned || argument == 0 ||
          argument > static_cast<std::uint64_t>(INT64_MAX)) {
        return malformed("\"lifetime\" must be a positive integer (seconds)");
      }
      message.lifetime_s = static_cast<std::int64_t>(argument);
      have_lifetime = true;
    } else if (!cursor.skip_item(0)) {
      return malformed("value of unknown key is not well-formed CBOR");
    }
  }
  if (cursor.left != 0) return malformed(std::to_string(cursor.left) + " bytes after the map");
  if (!have_credential) return malformed("required key \"credential\" is missing");
  if (!have_enrolee) return malformed("required key \"enroleeId\" is missing");
  if (!have_lifetime) return malformed("required key \"lifetime\" is missing");
  return message;
}

Bytes encode(const ErrorBody& message, ContentFormat format) {
  return serialise({{"error", message.error}, {"detail", message.detail}}, format);
}

Result<ErrorBody> decode_error_body(ByteView payload, ContentFormat format) {
  constexpr std::string_view kMessage = "error body";
  auto document = parse(payload, format, kMessage);
  if (!document) return std::move(document).error();
  const Fields fields(*document, kMessage);
  auto error = fields.text("error");
  if (!error) return std::move(error).error();
  auto detail = fields.text("detail");
  if (!detail) return std::move(detail).error();
  return ErrorBody{std::move(error).value(), std::move(detail).value()};
}

Bytes encode(const CredentialFeed& message, ContentFormat format) {
  json document{{"issued", message.issued}, {"revoked", message.revoked}};
  // nlohmann's object is ordered by key: epoch, issued, revoked, since, version (the order PROTOCOL.md §4 shows).
  if (message.version) {
    document["version"] = *message.version;
    document["epoch"] = message.epoch.value_or(0);
  }
  if (message.version && message.since) document["since"] = *message.since;
  return serialise(document, format);
}

Result<CredentialFeed> decode_credential_feed(ByteView payload, ContentFormat format) {
  constexpr std::string_view kMessage = "credential feed";
  auto document = parse(payload, format, kMessage, kMaxCredentialFeedSize);
  if (!document) return std::move(document).error();
  const Fields fields(*document, kMessage);
  CredentialFeed feed;
  for (auto [key, out] : {std::pair{"issued", &feed.issued}, std::pair{"revoked", &feed.revoked}}) {
    auto ids = fields.texts(key, false, kMaxCredentialFeedEntries);
    if (!ids) return std::move(ids).error();
    for (auto& id : *ids) {
      auto parsed = crypto::parse_ke_id(id);
      if (!parsed) return fields.wrong(key, "an array of KeIDs (" + parsed.error().message + ")");
      out->push_back(parsed->text());
    }
  }
  if (fields.raw("version") != nullptr) {
    auto version = fields.integer("version");
    if (!version) return std::move(version).error();
    feed.version = *version;
  }
  if (fields.raw("since") != nullptr) {
    if (!feed.version) return make_error(Errc::parse, std::string(kMessage) + ": \"since\" without \"version\"");
    auto since = fields.integer("since");
    if (!since) return std::move(since).error();
    if (*since > *feed.version) {
      return make_error(Errc::parse, std::string(kMessage) + ": \"since\" " + std::to_string(*since) +
                                         " is above \"version\" " + std::to_string(*feed.version));
    }
    feed.since = *since;
  }
  if ((fields.raw("epoch") != nullptr) != feed.version.has_value()) {
    return make_error(Errc::parse, std::string(kMessage) + ": \"epoch\" and \"version\" go together");
  }
  if (feed.version) {
    auto epoch = fields.integer("epoch");
    if (!epoch) return std::move(epoch).error();
    feed.epoch = *epoch;
  }
  return feed;
}

Bytes encode(const RevocationList& message, ContentFormat format) {
  json document{{"version", message.version}, {"serials", message.serials}, {"keIds", message.ke_ids}};
  if (!message.issuer.empty()) document["issuer"] = message.issuer;
  return serialise(document, format);
}

Result<RevocationList> decode_revocation_list(ByteView payload, ContentFormat format) {
  constexpr std::string_view kMessage = "revocation list";
  auto document = parse(payload, format, kMessage, kMaxRevocationListSize);
  if (!document) return std::move(document).error();
  const Fields fields(*document, kMessage);
  RevocationList list;
  auto version = fields.integer("version");
  if (!version) return std::move(version).error();
  list.version = *version;
  if (fields.raw("issuer") != nullptr) {
    auto issuer = fields.text("issuer");
    if (!issuer) return std::move(issuer).error();
    list.issuer = std::move(*issuer);
  }
  auto serials = fields.texts("serials", true, kMaxRevocationListEntries);
  if (!serials) return std::move(serials).error();
  for (auto& serial : *serials) {
    auto canonical = crypto::canonical_serial(serial);
    if (!canonical) return fields.wrong("serials", "an array of certificate serials (" + canonical.error().message + ")");
    list.serials.push_back(std::move(*canonical));
  }
  auto ke_ids = fields.texts("keIds", true, kMaxRevocationListEntries);
  if (!ke_ids) return std::move(ke_ids).error();
  for (const auto& id : *ke_ids) {
    auto parsed = crypto::parse_ke_id(id);
    if (!parsed) return fields.wrong("keIds", "an array of KeIDs (" + parsed.error().message + ")");
    list.ke_ids.push_back(parsed->text());
  }
  return list;
}

Result<FetchCredentialsPath> parse_fetch_credentials_path(const std::vector<std::string>& segments) {
  if (segments.size() != 3 || segments[0] != "fetchCredentials") {
    return make_error(Errc::not_found, "path must be /fetchCredentials/<KeID>/<SUID> (" +
                                           std::to_string(segments.size()) + " segments given)");
  }
  auto ke_id = crypto::parse_ke_id(segments[1]);
  if (!ke_id) return std::move(ke_id).error();
  auto suid = crypto::parse_suid(segments[2]);
  if (!suid) return std::move(suid).error();
  return FetchCredentialsPath{std::move(ke_id).value(), *suid};
}

std::vector<std::string> fetch_credentials_path(const crypto::KeId& ke_id, crypto::Suid suid) {
  return {"fetchCredentials", ke_id.text(), std::to_string(static_cast<int>(suid))};
}

}  // namespace dauth::rspf

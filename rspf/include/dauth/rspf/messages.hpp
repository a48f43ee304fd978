// The RSPF messages dauth puts in CoAP payloads (docs/PROTOCOL.md §3–5): CBOR (Content-Format 60) by default,
// JSON (50) accepted. TS-0003 §8.3.2.1 fixes the parameters but not their encoding; the key names are dauth's.
//
// Decoders are strict on types and required keys and ignore unknown keys (forward compatibility); every error
// names the message, the key and what was expected. Before any decoder reads a CBOR payload, one check refuses
// what two readers could read differently: invalid UTF-8 in a text string, a map key that is not a text string or
// that repeats (JSON: repeated keys too; nlohmann's lexer refuses invalid UTF-8). The one message that carries a
// key (the fetchCredentials answer) is encoded straight into SecretBuffer and decoded without leaving the key in
// ordinary heap memory.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::rspf {

enum class ContentFormat : std::uint16_t { json = 50, cbor = 60 };
// Errc::unsupported for anything but 50 and 60 (the caller answers 4.15).
Result<ContentFormat> content_format_from(unsigned value);

inline constexpr std::size_t kMaxPayloadSize = 4096;  // docs/PROTOCOL.md §2: larger requests are refused with 4.13

// POST /mef/enrolment — TS-0003 §8.3.2.1 step 1: the three indications.
struct EnrolmentRequest {
  bool cert_enrolment = false;
  bool maf_enrolment = false;
  bool remote_mgmt = false;
};

struct Instruction {
  std::string type;  // "certEnrolment"
  std::string uri;   // "/.well-known/est"
};

// 2.04 answer to the enrolment request.
struct EnrolmentResponse {
  std::string ke_id;
  std::string enrolee_id;
  std::vector<std::string> targets;
  std::int64_t expiry = 0;  // unix seconds
  std::vector<Instruction> instructions;
};

// 2.05 answer to GET /fetchCredentials/<KeID>/<SUID>. CBOR only (a request for JSON gets 4.06): a JSON text
// parser would leave copies of the key's text in its token buffers.
struct FetchCredentialsResponse {
  SecretBuffer credential;  // 32 bytes
  std::string enrolee_id;
  std::int64_t lifetime_s = 0;
};

// Body of every 4.xx/5.xx answer: { "error": <code word>, "detail": <text> }.
struct ErrorBody {
  std::string error;
  std::string detail;
};

// 2.05 answer and notification body of the observed GET /fetchCredentials feed (PROTOCOL.md §4–5).
// Unversioned (no query; what targets of earlier releases ask for): the whole current state, every time. Versioned
// (query "delta" or "full"): `version` is the MEF's feed version the body brings the observer to; without `since`
// the body is the whole state at that version, with `since` only what changed after version `since` (issued:
// newly issued, revoked: newly revoked), valid only for an observer that already holds version `since` or later.
struct CredentialFeed {
  std::vector<std::string> issued;   // valid, unexpired KeIDs whose enrolee names the observer as a target
  std::vector<std::string> revoked;  // revoked, unexpired KeIDs naming the observer: it must drop them
  std::optional<std::int64_t> version = std::nullopt;
  std::optional<std::int64_t> since = std::nullopt;  // only with version, and never above it
  // Which run of the MEF the versions count in (drawn at its start; versions restart at 0 with a new one): a delta
  // follows on from a state only within one epoch. Present exactly when version is.
  std::optional<std::int64_t> epoch = std::nullopt;
};
// The Uri-Query words of the versioned feed: the subscription ("delta": the whole state first, then only changes)
// and the recovery read after a gap ("full": always the whole state).
inline constexpr std::string_view kFeedQueryDelta = "delta";
inline constexpr std::string_view kFeedQueryFull = "full";
// Caps of the feed (it grows with the deployment, like the revocation list): per array, and the encoded size.
inline constexpr std::size_t kMaxCredentialFeedEntries = 1024;
inline constexpr std::size_t kMaxCredentialFeedSize = 131072;

// 2.05 answer to GET /mef/revoked (PROTOCOL.md §5): every unexpired certificate serial (crypto::canonical_serial form)
// and KeID this MEF revoked. version counts the revocations it ever made, expired ones included; revocations are
// never undone, so it only grows and an observer applies a list only when its version is above the last one applied.
struct RevocationList {
  std::int64_t version = 0;
  std::vector<std::string> serials;
  std::vector<std::string> ke_ids;
  std::string issuer;  // subject DN of the CA whose serials these are; "" = not named (an MEF of an earlier release)
};
// The list is the one answer that grows with the deployment: its own size cap, and one on its entries.
inline constexpr std::size_t kMaxRevocationListSize = 65536;
inline constexpr std::size_t kMaxRevocationListEntries = 1024;  // per array

Bytes encode(const EnrolmentRequest& message, ContentFormat format);
Bytes encode(const EnrolmentResponse& message, ContentFormat format);
SecretBuffer encode(const FetchCredentialsResponse& message);
Bytes encode(const ErrorBody& message, ContentFormat format);
Bytes encode(const CredentialFeed& message, ContentFormat format);
Bytes encode(const RevocationList& message, ContentFormat format);

Result<EnrolmentRequest> decode_enrolment_request(ByteView payload, ContentFormat format);
Result<EnrolmentResponse> decode_enrolment_response(ByteView payload, ContentFormat format);
Result<FetchCredentialsResponse> decode_fetch_credentials_response(ByteView payload);
Result<ErrorBody> decode_error_body(ByteView payload, ContentFormat format);
Result<CredentialFeed> decode_credential_feed(ByteView payload, ContentFormat format);
// Errors also for a serial that is not 2-40 hex digits or a keIds entry that is not a KeID.
Result<RevocationList> decode_revocation_list(ByteView payload, ContentFormat format);

// The path of a target's key retrieval: fetchCredentials/<KeID>/<SUID> (segments as CoAP Uri-Path gives them).
struct FetchCredentialsPath {
  crypto::KeId ke_id;
  crypto::Suid suid;
};
Result<FetchCredentialsPath> parse_fetch_credentials_path(const std::vector<std::string>& segments);
std::vector<std::string> fetch_credentials_path(const crypto::KeId& ke_id, crypto::Suid suid);

}  // namespace dauth::rspf

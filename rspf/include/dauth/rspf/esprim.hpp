// ESPrim: oneM2M End-to-End Security of Primitives (TS-0003 §8.4, §10.3.8), the byte forms of PROTOCOL.md §7.
//
// A request of an AE on gateway A to an AE on gateway B travels as a JWE (alg dir, enc A256GCM) that no hop between
// the two dauthds can read or alter. The key is sessionESPrimKey, made from the pairwise key (the usage-constrained
// key with SUID 23) and two rand objects: the receiver's (handed out by B, sit 3/4) and the originator's (sent
// in-band in the first messages, `oro`). dauth adds a message counter (`seq`) and a replay window per
// (kid, ori, rri), since the standard has no per-message replay protection.
//
// This module holds no sockets: the daemon moves the outer CoAP messages and finds the pairwise keys. Not
// thread-safe (the daemon's loop thread only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <variant>
#include <vector>

#include "dauth/error.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/secret.hpp"

namespace dauth::rspf::esprim {

inline constexpr int kKeyGenHmacSha256 = 1;   // esprimKeyGenAlgID 1, the only one TS-0003 defines
inline constexpr int kProtocolJweA256Gcm = 12;  // esprimProtocolAndAlgID 12: the only one dauth offers
inline constexpr std::string_view kSessionKeyLabel = "oneM2M HMAC-SHA256 sessionESPrimKey derivation algorithm";
inline constexpr std::string_view kRequestMediaType = "application/vnd.onem2m-preq+json";
inline constexpr std::string_view kResponseMediaType = "application/vnd.onem2m-prsp+json";
// 64: one machine word of "seen" bits, and RFC 8613 §7.4's default; far more than an originator has in flight
// (NSTART, at most 32 per session), so reordering on the way never refuses a fresh object.
inline constexpr std::size_t kReplayWindowSize = 64;
inline constexpr std::uint64_t kMaxSeq = (std::uint64_t{1} << 53) - 1;  // exact in every JSON number reader

// oneM2M-RSC values of ESPrim refusals (TS-0004 Table 6.6.3.3-1) and dauth's replay refusal (PROTOCOL.md §7).
enum class Rsc : std::uint32_t {
  replayed = 4103,
  unsupported_option = 4111,
  unknown_key_id = 4112,
  unknown_originator_rand_id = 4113,
  unknown_receiver_rand_id = 4114,
  bad_mac = 4115,
  impersonation = 4116,
  decryption_error = 5210,
  encryption_error = 5211,
};

// Why an object was refused: the RSC for the answer and a reason for the log (never a key, never plaintext).
struct Refusal {
  Rsc rsc;
  std::string reason;
  int coap_code() const;  // 403 for 41xx and replayed, 500 for 52xx
};
// A value or a Refusal.
template <class T>
using Checked = std::variant<T, Refusal>;

// receiverESPrimRandObject / originatorESPrimRandObject.
struct RandObject {
  std::string id;                  // esri: 16 random bytes in base64url
  Bytes value;                     // esrv: 16 random bytes
  std::int64_t expiry = 0;         // esrx: Unix seconds (carried as a oneM2M timestamp, whole seconds, UTC)
  std::vector<int> key_gen_algs;   // eska
  std::vector<int> protocol_algs;  // espa
};
// A fresh object expiring at `expiry` offering key generation 1 and protocol 12.
RandObject make_rand_object(std::int64_t expiry);
// The canonical JSON text (PROTOCOL.md §7): the bytes fed to the session-key derivation and carried in oro/rro.
std::string canonical_text(const RandObject& object);
// From its JSON text (as canonical_text writes it; member order and spacing free). Errc::parse with the reason.
Result<RandObject> parse_rand_object(std::string_view json_text);

// HMAC-SHA-256(pairwise, canonical(receiver) || canonical(originator) || kSessionKeyLabel).
SecretBuffer derive_session_key(const SecretBuffer& pairwise, const RandObject& receiver,
                                const RandObject& originator);

// A sliding window of kReplayWindowSize message counters (RFC 8613 §7.4 model).
class ReplayWindow {
 public:
  // Whether seq is fresh: above every seq seen, or inside the window and not seen yet. Does not record it.
  bool is_fresh(std::uint64_t seq) const;
  // Records a fresh seq (call after the object verified). Recording a seq that is not fresh is a no-op.
  void record(std::uint64_t seq);
  std::optional<std::uint64_t> highest() const { return highest_; }

 private:
  std::optional<std::uint64_t> highest_;
  std::uint64_t seen_ = 0;  // bit i: highest - i was seen
};

// ---- inner primitives ------------------------------------------------------------------------------------------

struct InnerRequest {
  int operation = 2;                  // op: 1 POST, 2 GET, 3 PUT, 4 DELETE
  std::string to;                     // receiver AE-ID
  std::string from;                   // originator AE-ID (checked against the key's AE-ID: 4116)
  std::string request_id;             // rqi
  std::vector<std::string> path;      // Uri-Path at the receiving AE
  std::vector<std::string> query;     // Uri-Query items
  std::optional<std::uint16_t> content_format;
  std::optional<std::uint16_t> accept;
  Bytes content;                      // pc
};
struct InnerResponse {
  std::uint32_t rsc = 2000;
  int coap_code = 205;
  std::string request_id;
  std::optional<std::uint16_t> content_format;
  Bytes content;
};
std::string to_json_text(const InnerRequest& request);
std::string to_json_text(const InnerResponse& response);
Result<InnerRequest> parse_inner_request(std::string_view json_text);
Result<InnerResponse> parse_inner_response(std::string_view json_text);
// 2000 for 2.xx, 4000 for 4.xx, 5000 for 5.xx.
std::uint32_t rsc_for_coap_code(int coap_code);

// ---- outer bodies (what every hop sees) -------------------------------------------------------------------------

inline constexpr std::string_view kOuterPath = "esprim";  // Uri-Path; Uri-Query "to=<receiver AE-ID>"
inline constexpr std::uint16_t kOuterContentFormat = 50;  // application/json

struct SecurityInfo {
  int type = 5;                          // sit: 3 rand object request, 4 rand object answer, 5 ESPrim object
  std::optional<RandObject> receiver_rand;  // rro (sit 4)
  std::string object;                     // epo (sit 5): the compact JWE
};
std::string to_json_text(const SecurityInfo& info);  // {"m2m:seci": {...}}
Result<SecurityInfo> parse_security_info(std::string_view json_text);
// The plain refusal body {"rsc": <code>, "dbg": <reason>} and its reading on the originator side.
std::string refusal_body(const Refusal& refusal);
std::optional<Refusal> parse_refusal_body(std::string_view json_text);

// ---- the receiver (gateway B) ----------------------------------------------------------------------------------

struct ReceiverConfig {
  std::int64_t rand_lifetime_s = 3600;  // of each receiver rand object
  std::size_t max_live_rand_objects = 4;
  std::size_t max_sessions_per_rand = 4096;  // originator sessions (kid, ori) per receiver object
  UnixClock clock = system_unix_clock();
};

// What the header of a received object says, before any key is needed.
struct ReceivedHeader {
  std::string kid;
  std::string ori;
  std::string rri;
  std::uint64_t seq = 0;
  std::optional<RandObject> originator_rand;  // oro
  std::string media_type;                     // cty
};
struct Inspected {
  ReceivedHeader header;
  std::shared_ptr<const void> object;  // the parsed JWE, opaque to callers
};

// A verified request: what to deliver, and what protect_response needs.
struct OpenedRequest {
  InnerRequest request;
  std::string kid;
  std::string ori;
  std::string rri;
  std::uint64_t seq = 0;
  std::shared_ptr<const SecretBuffer> session_key;
};

class Receiver {
 public:
  explicit Receiver(ReceiverConfig config = {});

  // The object to hand out for a sit 3 request (rotating it as PROTOCOL.md §7 says).
  const RandObject& current_rand_object();

  // Step 1, no key needed: the compact JWE's structure and protected header (4111 for anything unsupported or
  // malformed).
  Checked<Inspected> inspect(std::string_view compact) const;

  // Step 1b, still without a key: the refusals open() would give for an rri that is not live (4114) or an ori
  // with neither session nor oro (4113), so that such objects cost no key retrieval from the MEF. open() checks
  // them again (the state may change while the key is fetched).
  std::optional<Refusal> check_before_key(const Inspected& inspected, std::string_view receiver_ae_id);

  // Step 2, with the pairwise key the caller found for header.kid and the receiver AE (none: 4112) and the AE-ID
  // that key is bound to: rri known (4114), session or oro (4113), tag (4115), cty is a request, seq fresh (replay),
  // inner primitive parses (5210), inner fr == bound_ae_id (4116), inner to == receiver_ae_id (4116). Only a
  // verified object creates a session or moves its window.
  Checked<OpenedRequest> open(const Inspected& inspected, const SecretBuffer* pairwise_key,
                              std::string_view bound_ae_id, std::string_view receiver_ae_id);

  // The protected answer to an opened request (same key, cty response, seq of the request, no oro). 5211 on failure.
  Checked<std::string> protect_response(const OpenedRequest& opened, const InnerResponse& response) const;

  struct Stats {
    std::size_t live_rand_objects = 0;
    std::size_t sessions = 0;
    std::uint64_t rand_objects_made = 0;
  };
  Stats stats() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

// ---- the originator (gateway A) --------------------------------------------------------------------------------

struct OriginatorConfig {
  // Ask for a new receiver object when fewer seconds than this remain, or fewer than a quarter of the time the
  // object had left when it came, if that is less.
  std::int64_t refresh_margin_s = 60;
  UnixClock clock = system_unix_clock();
};

// A request made ready to send, and what open_response needs to check its answer.
struct ProtectedRequest {
  std::string compact;  // epo
  std::string kid;
  std::string receiver_ae_id;
  std::string rri;
  std::string ori;
  std::uint64_t seq = 0;
  std::string request_id;
  std::shared_ptr<const SecretBuffer> session_key;
  bool carried_oro = false;  // its header had oro: a true 4113 never answers it (a hop forged that one)
};

class Originator {
 public:
  explicit Originator(OriginatorConfig config = {});

  // Whether a receiver rand object must be asked for (sit 3) before protect() for (kid, receiver).
  bool needs_receiver_rand(std::string_view kid, std::string_view receiver_ae_id) const;
  // Stores a sit 4 answer. Errc::unsupported when it offers neither key generation 1 nor protocol 12 (the
  // receiver cannot do what dauth does), Errc::expired when it has expired, Errc::parse when malformed.
  Result<void> set_receiver_rand(std::string_view kid, std::string_view receiver_ae_id, RandObject receiver);

  // Protects request (to/from/rqi as given) under the session for (kid, receiver): makes the originator object on
  // first use, adds oro until an answer was opened, numbers it with the next seq. Errc::not_found without a
  // receiver object, Errc::crypto on an encryption failure.
  Result<ProtectedRequest> protect(std::string_view kid, const SecretBuffer& pairwise_key, InnerRequest request);

  // Opens the protected answer to `sent`: cty response, same kid/ori/rri/seq, rqi matches; Errc::crypto when the tag
  // fails, Errc::parse when malformed. The first good answer stops oro.
  Result<InnerResponse> open_response(const ProtectedRequest& sent, std::string_view compact);

  // After a plain refusal of `sent`: 4113 → send oro again; 4114 → forget the receiver object (ask again).
  void on_refusal(const ProtectedRequest& sent, Rsc rsc);

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace dauth::rspf::esprim

// The MEF role: enrolment (PROTOCOL.md §3.2–3.4), key retrieval (§4), EST-coaps certificate enrolment (§3.6, RFC 9148)
// and revocation (§5). Every answer is decided from the authenticated session identity, never from the payload.
#include "dauth/rspf/mef.hpp"

#include <algorithm>
#include <array>
#include <deque>
#include <map>
#include <set>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/mef_policy.hpp"
#include "dauth/rspf/messages.hpp"

namespace dauth::rspf {

namespace {

using transport::Request;
using transport::Responder;
using transport::Response;
using transport::Session;

// One enrolment exchange, as an explicit state machine (docs/conventions.md §14): every transition is logged with the
// peer.
enum class ExchangeState : std::uint8_t { received, authenticated, key_derived, decided, stored, answered, refused };
// A switch without default: -Wswitch (an error here) names any state left without a name.
constexpr std::string_view to_string(ExchangeState state) noexcept {
  switch (state) {
    case ExchangeState::received: return "received";
    case ExchangeState::authenticated: return "authenticated";
    case ExchangeState::key_derived: return "key-derived";
    case ExchangeState::decided: return "decided";
    case ExchangeState::stored: return "stored";
    case ExchangeState::answered: return "answered";
    case ExchangeState::refused: return "refused";
  }
  return "?";
}

class EnrolmentExchange {
 public:
  EnrolmentExchange(const LogSink& log, std::string peer, std::string subject)
      : log_(log), peer_(std::move(peer)), subject_(std::move(subject)) {}
  void set_state(ExchangeState next, const std::string& reason) {
    // A refusal is a failed enrolment; "stored" is the enrolment itself, kept for accountability.
    const LogKind kind = next == ExchangeState::refused ? LogKind::refused
                         : next == ExchangeState::stored ? LogKind::audit
                                                         : LogKind::progress;
    log_(kind, subject_, "mef enrolment peer=" + peer_ + " " + std::string(to_string(state_)) + " -> " +
                             std::string(to_string(next)) + ": " + reason);
    state_ = next;
  }

 private:
  const LogSink& log_;
  std::string peer_;
  std::string subject_;
  ExchangeState state_ = ExchangeState::received;
};

// The enrolee table key of a PSK identity: a KpmID in its canonical form, so that an Enrolee writing its MEF's FQDN
// in another case finds its row (PROTOCOL.md §1); any other identity as it is (it finds no row).
std::string enrolee_credential_id(std::string_view psk_identity) {
  auto kpm_id = crypto::canonical_kpm_id(psk_identity);
  return kpm_id ? std::move(*kpm_id) : std::string(psk_identity);
}

// The key under which the enrolee table knows the session's credential (keystore.hpp, EnroleeRecord).
std::string enrolee_credential_id(const transport::PeerIdentity& peer) {
  switch (peer.kind) {
    case transport::PeerKind::psk: return enrolee_credential_id(peer.value);
    case transport::PeerKind::x509: return "cert:" + peer.value;
    case transport::PeerKind::rpk: return "rpk:" + peer.value;
    case transport::PeerKind::local: return {};
  }
  return {};
}

std::string describe(const Session& session) {
  return session.remote_address() + " " + std::string(transport::to_string(session.peer().kind)) + ":" +
         session.peer().value;
}

// Whom a log line about a session is about (the rate limit's subject): its authenticated identity, which a flood
// from changing source ports keeps.
std::string subject_of(const Session& session) {
  return session.peer().value.empty() ? session.remote_address() : session.peer().value;
}

// The body format of a request: Content-Format if given (50 or 60), CBOR otherwise (PROTOCOL.md §2).
Result<ContentFormat> request_format(const Request& request) {
  if (!request.content_format) return ContentFormat::cbor;
  return content_format_from(*request.content_format);
}

// The versioned credential feed (PROTOCOL.md §4): the last kFeedLogSize changes are kept, so that an observer
// answered within that many changes gets only what changed since; one that lags further gets the whole state. A
// delta never names more KeIDs than the log holds, so it stays within the feed's cap per array.
constexpr std::size_t kFeedLogSize = 1024;
static_assert(kFeedLogSize <= kMaxCredentialFeedEntries, "a delta must fit the feed's cap per array");
// Versioned observers remembered (what each was last answered); the least recently answered is forgotten beyond
// this and gets the whole state at its next answer.
constexpr std::size_t kMaxFeedObservers = 8192;

Response binary_response(int code, std::uint16_t content_format, Bytes payload) {
  Response response;
  response.code = code;
  response.content_format = content_format;
  response.payload = std::move(payload);
  return response;
}

}  // namespace

struct Mef::Impl {
  transport::Node& node;
  crypto::KeyStore& store;
  MefConfig config;
  // KeID -> repeated enrolment requests of its session that arrived while its record was being made durable; each
  // is answered with the outcome of the first (on_enrolment).
  std::map<std::string, std::vector<std::pair<std::shared_ptr<Responder>, Response>>> awaiting_durable;

  // The versioned feed's state (PROTOCOL.md §4, kFeedLogSize): one change per enrolment naming targets and per
  // KeID revocation, numbered by feed_version; the targets and the revocation are read from the KeID's record when
  // a delta is built. In memory only: after a restart every observer subscribes again and gets the whole state.
  struct FeedChange {
    std::int64_t version;
    std::string ke_id;
  };
  std::deque<FeedChange> feed_log;  // consecutive versions, the newest last
  std::int64_t feed_version = 0;
  // This run's feed epoch: versions restart at 0 with every start, so a target holding version 4 of the last run
  // must not take "changes since 1" of this one as following on (it would miss what changed in between, a
  // revocation included). Random, so that no two runs share one; positive, to fit the feed's integers.
  const std::int64_t feed_epoch = [] {
    std::uint64_t drawn = 0;
    random_bytes(reinterpret_cast<std::uint8_t*>(&drawn), sizeof drawn);
    return static_cast<std::int64_t>(drawn >> 1);
  }();
  // (authenticated identity, oneM2M-FR) -> the version it was last answered, and when (feed_uses tick).
  struct FeedObserver {
    std::int64_t version;
    std::uint64_t last_use;
  };
  std::map<std::string, FeedObserver> feed_observers;
  std::map<std::uint64_t, std::string> feed_observers_by_use;  // least recently answered first
  std::uint64_t feed_uses = 0;

  Impl(transport::Node& n, crypto::KeyStore& s, MefConfig c) : node(n), store(s), config(std::move(c)) {}

  std::int64_t now() const { return config.clock(); }

  std::map<std::string, EnroleeActivity> activity;  // Mef::activity()
  EnroleeActivity& seen(const std::string& enrolee_id) {
    auto& entry = activity[enrolee_id];
    entry.last_seen_at = now();
    return entry;
  }
  void note_failure(const std::string& enrolee_id, const std::string& reason) {
    if (enrolee_id.empty()) return;
    auto& entry = seen(enrolee_id);
    entry.last_failure_at = entry.last_seen_at;
    entry.last_failure = reason;
    ++entry.failures;
  }
  // The enrolee (AE-ID of a row of the table) a session authenticated as: its credential's row (KpmID, certificate,
  // raw public key), or the enrolment its KeID names; "" for anyone else, so that strangers leave no activity.
  std::string enrolee_of(const Session& session) const {
    if (const auto* row = store.find<crypto::EnroleeRecord>(enrolee_credential_id(session.peer()))) {
      return row->enrolee_id;
    }
    if (session.peer().kind != transport::PeerKind::psk || !crypto::parse_ke_id(session.peer().value).ok()) return {};
    const auto* enrolment = store.find<crypto::EnrolmentKeyRecord>(crypto::parse_ke_id(session.peer().value)->text());
    return enrolment ? enrolment->enrolee_id : std::string();
  }

  // A refusal: logged once here, answered with ErrorBody and the mapped code.
  void refuse(Responder& responder, const Session& session, std::string_view route, const Error& error,
              std::optional<int> code = std::nullopt) {
    config.log(LogKind::refused, subject_of(session),
               "mef " + std::string(route) + " peer=" + describe(session) + " refused: " + error.to_string());
    note_failure(enrolee_of(session), std::string(route) + " refused: " + error.message);
    responder.respond(code ? refusal_response(*code, error) : refusal_response(error));
  }

  // The valid (not revoked, not expired) enrolment key named by a KeID session identity.
  Result<const crypto::EnrolmentKeyRecord*> valid_enrolment_key(std::string_view ke_id_text) const {
    auto ke_id = crypto::parse_ke_id(ke_id_text);
    if (!ke_id.ok()) return std::move(ke_id).error();
    const auto* record = store.find<crypto::EnrolmentKeyRecord>(ke_id->text());
    if (record == nullptr) return make_error(Errc::not_found, "KeID " + ke_id->text() + " is not known to this MEF");
    if (record->revoked_at != 0) return make_error(Errc::denied, "KeID " + record->ke_id + " is revoked");
    if (record->expires_at <= now()) return make_error(Errc::expired, "KeID " + record->ke_id + " has expired");
    return record;
  }

  // The grant names the enrolee (peer) and no local AE: the MEF's own resources serve every enrolee alike.
  Result<transport::PskGrant> lookup_psk(std::string_view identity) const {
    if (auto ke_id = crypto::parse_ke_id(identity); ke_id.ok()) {
      auto record = valid_enrolment_key(identity);
      if (!record.ok()) return std::move(record).error();
      // PROTOCOL.md §3.5
      return transport::PskGrant{crypto::derive_reauthentication_key((*record)->ke), (*record)->enrolee_id, {}};
    }
    const auto* enrolee = store.find<crypto::EnroleeRecord>(enrolee_credential_id(identity));
    if (enrolee == nullptr || enrolee->kpm.empty()) {
      return make_error(Errc::not_found, "PSK identity " + crypto::quote_for_error(identity) +
                                             " is neither an enrolee's KpmID nor a KeID of this MEF");
    }
    return transport::PskGrant{enrolee->kpm.clone(), enrolee->enrolee_id, {}};
  }

  // ---- POST /mef/enrolment (PROTOCOL.md §3.3–3.4) ----
  void on_enrolment(const Session& session, const Request& request, Responder responder) {
    EnrolmentExchange exchange(config.log, describe(session), subject_of(session));
    auto fail = [&](const Error& error, std::optional<int> code = std::nullopt) {
      exchange.set_state(ExchangeState::refused, error.to_string());
      note_failure(enrolee_of(session), "enrolment refused: " + error.message);
      responder.respond(code ? refusal_response(*code, error) : refusal_response(error));
    };
    const auto* enrolee = store.find<crypto::EnroleeRecord>(enrolee_credential_id(session.peer()));
    if (enrolee == nullptr) {
      return fail(make_error(Errc::denied, "unknown enrolee: credential '" + session.peer().value +
                                               "' is not in this MEF's enrolee table"));
    }
    exchange.set_state(ExchangeState::authenticated, "enrolee " + enrolee->enrolee_id);
    auto format = request_format(request);
    if (!format.ok()) return fail(format.error(), 415);
    auto message = decode_enrolment_request(ByteView(request.payload), *format);
    if (!message.ok()) return fail(message.error());
    // TS-0003 §10.3.1: Ke and KeID from this session's exporter; the Enrolee derives the same on its side.
    auto key = crypto::derive_enrolment_key(session, config.fqdn);
    if (!key.ok()) return fail(key.error());
    exchange.set_state(ExchangeState::key_derived, "KeID " + key->ke_id.text());
    const std::int64_t at = now();
    if (const auto* stored = store.find<crypto::EnrolmentKeyRecord>(key->ke_id.text()); stored != nullptr) {
      // Same session, same exporter, same KeID: the Enrolee asks again because our answer did not reach it (lost,
      // or its retransmission crossed our separate response). It gets the enrolment we stored, decided then, and
      // nothing new is stored: an enrolment is never one its Enrolee cannot learn of (PROTOCOL.md §3.4).
      if (stored->enrolee_id != enrolee->enrolee_id || stored->revoked_at != 0 || stored->expires_at <= at) {
        return fail(make_error(Errc::exists, "this DTLS session already enrolled as KeID " + stored->ke_id +
                                                 ", which is no longer valid (revoked or expired); enrol over a "
                                                 "new session"));
      }
      EnrolmentResponse again{stored->ke_id, stored->enrolee_id, stored->targets, stored->expires_at, {}};
      // The instruction (EST next) follows from the enrolee row and the request, as for the first answer.
      if (auto decided = decide_enrolment(*enrolee, *message, key->ke_id, at); decided.ok()) {
        again.instructions = std::move(decided->instructions);
      }
      Response answer = binary_response(204, static_cast<std::uint16_t>(*format), encode(again, *format));
      if (auto waiting = awaiting_durable.find(stored->ke_id); waiting != awaiting_durable.end()) {
        exchange.set_state(ExchangeState::stored, "repeated request: KeID " + stored->ke_id +
                                                      " is being stored, answered once it is durable");
        waiting->second.emplace_back(std::make_shared<Responder>(std::move(responder)), std::move(answer));
        return;
      }
      responder.respond(std::move(answer));
      exchange.set_state(ExchangeState::answered, "2.04 again: KeID " + stored->ke_id + " was stored before");
      return;
    }
    auto decision = decide_enrolment(*enrolee, *message, key->ke_id, at);
    if (!decision.ok()) return fail(decision.error());
    exchange.set_state(ExchangeState::decided, "expiry " + std::to_string(decision->expiry));
    crypto::EnrolmentKeyRecord record;
    record.ke_id = key->ke_id.text();
    record.ke = std::move(key->ke);
    record.enrolee_id = enrolee->enrolee_id;
    record.targets = enrolee->targets;
    record.expires_at = decision->expiry;
    // Durable before the answer (PROTOCOL.md §3.4): an Enrolee never holds a KeID its MEF could forget. Group
    // commit: enrolments arriving while a flush runs share the next one, and the loop goes on meanwhile.
    // A separate CON response, retransmitted until the Enrolee acknowledges it; the Enrolee closes the session
    // once it has the answer (PROTOCOL.md §3.4). Closing it here would lose the answer with one lost datagram.
    Response answer = binary_response(204, static_cast<std::uint16_t>(*format), encode(*decision, *format));
    auto pending = std::make_shared<Responder>(std::move(responder));
    std::string stored_what = "KeID " + decision->ke_id + " for " + decision->enrolee_id;
    const bool announce = !enrolee->targets.empty();
    const std::string ke_id_text = decision->ke_id;
    awaiting_durable[ke_id_text];  // repeated requests on this session wait here for the same outcome
    auto on_durable = [this, exchange, pending, answer = std::move(answer), stored_what = std::move(stored_what),
                       announce, ke_id_text, enrolee_id = decision->enrolee_id](Result<void> stored) mutable {
      std::vector<std::pair<std::shared_ptr<Responder>, Response>> repeated;
      if (auto waiting = awaiting_durable.find(ke_id_text); waiting != awaiting_durable.end()) {
        repeated = std::move(waiting->second);
        awaiting_durable.erase(waiting);
      }
      if (!stored.ok()) {
        exchange.set_state(ExchangeState::refused, stored.error().to_string());
        note_failure(enrolee_id, "enrolment not stored: " + stored.error().message);
        pending->respond(refusal_response(500, stored.error()));
        for (auto& [waiter, again] : repeated) waiter->respond(refusal_response(500, stored.error()));
        return;
      }
      for (auto& [waiter, again] : repeated) waiter->respond(std::move(again));
      exchange.set_state(ExchangeState::stored, stored_what);
      // Durable now: the targets observing the feed may learn the KeID ahead of the enrolee's first handshake.
      if (announce) announce_feed_change(ke_id_text);
      pending->respond(std::move(answer));
      exchange.set_state(ExchangeState::answered, "2.04");
      auto& entry = seen(enrolee_id);
      entry.last_enrolled_at = entry.last_seen_at;
      entry.last_ke_id = ke_id_text;
      ++entry.enrolments;
    };
    if (auto queued = store.put_when_durable(std::move(record), std::move(on_durable)); !queued.ok()) {
      awaiting_durable.erase(ke_id_text);
      exchange.set_state(ExchangeState::refused, queued.error().to_string());
      note_failure(decision->enrolee_id, "enrolment not stored: " + queued.error().message);
      pending->respond(refusal_response(500, queued.error()));
    }
  }

  // The AE-ID a key-retrieval or EST session authenticated: KeID/Ker -> its enrolee, certificate -> its AE-ID.
  Result<std::string> authenticated_ae_id(const Session& session) const {
    const auto& peer = session.peer();
    if (peer.kind == transport::PeerKind::x509) return peer.value;
    if (peer.kind == transport::PeerKind::psk && crypto::parse_ke_id(peer.value).ok()) {
      auto record = valid_enrolment_key(peer.value);
      if (!record.ok()) return std::move(record).error();
      return (*record)->enrolee_id;
    }
    return make_error(Errc::unauthenticated, "session authenticated as " + std::string(transport::to_string(peer.kind)) +
                                                 " '" + peer.value +
                                                 "': key retrieval needs an enrolled identity (KeID with Ker, or an "
                                                 "AE-ID certificate)");
  }

  // ---- GET /fetchCredentials, observable (PROTOCOL.md §4–5) ----
  // Per subscriber: libcoap calls this once per observer with its own session and stored request, so each observer
  // gets its own body. Its stored request never changes, so what it was last answered is remembered here
  // (feed_observers), keyed by its authenticated identity and oneM2M-FR.
  void on_credential_feed(const Session& session, const Request& request, Responder responder) {
    constexpr std::string_view route = "fetchCredentials feed";
    auto requester = authenticated_ae_id(session);
    if (!requester.ok()) return refuse(responder, session, route, requester.error(), 403);
    if (request.originator != *requester) {
      return refuse(responder, session, route,
                    make_error(Errc::unauthenticated, "oneM2M-FR '" + request.originator +
                                                          "' differs from the authenticated identity '" + *requester +
                                                          "'"));
    }
    ContentFormat format = ContentFormat::cbor;
    if (request.accept) {
      auto accepted = content_format_from(*request.accept);
      if (!accepted.ok()) return refuse(responder, session, route, accepted.error(), 406);
      format = *accepted;
    }
    const bool versioned = !request.query.empty();
    const bool delta_wanted = request.query.size() == 1 && request.query.front() == kFeedQueryDelta;
    if (versioned && !delta_wanted && !(request.query.size() == 1 && request.query.front() == kFeedQueryFull)) {
      std::string given;
      for (const auto& word : request.query) given += (given.empty() ? "" : "&") + word;
      return refuse(responder, session, route,
                    make_error(Errc::invalid_argument, "query " + crypto::quote_for_error(given) +
                                                           ": the feed takes \"delta\" or \"full\", or none"),
                    400);
    }
    const std::string observer = std::string(transport::to_string(session.peer().kind)) + ":" +
                                 session.peer().value + "|" + *requester;
    if (delta_wanted) {
      // Only what changed since its last answer, if the log still holds all of it. Whether the requester is still
      // some enrolee's target is checked with the whole state only: a delta names only KeIDs naming it anyway.
      const auto known = feed_observers.find(observer);
      if (known != feed_observers.end() && known->second.version >= feed_log_floor()) {
        CredentialFeed delta = feed_changes_for(*requester, known->second.version);
        note_feed_answer(observer, feed_version);
        responder.respond(binary_response(205, static_cast<std::uint16_t>(format), encode(delta, format)));
        return;
      }
    }
    bool is_target = false;
    store.for_each(crypto::RecordKind::enrolee, [&](const crypto::Record& r) {
      const auto& row = std::get<crypto::EnroleeRecord>(r);
      if (std::find(row.targets.begin(), row.targets.end(), *requester) != row.targets.end()) is_target = true;
    });
    if (!is_target) {
      return refuse(responder, session, route,
                    make_error(Errc::denied, "'" + *requester + "' is no enrolee's Enrolment Target at this MEF"));
    }
    CredentialFeed feed = credential_feed_for(*requester);
    if (versioned) {
      feed.version = feed_version;
      feed.epoch = feed_epoch;
      note_feed_answer(observer, feed_version);
    }
    responder.respond(binary_response(205, static_cast<std::uint16_t>(format), encode(feed, format)));
  }

  // The whole feed state for one target: KeIDs naming it, unexpired, split by revocation; each array capped.
  CredentialFeed credential_feed_for(const std::string& target) const {
    CredentialFeed feed;
    const std::int64_t at = now();
    std::size_t left_out = 0;
    store.for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& r) {
      const auto& key = std::get<crypto::EnrolmentKeyRecord>(r);
      if (key.expires_at <= at || std::find(key.targets.begin(), key.targets.end(), target) == key.targets.end()) {
        return;
      }
      auto& list = key.revoked_at != 0 ? feed.revoked : feed.issued;
      if (list.size() < kMaxCredentialFeedEntries) {
        list.push_back(key.ke_id);
      } else {
        ++left_out;  // the target still fetches those on first use (PROTOCOL.md §4)
      }
    });
    if (left_out > 0) {
      config.log(LogKind::progress, target, "mef fetchCredentials feed for " + target + ": " + std::to_string(left_out) + " KeIDs left out (at most " +
                 std::to_string(kMaxCredentialFeedEntries) + " per list)");
    }
    return feed;
  }

  // The oldest version a delta can start from: every change after it is still in the log.
  std::int64_t feed_log_floor() const { return feed_log.empty() ? feed_version : feed_log.front().version - 1; }

  // What changed for one target after version `since` (>= feed_log_floor()): each KeID once, by its record's state
  // now (issued then revoked within the window: revoked only); expired or forgotten KeIDs left out.
  CredentialFeed feed_changes_for(const std::string& target, std::int64_t since) const {
    CredentialFeed delta;
    delta.version = feed_version;
    delta.since = since;
    delta.epoch = feed_epoch;
    const std::int64_t at = now();
    std::set<std::string_view> named;
    const auto first = feed_log.begin() + static_cast<std::ptrdiff_t>(since - feed_log_floor());
    for (auto change = first; change != feed_log.end(); ++change) {
      const auto* key = store.find<crypto::EnrolmentKeyRecord>(change->ke_id);
      if (key == nullptr || key->expires_at <= at ||
          std::find(key->targets.begin(), key->targets.end(), target) == key->targets.end()) {
        continue;
      }
      if (!named.insert(change->ke_id).second) continue;
      (key->revoked_at != 0 ? delta.revoked : delta.issued).push_back(key->ke_id);
    }
    return delta;
  }

  void note_feed_answer(const std::string& observer, std::int64_t version) {
    auto [it, added] = feed_observers.try_emplace(observer, FeedObserver{version, 0});
    if (!added) feed_observers_by_use.erase(it->second.last_use);
    it->second = FeedObserver{version, ++feed_uses};
    feed_observers_by_use.emplace(feed_uses, observer);
    if (feed_observers.size() > kMaxFeedObservers) {
      feed_observers.erase(feed_observers_by_use.begin()->second);
      feed_observers_by_use.erase(feed_observers_by_use.begin());
    }
  }

  // A new or revoked KeID naming targets: one more feed version, then the observers are notified.
  void announce_feed_change(const std::string& ke_id) {
    feed_log.push_back(FeedChange{++feed_version, ke_id});
    if (feed_log.size() > kFeedLogSize) feed_log.pop_front();
    node.notify_observers({"fetchCredentials"});
  }

  // ---- GET /fetchCredentials/<KeID>/<SUID> (PROTOCOL.md §4) ----
  void on_fetch_credentials(const Session& session, const Request& request, Responder responder) {
    constexpr std::string_view route = "fetchCredentials";
    auto requester = authenticated_ae_id(session);
    if (!requester.ok()) return refuse(responder, session, route, requester.error(), 403);
    auto path = parse_fetch_credentials_path(request.path);
    if (!path.ok()) return refuse(responder, session, route, path.error());
    // The answer carries a key: CBOR only (messages.hpp), so an Accept asking for anything else gets 4.06.
    if (request.accept && *request.accept != static_cast<std::uint16_t>(ContentFormat::cbor)) {
      return refuse(responder, session, route,
                    make_error(Errc::unsupported, "Accept " + std::to_string(*request.accept) +
                                                      ": key retrieval answers only CBOR (60)"),
                    406);
    }
    const std::string ke_id = path->ke_id.text();
    const auto* record = store.find<crypto::EnrolmentKeyRecord>(ke_id);
    if (record == nullptr) {
      return refuse(responder, session, route, make_error(Errc::not_found, "KeID " + ke_id + " is not known"));
    }
    const std::int64_t at = now();
    if (auto allowed = authorize_fetch(*record, *requester, request.originator, path->suid, at); !allowed.ok()) {
      return refuse(responder, session, route, allowed.error());
    }
    auto key = crypto::derive_usage_constrained_key(record->ke, path->suid, *requester);
    if (!key.ok()) return refuse(responder, session, route, key.error());
    FetchCredentialsResponse answer{std::move(*key), record->enrolee_id,
                                    std::min(config.session_key_lifetime_s, record->expires_at - at)};
    config.log(LogKind::progress, subject_of(session), "mef fetchCredentials peer=" + describe(session) + " KeID " + ke_id + " -> SUID " + std::to_string(static_cast<int>(path->suid)) + " key for " + *requester +
               " (fingerprint " + answer.credential.fingerprint() + ", lifetime " +
               std::to_string(answer.lifetime_s) + " s)");
    Response response;
    response.code = 205;
    response.content_format = static_cast<std::uint16_t>(ContentFormat::cbor);
    // The key stays in guarded memory up to libcoap's PDU.
    response.secret_payload = std::make_shared<const SecretBuffer>(encode(answer));
    responder.respond(std::move(response));
  }

  // The enrolee a certificate request comes from, with the expiry its certificate may not outlive. The bootstrap
  // session must have enrolled first: its exporter names the KeID it got (derived again here, deterministic).
  struct EstRequester {
    const crypto::EnroleeRecord* enrolee = nullptr;
    std::int64_t enrolment_expiry = 0;
  };
  Result<EstRequester> est_requester(const Session& session) const {
    const auto& peer = session.peer();
    const crypto::EnrolmentKeyRecord* key = nullptr;
    const crypto::EnroleeRecord* enrolee = nullptr;
    if (peer.kind == transport::PeerKind::psk && crypto::parse_ke_id(peer.value).ok()) {
      auto record = valid_enrolment_key(peer.value);
      if (!record.ok()) return std::move(record).error();
      key = *record;
      store.for_each(crypto::RecordKind::enrolee, [&](const crypto::Record& r) {
        const auto& row = std::get<crypto::EnroleeRecord>(r);
        if (enrolee == nullptr && row.enrolee_id == key->enrolee_id) enrolee = &row;
      });
    } else {
      enrolee = store.find<crypto::EnroleeRecord>(enrolee_credential_id(peer));
      if (enrolee != nullptr) {
        auto derived = crypto::derive_enrolment_key(session, config.fqdn);
        if (!derived.ok()) return std::move(derived).error();
        auto record = valid_enrolment_key(derived->ke_id.text());
        if (!record.ok()) {
          return make_error(Errc::denied, "certificate enrolment on a bootstrap session needs a valid enrolment on "
                                          "that same session first (POST /mef/enrolment): " +
                                              record.error().message);
        }
        key = *record;
      }
    }
    if (enrolee == nullptr) {
      return make_error(Errc::denied, "unknown enrolee: credential '" + peer.value + "' is not in the enrolee table");
    }
    if (!enrolee->certificate_enrolment) {
      return make_error(Errc::denied, "enrolee '" + enrolee->enrolee_id + "' is not offered certificate enrolment");
    }
    return EstRequester{enrolee, key->expires_at};
  }

  Result<Bytes> unique_serial() const {
    for (int attempt = 0; attempt < 8; ++attempt) {
      Bytes serial(kCertificateSerialSize);
      random_bytes(serial.data(), serial.size());
      // Positive and of full length (RFC 5280 §4.1.2.2): top bit clear, second-highest set.
      serial[0] = static_cast<std::uint8_t>((serial[0] & 0x7f) | 0x40);
      if (store.find<crypto::IssuanceRecord>(to_hex(ByteView(serial), true)) == nullptr) return serial;
    }
    return make_error(Errc::internal, "no unused certificate serial after 8 random draws");
  }

  // ---- POST /.well-known/est/sen (RFC 9148 §5, PROTOCOL.md §3.6) ----
  void on_simple_enrol(const Session& session, const Request& request, Responder responder) {
    constexpr std::string_view route = "est/sen";
    if (!content_format_is_pkcs10(session, request, responder, route)) return;
    auto requester = est_requester(session);
    if (!requester.ok()) return refuse(responder, session, route, requester.error());
    issue_certificate(session, request, responder, route, requester->enrolee->enrolee_id,
                      requester->enrolment_expiry);
  }

  // Checks the CSR (signature, exactly the AE-ID `ae_id`) and answers the certificate, recorded before the answer.
  // Validity: min(MEF policy, `expiry_limit`), so a certificate never outlives the enrolment behind it.
  void issue_certificate(const Session& session, const Request& request, Responder& responder,
                         std::string_view route, const std::string& ae_id, std::int64_t expiry_limit) {
    auto csr = crypto::CertificateRequest::parse(ByteView(request.payload));
    if (!csr.ok()) return refuse(responder, session, route, csr.error(), 400);
    if (auto signature = csr->verify_signature(); !signature.ok()) {
      return refuse(responder, session, route,
                    make_error(Errc::crypto, "CSR self-signature does not verify: " + signature.error().message), 400);
    }
    const auto uris = csr->requested_san_uris();
    if (uris.size() != 1 || uris.front() != ae_id) {
      std::string asked;
      for (const auto& uri : uris) asked += (asked.empty() ? "'" : ", '") + uri + "'";
      return refuse(responder, session, route,
                    make_error(Errc::denied, "CSR requests subjectAltName URI " + (asked.empty() ? "(none)" : asked) +
                                                 "; enrolee may hold exactly its own AE-ID '" + ae_id + "'"));
    }
    auto serial = unique_serial();
    if (!serial.ok()) return refuse(responder, session, route, serial.error());
    const std::int64_t at = now();
    crypto::IssueParams params;
    params.serial = *serial;
    params.not_before = static_cast<std::time_t>(at);
    params.not_after = static_cast<std::time_t>(std::min(at + config.max_certificate_validity_s, expiry_limit));
    auto certificate = config.ca->issue(*csr, ae_id, params);
    if (!certificate.ok()) return refuse(responder, session, route, certificate.error(), 500);
    crypto::IssuanceRecord issued;
    issued.serial_hex = certificate->serial_hex();
    issued.ae_id = ae_id;
    issued.issued_at = at;
    issued.expires_at = static_cast<std::int64_t>(params.not_after);
    const std::string serial_hex = issued.serial_hex;
    // Recorded before the answer: every certificate in the field can be found and revoked (PROTOCOL.md §5).
    if (auto stored = store.put(std::move(issued)); !stored.ok()) {
      return refuse(responder, session, route, stored.error(), 500);
    }
    config.log(LogKind::audit, ae_id, "mef audit: " + std::string(route) + " peer=" + describe(session) + " issued certificate serial " +
               serial_hex + " to " + ae_id + " until " + std::to_string(params.not_after));
    responder.respond(binary_response(204, kContentFormatPkixCert, certificate->der()));
  }

  bool content_format_is_pkcs10(const Session& session, const Request& request, Responder& responder,
                               std::string_view route) {
    if (request.content_format == kContentFormatPkcs10) return true;
    refuse(responder, session, route,
           make_error(Errc::unsupported, "Content-Format " +
                                             (request.content_format ? std::to_string(*request.content_format)
                                                                     : std::string("(none)")) +
                                             ": EST takes application/pkcs10 (286)"),
           415);
    return false;
  }

  // ---- POST /.well-known/est/sren (RFC 9148 §5, RFC 7030 §4.2.2; PROTOCOL.md §3.6) ----
  // Re-enrolment under the certificate this DTLS session presented: its serial (PeerIdentity::certificate_serial)
  // must name an issuance of this MEF to the session's AE-ID that is neither revoked nor expired; a device
  // certificate or another CA's certificate does not qualify (use /sen after an enrolment). The CSR may name only
  // that AE-ID, and the new certificate is bounded by the AE's latest valid enrolment, like /sen. The presented
  // certificate is not superseded: it stays valid until it expires or is revoked (docs/PROTOCOL.md §3.6).
  void on_simple_reenrol(const Session& session, const Request& request, Responder responder) {
    constexpr std::string_view route = "est/sren";
    if (!content_format_is_pkcs10(session, request, responder, route)) return;
    const auto& peer = session.peer();
    if (peer.kind != transport::PeerKind::x509) {
      return refuse(responder, session, route,
                    make_error(Errc::unauthenticated, "re-enrolment needs a session authenticated by the current "
                                                      "AE-ID certificate; this one is " +
                                                          std::string(transport::to_string(peer.kind)) + " '" +
                                                          peer.value + "' (use /sen after an enrolment)"),
                    403);
    }
    const std::string& ae_id = peer.value;
    const crypto::EnroleeRecord* enrolee = nullptr;
    store.for_each(crypto::RecordKind::enrolee, [&](const crypto::Record& r) {
      const auto& row = std::get<crypto::EnroleeRecord>(r);
      if (enrolee == nullptr && row.enrolee_id == ae_id) enrolee = &row;
    });
    if (enrolee == nullptr || !enrolee->certificate_enrolment) {
      return refuse(responder, session, route,
                    make_error(Errc::denied, "'" + ae_id + "' is " +
                                                 (enrolee == nullptr ? "not in the enrolee table"
                                                                     : "not offered certificate enrolment")));
    }
    const std::int64_t at = now();
    const std::string& serial = peer.certificate_serial;
    const auto* presented = serial.empty() ? nullptr : store.find<crypto::IssuanceRecord>(serial);
    std::string why_not;
    if (presented == nullptr) {
      why_not = "the certificate this session presented (serial " + (serial.empty() ? std::string("none") : serial) +
                ") was not issued by this MEF (use /sen after an enrolment)";
    } else if (presented->ae_id != ae_id) {
      why_not = "certificate serial " + serial + " was issued to '" + presented->ae_id + "'";
    } else if (presented->revoked_at != 0) {
      why_not = "certificate serial " + serial + " is revoked";
    } else if (presented->expires_at <= at) {
      why_not = "certificate serial " + serial + " has expired";
    }
    if (!why_not.empty()) {
      return refuse(responder, session, route,
                    make_error(Errc::denied, "re-enrolment of '" + ae_id + "' refused: " + why_not));
    }
    std::int64_t enrolment_expiry = 0;
    store.for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& r) {
      const auto& key = std::get<crypto::EnrolmentKeyRecord>(r);
      if (key.enrolee_id == ae_id && key.revoked_at == 0 && key.expires_at > at) {
        enrolment_expiry = std::max(enrolment_expiry, key.expires_at);
      }
    });
    if (enrolment_expiry == 0) {
      return refuse(responder, session, route,
                    make_error(Errc::denied, "re-enrolment of '" + ae_id +
                                                 "' needs a valid enrolment (a certificate never outlives it); run "
                                                 "POST /mef/enrolment first"));
    }
    issue_certificate(session, request, responder, route, ae_id, enrolment_expiry);
  }

  // ---- GET /mef/revoked, observable (PROTOCOL.md §5) ----
  // Any authenticated session may read and observe it (peers apply it in their handshake check: RevocationWatch).
  // The arrays list the unexpired revoked entries (an expired certificate fails the chain check anyway, and the
  // list stays within the 1024 entries a reader accepts); the version counts every revocation ever recorded, so
  // it only grows. Beyond 1024 unexpired entries per array the MEF answers 5.00, which ends the peers'
  // subscriptions: they keep their last list and retry (fail closed, never a truncated list).
  void on_revocation_list(const Session& session, const Request& request, Responder responder) {
    constexpr std::string_view route = "mef/revoked";
    ContentFormat format = ContentFormat::cbor;
    if (request.accept) {
      auto accepted = content_format_from(*request.accept);
      if (!accepted.ok()) return refuse(responder, session, route, accepted.error(), 406);
      format = *accepted;
    }
    RevocationList list;
    // The serials are this CA's (peers key revocations by issuer and serial); an MEF without one issues none.
    if (config.ca) list.issuer = config.ca->certificate().subject();
    const std::int64_t at = now();
    std::int64_t revocations = 0;
    store.for_each(crypto::RecordKind::issuance, [&](const crypto::Record& r) {
      const auto& issued = std::get<crypto::IssuanceRecord>(r);
      if (issued.revoked_at == 0) return;
      ++revocations;
      if (issued.expires_at > at) list.serials.push_back(issued.serial_hex);
    });
    store.for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& r) {
      const auto& key = std::get<crypto::EnrolmentKeyRecord>(r);
      if (key.revoked_at == 0) return;
      ++revocations;
      if (key.expires_at > at) list.ke_ids.push_back(key.ke_id);
    });
    if (list.serials.size() > kMaxRevocationListEntries || list.ke_ids.size() > kMaxRevocationListEntries) {
      return refuse(responder, session, route,
                    make_error(Errc::limit, std::to_string(list.serials.size()) + " revoked certificates and " +
                                                std::to_string(list.ke_ids.size()) +
                                                " revoked KeIDs are unexpired: more than the " +
                                                std::to_string(kMaxRevocationListEntries) +
                                                " per array a revocation list may carry"),
                    500);
    }
    list.version = revocations;
    responder.respond(binary_response(205, static_cast<std::uint16_t>(format), encode(list, format)));
  }

  void announce_revocation() { node.notify_observers({"mef", "revoked"}); }

  // ---- GET /.well-known/est/crts (RFC 9148 §5) ----
  void on_ca_certificates(const Session& /*session*/, const Request& /*request*/, Responder responder) {
    responder.respond(binary_response(205, kContentFormatPkixCert, config.ca->certificate().der()));
  }
};

Mef::Mef(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Mef::~Mef() {
  // Enrolments waiting for their flush are answered now, while this MEF and its Node still exist.
  impl_->store.finish_queued_writes();
  impl_->node.remove_watch(impl_->store.durable_fd());
}

Result<std::unique_ptr<Mef>> Mef::create(transport::Node& node, crypto::KeyStore& store, MefConfig config) {
  if (auto valid = crypto::validate_fqdn(config.fqdn); !valid.ok()) return std::move(valid).error();
  config.fqdn = crypto::canonical_fqdn(config.fqdn);
  if (config.max_certificate_validity_s <= 0) {
    return make_error(Errc::invalid_argument, "MEF max certificate validity " +
                                                  std::to_string(config.max_certificate_validity_s) +
                                                  " s: must be > 0");
  }
  if (config.session_key_lifetime_s <= 0) {
    return make_error(Errc::invalid_argument, "MEF session key lifetime " +
                                                  std::to_string(config.session_key_lifetime_s) + " s: must be > 0");
  }
  if (!config.clock) config.clock = system_unix_clock();
  if (!config.log) config.log = stderr_log_sink();
  // Enrolment answers wait for their key-store flush (group commit): this loop delivers them.
  if (auto watched = node.add_watch(store.durable_fd(), [&store] { store.deliver_durable(); }); !watched.ok()) {
    return std::move(watched).error();
  }
  std::unique_ptr<Mef> mef(new Mef(std::make_unique<Impl>(node, store, std::move(config))));
  Impl* impl = mef->impl_.get();
  using transport::Access;
  using transport::Method;
  node.add_route(Method::post, {"mef", "enrolment"}, Access::secure,
                 [impl](const Session& s, const Request& r, Responder out) { impl->on_enrolment(s, r, std::move(out)); });
  auto revoked = node.add_observable({"mef", "revoked"}, Access::secure,
                                     [impl](const Session& s, const Request& r, Responder out) {
                                       impl->on_revocation_list(s, r, std::move(out));
                                     });
  if (!revoked.ok()) return std::move(revoked).error();
  node.add_route(Method::get, {"fetchCredentials"}, Access::secure,
                 [impl](const Session& s, const Request& r, Responder out) {
                   impl->on_fetch_credentials(s, r, std::move(out));
                 });
  auto feed = node.add_observable({"fetchCredentials"}, Access::secure,
                                  [impl](const Session& s, const Request& r, Responder out) {
                                    impl->on_credential_feed(s, r, std::move(out));
                                  });
  if (!feed.ok()) return std::move(feed).error();
  if (impl->config.ca) {
    node.add_route(Method::post, {".well-known", "est", "sen"}, Access::secure,
                   [impl](const Session& s, const Request& r, Responder out) {
                     impl->on_simple_enrol(s, r, std::move(out));
                   });
    node.add_route(Method::post, {".well-known", "est", "sren"}, Access::secure,
                   [impl](const Session& s, const Request& r, Responder out) {
                     impl->on_simple_reenrol(s, r, std::move(out));
                   });
    node.add_route(Method::get, {".well-known", "est", "crts"}, Access::secure,
                   [impl](const Session& s, const Request& r, Responder out) {
                     impl->on_ca_certificates(s, r, std::move(out));
                   });
  }
  return mef;
}

Result<transport::PskGrant> Mef::lookup_psk(std::string_view identity) const { return impl_->lookup_psk(identity); }

transport::PskLookup Mef::psk_lookup() {
  Impl* impl = impl_.get();
  return [impl](const transport::PskRequest& request) { return impl->lookup_psk(request.identity); };
}

Result<void> Mef::revoke(std::string_view ke_id_text) {
  auto ke_id = crypto::parse_ke_id(ke_id_text);
  if (!ke_id.ok()) return std::move(ke_id).error();
  const auto* record = impl_->store.find<crypto::EnrolmentKeyRecord>(ke_id->text());
  if (record == nullptr) return make_error(Errc::not_found, "revoke: KeID " + ke_id->text() + " is not known");
  if (record->revoked_at != 0) return ok_result();
  crypto::EnrolmentKeyRecord revoked{record->ke_id, record->ke.clone(), record->enrolee_id, record->targets,
                                     record->expires_at, impl_->now()};
  const bool names_targets = !record->targets.empty();
  const std::string revoked_ke_id = record->ke_id;
  const std::string audit = "mef audit: revoked KeID " + revoked.ke_id + " of " + revoked.enrolee_id + " at " +
                            std::to_string(revoked.revoked_at);
  if (auto stored = impl_->store.put(std::move(revoked)); !stored.ok()) return stored;
  impl_->config.log(LogKind::audit, revoked_ke_id, audit);
  // The targets drop the key and its live sessions (PROTOCOL.md §5).
  if (names_targets) impl_->announce_feed_change(revoked_ke_id);
  impl_->announce_revocation();   // the list carries KeIDs too
  return ok_result();
}

Result<void> Mef::revoke_certificate(std::string_view serial_hex) {
  auto serial = crypto::canonical_serial(serial_hex);
  const auto* record = serial ? impl_->store.find<crypto::IssuanceRecord>(*serial) : nullptr;
  if (record == nullptr) {
    return make_error(Errc::not_found, "revoke: certificate serial " + crypto::quote_for_error(serial_hex) +
                                           " was not issued by this MEF");
  }
  if (record->revoked_at != 0) return ok_result();
  crypto::IssuanceRecord revoked = *record;
  revoked.revoked_at = impl_->now();
  const std::string revoked_serial = revoked.serial_hex;
  const std::string audit = "mef audit: revoked certificate serial " + revoked.serial_hex + " of " + revoked.ae_id +
                            " at " + std::to_string(revoked.revoked_at);
  if (auto stored = impl_->store.put(std::move(revoked)); !stored.ok()) return stored;
  impl_->config.log(LogKind::audit, revoked_serial, audit);
  impl_->announce_revocation();  // observing peers refuse the serial and close its live sessions (PROTOCOL.md §5)
  return ok_result();
}

const std::string& Mef::fqdn() const { return impl_->config.fqdn; }

const std::map<std::string, EnroleeActivity>& Mef::activity() const { return impl_->activity; }

void Mef::note_handshake_failure(std::string_view identity_offered, const std::string& reason) {
  Impl& s = *impl_;
  std::string enrolee_id;
  if (auto ke_id = crypto::parse_ke_id(identity_offered); ke_id.ok()) {
    if (const auto* record = s.store.find<crypto::EnrolmentKeyRecord>(ke_id->text())) enrolee_id = record->enrolee_id;
  } else if (const auto* row = s.store.find<crypto::EnroleeRecord>(enrolee_credential_id(identity_offered))) {
    enrolee_id = row->enrolee_id;
  } else if (const auto* by_certificate =
                 s.store.find<crypto::EnroleeRecord>("cert:" + std::string(identity_offered))) {
    enrolee_id = by_certificate->enrolee_id;
  }
  s.note_failure(enrolee_id, "handshake failed: " + reason);
}

}  // namespace dauth::rspf

// Target key retrieval (PROTOCOL.md §4): answer handshakes from memory, fetch unknown KeIDs from their MEF in the
// background, store what the MEF answers.
#include "dauth/rspf/target_keys.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <map>
#include <optional>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/messages.hpp"
#include "dauth/rspf/mef_subscription.hpp"

namespace dauth::rspf {

// A switch without default: -Wswitch (an error here) names any state left without a name.
std::string_view to_string(FetchState state) noexcept {
  switch (state) {
    case FetchState::queued: return "queued";
    case FetchState::fetching: return "fetching";
    case FetchState::stored: return "stored";
    case FetchState::failed: return "failed";
  }
  return "?";
}

struct TargetKeys::Impl : std::enable_shared_from_this<TargetKeys::Impl> {
  // One retrieval: a KeID for one served AE and one SUID (the key differs per target AE and SUID: PROTOCOL.md §4,
  // decimal(SUID) || B-ID). Handshakes fetch SUID 22 keys, esprim_key() SUID 23 ones.
  struct FetchKey {
    std::string ke_id;
    std::string local_ae_id;
    crypto::Suid suid = crypto::Suid::rspf_key_for_saef;
    bool operator<(const FetchKey& other) const {
      return std::tie(ke_id, local_ae_id, suid) < std::tie(other.ke_id, other.local_ae_id, other.suid);
    }
    bool for_esprim() const { return suid == crypto::Suid::rspf_key_for_esprim; }
    std::string record_id() const { return crypto::session_key_id(ke_id, local_ae_id, static_cast<int>(suid)); }
  };

  transport::Node& node;
  crypto::KeyStore& store;
  TargetKeysConfig config;
  // Served AE-ID -> the server name clients send for it (crypto::server_name_for_ae_id: a SHA-256 for some AE-IDs,
  // so computed once here, not per handshake); config.local_ae_id included.
  std::map<std::string, std::string> served;
  std::map<std::pair<std::string, std::string>, MefContact> mefs;  // (local AE, canonical_fqdn) -> contact
  std::map<FetchKey, FetchState> fetches;                         // queued | fetching (others are removed)
  std::map<FetchKey, std::vector<EsprimKeyCallback>> esprim_waiters;  // esprim_key() calls waiting for a retrieval
  bool start_posted = false;
  FetchObserver observer;

  // The MEF feed subscription of one contact (same key as `mefs`); re-subscription and backoff live in it.
  using Feed = std::unique_ptr<MefSubscription>;
  std::map<std::pair<std::string, std::string>, Feed> feeds;
  std::set<FetchKey> announced;   // issued KeIDs from a feed, waiting for a retrieval slot
  std::set<std::string> revoked;  // KeIDs a feed announced revoked: refused without a retrieval
  std::uint64_t notifications = 0;
  // The versioned feed of each contact (PROTOCOL.md §4): the MEF's feed version its state is at (none: not known,
  // e.g. an MEF of an earlier release), and the full read after a gap.
  struct FeedVersion {
    std::optional<std::int64_t> applied;
    std::optional<std::int64_t> epoch;  // the MEF run `applied` counts in
    bool full_read_running = false;
    std::optional<CredentialFeed> held;  // the newest delta that came during the full read
  };
  std::map<std::pair<std::string, std::string>, FeedVersion> feed_versions;
  TargetKeys::FeedStats feed_stats;
  // Retrievals that failed, and when the next one may start: a KeID that keeps failing (MEF unreachable or
  // refusing) is asked for with backoff (1 s doubling to 5 min, ± 10 %), not once per handshake that names it.
  // Bounded: beyond kMaxFailedRemembered the entry due soonest is forgotten.
  struct FailedFetch {
    Backoff backoff;
    std::chrono::steady_clock::time_point not_before;
    std::string reason;
    Errc code = Errc::io;  // the failure's, for esprim_key() answers while the backoff lasts
  };
  static constexpr std::size_t kMaxFailedRemembered = 4096;
  std::map<FetchKey, FailedFetch> failed;

  Impl(transport::Node& n, crypto::KeyStore& s, TargetKeysConfig c) : node(n), store(s), config(std::move(c)) {
    served.emplace(config.local_ae_id, crypto::server_name_for_ae_id(config.local_ae_id));
  }

  std::int64_t now() const { return config.clock(); }

  // One retrieval's state machine (docs/conventions.md §14): queued -> fetching -> stored | failed.
  void set_state(const FetchKey& key, const std::string& mef, FetchState next, const std::string& reason) {
    auto it = fetches.find(key);
    const std::string old = it == fetches.end() ? "none" : std::string(to_string(it->second));
    config.log(next == FetchState::failed ? LogKind::failed : LogKind::progress, key.ke_id,
               "target " + key.local_ae_id + (key.for_esprim() ? " ESPrim (SUID 23)" : "") + " key retrieval KeID " +
                   key.ke_id + " mef=" + mef + " " + old +
               " -> " + std::string(to_string(next)) + ": " + reason);
    if (next == FetchState::failed) remember_failure(key, reason);
    if (next == FetchState::stored) failed.erase(key);
    if (next == FetchState::stored || next == FetchState::failed) {
      if (it != fetches.end()) fetches.erase(it);
      if (!announced.empty()) post_start();  // a slot is free for the next announced KeID
    } else {
      fetches[key] = next;
    }
  }

  void remember_failure(const FetchKey& key, const std::string& reason) {
    auto found = failed.find(key);
    if (found == failed.end()) {
      if (failed.size() >= kMaxFailedRemembered) {
        failed.erase(std::min_element(failed.begin(), failed.end(), [](const auto& a, const auto& b) {
          return a.second.not_before < b.second.not_before;
        }));
      }
      found = failed.emplace(key, FailedFetch{Backoff(config.jitter), {}, {}, Errc::io}).first;
    }
    found->second.not_before = std::chrono::steady_clock::now() + found->second.backoff.next();
    found->second.reason = reason;
  }

  // Why a retrieval of key may not start now (its last one failed and the backoff has not passed), if so.
  std::optional<std::string> held_back(const FetchKey& key) const {
    const auto found = failed.find(key);
    if (found == failed.end()) return std::nullopt;
    const auto now = std::chrono::steady_clock::now();
    if (now >= found->second.not_before) return std::nullopt;
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(found->second.not_before - now);
    return "its key retrieval failed (" + found->second.reason + "); next try in " + std::to_string(wait.count()) +
           " ms";
  }

  void tell(const std::string& ke_id, const Result<void>& outcome) {
    if (observer) observer(ke_id, outcome);
  }

  // The served AE a handshake targets, from its SNI (see the header for the rule).
  Result<std::string> target_of(std::string_view sni) const {
    if (sni.empty()) return config.local_ae_id;
    for (const auto& [ae, server_name] : served) {  // compared byte-exact
      if (server_name == sni) return ae;
    }
    if (served.size() == 1) return config.local_ae_id;  // e.g. our FQDN as SNI: unambiguous with one AE
    std::string names;
    for (const auto& [ae, server_name] : served) names += (names.empty() ? "" : ", ") + ae;
    return make_error(Errc::denied, "SNI " + crypto::quote_for_error(sni) +
                                        " names none of the local AEs this gateway serves as Enrolment Target (" +
                                        names + ")");
  }

  Result<transport::PskGrant> lookup_psk(std::string_view identity, std::string_view sni) {
    auto ke_id = crypto::parse_ke_id(identity);
    if (!ke_id.ok()) {
      return make_error(Errc::not_found, "PSK identity " + crypto::quote_for_error(identity) + " is not a KeID");
    }
    if (revoked.count(ke_id->text()) != 0) {
      return make_error(Errc::denied, "KeID " + ke_id->text() + " was revoked by its MEF (feed)");
    }
    auto target = target_of(sni);
    if (!target.ok()) {
      config.log(LogKind::refused, ke_id->text(), "target refused KeID " + ke_id->text() + ": " + target.error().message);
      return std::move(target).error();
    }
    const FetchKey key{ke_id->text(), *target};
    const auto* record = store.find<crypto::SessionKeyRecord>(key.record_id());
    if (record != nullptr && record->expires_at > now()) {
      return transport::PskGrant{record->key.clone(), record->peer_ae_id, key.local_ae_id};
    }
    if (fetches.count(key) != 0) {
      return make_error(Errc::not_found, "KeID " + key.ke_id + " for " + key.local_ae_id +
                                             ": key retrieval from its MEF is running, retry shortly");
    }
    const auto mef = mefs.find({key.local_ae_id, ke_id->mef_fqdn});
    if (mef == mefs.end()) {
      Error refusal = make_error(Errc::denied, "KeID " + key.ke_id + " names MEF '" + ke_id->mef_fqdn +
                                                   "', which is not configured for " + key.local_ae_id);
      config.log(LogKind::refused, key.ke_id, "target " + key.local_ae_id + " refused: " + refusal.message);
      tell(key.ke_id, refusal);
      return refusal;
    }
    if (auto wait = held_back(key)) {
      return make_error(Errc::not_found, "KeID " + key.ke_id + " for " + key.local_ae_id + ": " + *wait);
    }
    if (fetches.size() >= config.max_fetches_in_flight) {
      return make_error(Errc::limit, "KeID " + key.ke_id + ": " + std::to_string(fetches.size()) +
                                         " key retrievals are already pending (limit " +
                                         std::to_string(config.max_fetches_in_flight) + ")");
    }
    set_state(key, ke_id->mef_fqdn, FetchState::queued,
              record != nullptr ? "stored key expired" : "unknown KeID in a handshake");
    post_start();
    return make_error(Errc::not_found, "KeID " + key.ke_id + " for " + key.local_ae_id + ": unknown here, key " +
                                           "retrieval from " + ke_id->mef_fqdn + " started, retry shortly");
  }

  // We are inside libcoap's DTLS callback: the fetch starts from the loop (Node::post), once per round.
  void post_start() {
    if (start_posted) return;
    start_posted = true;
    std::weak_ptr<Impl> weak = weak_from_this();
    node.post([weak] {
      if (auto self = weak.lock()) self->start_pending_fetches();
    });
  }

  void start_pending_fetches() {
    start_posted = false;
    queue_announced();
    std::vector<FetchKey> queued;
    for (const auto& [key, state] : fetches) {
      if (state == FetchState::queued) queued.push_back(key);
    }
    for (const auto& key : queued) start_fetch(key);
  }

  bool holds_valid_key(const FetchKey& key) const {
    const auto* record = store.find<crypto::SessionKeyRecord>(key.record_id());
    return record != nullptr && record->expires_at > now();
  }

  // ---- the ESPrim key (SUID 23, PROTOCOL.md §7): the same retrieval, asked for by esprim_key() ----

  // The stored valid SUID 23 key of key, if there is one (and its KeID is not revoked).
  std::optional<Result<EsprimKey>> stored_esprim_key(const FetchKey& key) const {
    if (revoked.count(key.ke_id) != 0) {
      return Result<EsprimKey>(make_error(Errc::denied, "KeID " + key.ke_id + " was revoked by its MEF (feed)"));
    }
    const auto* record = store.find<crypto::SessionKeyRecord>(key.record_id());
    if (record == nullptr || record->expires_at <= now()) return std::nullopt;
    return Result<EsprimKey>(EsprimKey{std::make_shared<const SecretBuffer>(record->key.clone()), record->peer_ae_id});
  }

  void esprim_key(std::string_view identity, std::string_view local_ae_id, EsprimKeyCallback done) {
    auto ke_id = crypto::parse_ke_id(identity);
    if (!ke_id.ok()) {
      return done(make_error(Errc::not_found, "ESPrim key id " + crypto::quote_for_error(identity) + " is not a KeID"));
    }
    const FetchKey key{ke_id->text(), local_ae_id.empty() ? config.local_ae_id : std::string(local_ae_id),
                       crypto::Suid::rspf_key_for_esprim};
    if (auto answer = stored_esprim_key(key)) return done(std::move(*answer));
    if (fetches.count(key) != 0) {
      esprim_waiters[key].push_back(std::move(done));  // one retrieval per key at a time: wait for the running one
      return;
    }
    if (mefs.count({key.local_ae_id, ke_id->mef_fqdn}) == 0) {
      Error refusal = make_error(Errc::denied, "KeID " + key.ke_id + " names MEF '" + ke_id->mef_fqdn +
                                                   "', which is not configured for " + key.local_ae_id);
      config.log(LogKind::refused, key.ke_id, "target " + key.local_ae_id + " refused ESPrim key: " + refusal.message);
      tell(key.ke_id, refusal);
      return done(std::move(refusal));
    }
    if (auto wait = held_back(key)) {
      return done(make_error(failed.at(key).code, "KeID " + key.ke_id + " for " + key.local_ae_id + " (ESPrim key): " +
                                                      *wait));
    }
    if (fetches.size() >= config.max_fetches_in_flight) {
      return done(make_error(Errc::limit, "KeID " + key.ke_id + ": " + std::to_string(fetches.size()) +
                                              " key retrievals are already pending (limit " +
                                              std::to_string(config.max_fetches_in_flight) + ")"));
    }
    const bool expired = store.find<crypto::SessionKeyRecord>(key.record_id()) != nullptr;
    set_state(key, ke_id->mef_fqdn, FetchState::queued,
              expired ? "stored ESPrim key expired" : "unknown KeID in an ESPrim object");
    esprim_waiters[key].push_back(std::move(done));
    post_start();
  }

  // Answers the esprim_key() calls waiting for key's retrieval, which ended with outcome.
  void answer_esprim_waiters(const FetchKey& key, const Result<void>& outcome) {
    auto waiting = esprim_waiters.find(key);
    if (waiting == esprim_waiters.end()) return;
    std::vector<EsprimKeyCallback> callbacks = std::move(waiting->second);
    esprim_waiters.erase(waiting);
    Result<EsprimKey> answer = make_error(Errc::internal, "ESPrim key retrieval ended without a key");
    if (!outcome.ok()) {
      answer = outcome.error();
    } else if (auto stored = stored_esprim_key(key)) {
      answer = std::move(*stored);
    }
    // A callback may call esprim_key() again or destroy the TargetKeys: this Impl stays alive until they all ran.
    const auto keep_alive = shared_from_this();
    for (auto& callback : callbacks) callback(answer);
  }

  // Moves announced KeIDs into the retrieval queue while slots are free. Returns whether it queued any.
  bool queue_announced() {
    bool queued = false;
    for (auto it = announced.begin(); it != announced.end() && fetches.size() < config.max_fetches_in_flight;) {
      const FetchKey key = *it;
      it = announced.erase(it);
      if (fetches.count(key) != 0 || holds_valid_key(key) || revoked.count(key.ke_id) != 0 || held_back(key)) continue;
      set_state(key, crypto::parse_ke_id(key.ke_id).value().mef_fqdn, FetchState::queued,
                "announced by the MEF's feed, fetched ahead of the first handshake");
      queued = true;
    }
    return queued;
  }

  // ---- the MEF feed (observed GET /fetchCredentials) ----

  using ContactKey = std::pair<std::string, std::string>;  // (local AE, lower-case MEF FQDN)

  // The feed subscription of one contact: GET /fetchCredentials with oneM2M-FR = that served AE.
  // GET /fetchCredentials?<query> for the contact's local AE: the subscription (delta) and the full read (full).
  static transport::Request feed_request(const ContactKey& contact, std::string_view query) {
    transport::Request request;
    request.path = {"fetchCredentials"};
    request.query = {std::string(query)};
    request.accept = static_cast<std::uint16_t>(ContentFormat::cbor);
    request.originator = contact.first;
    return request;
  }

  // A feed body as the MEF sent it (notification or full read), in its Content-Format (CBOR when none is given).
  static Result<CredentialFeed> feed_body_of(const transport::Response& answer) {
    auto format = content_format_from(answer.content_format.value_or(transport::kContentFormatCbor));
    if (!format.ok()) return std::move(format).error();
    return decode_credential_feed(ByteView(answer.payload), *format);
  }

  Feed make_feed(const ContactKey& contact, MefContact mef) {
    std::weak_ptr<Impl> weak = weak_from_this();
    return std::make_unique<MefSubscription>(
        node, "target " + contact.first + " feed mef=" + contact.second, std::move(mef),
        feed_request(contact, kFeedQueryDelta),
        config.jitter, config.log, [weak, contact](const transport::Response& notification) {
          if (auto self = weak.lock()) self->on_feed(contact, notification);
        });
  }

  void on_feed(const ContactKey& contact, const transport::Response& notification) {
    auto message = feed_body_of(notification);
    if (!message.ok()) {
      config.log(LogKind::failed, contact.second, "target " + contact.first + " feed mef=" + contact.second + " unreadable notification: " +
                 message.error().to_string());
      return;
    }
    ++notifications;
    take_feed_body(contact, *message);
  }

  // PROTOCOL.md §4, "The versioned feed": a whole state is applied and sets the epoch and version (also a lower
  // version: an MEF that restarted counts from 0 again in a new epoch); a delta is applied when it follows on from
  // what we hold: same epoch, since <= applied (applying a change twice is harmless). Anything else is a gap.
  void take_feed_body(const ContactKey& contact, const CredentialFeed& body) {
    FeedVersion& at = feed_versions[contact];
    const auto follows_on = [&at](const CredentialFeed& delta) {
      return at.applied && at.epoch == delta.epoch && *delta.since <= *at.applied;
    };
    if (!body.version || !body.since) {
      at.applied = body.version;  // none: an MEF of an earlier release, the whole state every time
      at.epoch = body.epoch;
      ++feed_stats.full_states;
      apply_feed(contact, body);
      // The newest delta that came during the full read, if it goes beyond it (older ones the state includes).
      if (at.held && follows_on(*at.held) && *at.held->version > *at.applied) {
        const CredentialFeed held = std::move(*at.held);
        at.held.reset();
        at.applied = *held.version;
        ++feed_stats.deltas;
        apply_feed(contact, held);
      }
      at.held.reset();
      return;
    }
    if (follows_on(body)) {
      at.applied = std::max(*at.applied, *body.version);
      ++feed_stats.deltas;
      apply_feed(contact, body);
      return;
    }
    ++feed_stats.gaps;
    at.held = body;
    if (at.full_read_running) return;
    const std::string held_state =
        !at.applied ? std::string("no version is known")
        : at.epoch != body.epoch
            ? "the state held is of another feed epoch (the MEF restarted since)"
            : "version " + std::to_string(*at.applied) + " is applied (a notification was missed)";
    config.log(LogKind::progress, contact.second, "target " + contact.first + " feed mef=" + contact.second + ": changes since version " +
               std::to_string(*body.since) + ", but " + held_state + "; reading the whole state");
    start_full_read(contact);
  }

  // GET /fetchCredentials?full, without Observe, on the contact's session.
  void start_full_read(const ContactKey& contact) {
    const auto mef = mefs.find(contact);
    if (mef == mefs.end()) return;
    auto credentials = mef->second.credentials ? mef->second.credentials()
                                               : Result<transport::ClientCredentials>(make_error(
                                                     Errc::not_found, "no credentials for MEF '" + contact.second + "'"));
    if (!credentials.ok()) {
      config.log(LogKind::failed, contact.second, "target " + contact.first + " feed mef=" + contact.second +
                 " cannot read the whole state: " + credentials.error().message);
      return;
    }
    feed_versions[contact].full_read_running = true;
    ++feed_stats.full_reads;
    std::weak_ptr<Impl> weak = weak_from_this();
    node.request(mef->second.address, *credentials, feed_request(contact, kFeedQueryFull),
                 [weak, contact](Result<transport::Response> answer, const transport::Session*) {
                   if (auto self = weak.lock()) self->on_full_read(contact, std::move(answer));
                 });
  }

  void on_full_read(const ContactKey& contact, Result<transport::Response> answer) {
    feed_versions[contact].full_read_running = false;
    const std::string what = "target " + contact.first + " feed mef=" + contact.second + " whole-state read ";
    if (!answer.ok()) {
      config.log(LogKind::failed, contact.second, what + "failed: " + answer.error().to_string() + " (the next gap or subscription refresh retries)");
      return;
    }
    if (answer->code != 205) {
      config.log(LogKind::failed, contact.second, what + "refused: " + error_from_response("MEF " + contact.second, *answer).message);
      return;
    }
    auto message = feed_body_of(*answer);
    if (!message.ok()) {
      config.log(LogKind::failed, contact.second, what + "unreadable: " + message.error().to_string());
      return;
    }
    if (message->since) {
      config.log(LogKind::progress, contact.second, what + "answered changes since version " + std::to_string(*message->since) +
                 ", not the whole state; ignored");
      return;
    }
    take_feed_body(contact, *message);
  }

  void apply_feed(const ContactKey& contact, const CredentialFeed& feed) {
    const std::string& ae = contact.first;
    const std::string& mef_fqdn = contact.second;
    // An MEF speaks only for the KeIDs it derived (their '@' part names it).
    auto from_this_mef = [&](const std::string& id) {
      auto parsed = crypto::parse_ke_id(id);
      return parsed.ok() && parsed->mef_fqdn == mef_fqdn;  // both crypto::canonical_fqdn
    };
    for (const auto& id : feed.revoked) {
      if (!from_this_mef(id)) continue;
      const bool newly = revoked.insert(id).second;
      announced.erase({id, ae});
      bool removed = false;
      for (const auto suid : {crypto::Suid::rspf_key_for_saef, crypto::Suid::rspf_key_for_esprim}) {
        const std::string record_id = FetchKey{id, ae, suid}.record_id();
        if (store.find<crypto::SessionKeyRecord>(record_id) == nullptr) continue;
        auto gone = store.remove(crypto::RecordKind::session_key, record_id);
        if (!gone.ok()) {
          config.log(LogKind::failed, id, "target " + ae + " KeID " + id + " revoked, but its SUID " +
                     std::to_string(static_cast<int>(suid)) + " key could not be removed: " + gone.error().to_string());
        }
        removed = removed || gone.ok();
      }
      const std::size_t closed = node.close_server_sessions(transport::PeerKind::psk, id);
      if (newly || removed || closed > 0) {
        config.log(LogKind::revoked, id, "target " + ae + " KeID " + id + " revoked by MEF " + mef_fqdn + ": key " +
                   (removed ? "removed" : "not held") + ", " + std::to_string(closed) + " live session(s) closed");
      }
    }
    for (const auto& id : feed.issued) {
      if (!from_this_mef(id) || revoked.count(id) != 0) continue;
      const FetchKey key{id, ae};
      if (fetches.count(key) == 0 && !holds_valid_key(key)) announced.insert(key);
    }
    if (queue_announced()) post_start();
  }

  // The end of a retrieval that brought no key: logged, remembered for the backoff, reported to the observer and
  // to esprim_key() calls waiting for it.
  void fail_fetch(const FetchKey& key, const std::string& mef_fqdn, const Error& error) {
    set_state(key, mef_fqdn, FetchState::failed, error.to_string());
    if (auto remembered = failed.find(key); remembered != failed.end()) remembered->second.code = error.code;
    tell(key.ke_id, error);
    answer_esprim_waiters(key, error);
  }

  void start_fetch(const FetchKey& key) {
    auto ke_id = crypto::parse_ke_id(key.ke_id).value();  // parsed when it was queued
    const std::string mef_fqdn = ke_id.mef_fqdn;
    const auto mef = mefs.find({key.local_ae_id, mef_fqdn});
    auto give_up = [&](const Error& error) { fail_fetch(key, mef_fqdn, error); };
    if (mef == mefs.end()) {
      return give_up(make_error(Errc::denied, "MEF '" + mef_fqdn + "' is no longer configured for " +
                                                  key.local_ae_id));
    }
    auto credentials = mef->second.credentials ? mef->second.credentials()
                                               : Result<transport::ClientCredentials>(make_error(
                                                     Errc::not_found, "no credentials for MEF '" + mef_fqdn + "'"));
    if (!credentials.ok()) {
      return give_up(make_error(credentials.error().code,
                                "cannot authenticate to MEF '" + mef_fqdn + "': " + credentials.error().message));
    }
    transport::Request request;
    request.method = transport::Method::get;
    request.path = fetch_credentials_path(ke_id, key.suid);
    request.accept = static_cast<std::uint16_t>(ContentFormat::cbor);
    request.originator = key.local_ae_id;
    request.answer_is_secret = true;  // the answer carries the key: guarded memory from the PDU on
    set_state(key, mef_fqdn, FetchState::fetching, "GET " + request.path_text() + " as " + credentials->psk_identity);
    std::weak_ptr<Impl> weak = weak_from_this();
    node.request(mef->second.address, *credentials, std::move(request),
                 [weak, key, mef_fqdn](Result<transport::Response> answer, const transport::Session*) {
                   if (auto self = weak.lock()) self->on_answer(key, mef_fqdn, std::move(answer));
                 });
  }

  void on_answer(const FetchKey& key, const std::string& mef_fqdn, Result<transport::Response> answer) {
    auto give_up = [&](const Error& error) { fail_fetch(key, mef_fqdn, error); };
    if (!answer.ok()) return give_up(std::move(answer).error());
    if (answer->code != 205) return give_up(error_from_response("MEF " + mef_fqdn, *answer));
    if (!answer->secret_payload) return give_up(make_error(Errc::parse, "MEF " + mef_fqdn + " answered 2.05 without a body"));
    auto message = decode_fetch_credentials_response(answer->secret_payload->view());
    if (!message.ok()) return give_up(std::move(message).error());
    if (message->lifetime_s <= 0) {
      return give_up(make_error(Errc::expired, "MEF gave a lifetime of " + std::to_string(message->lifetime_s) + " s"));
    }
    crypto::SessionKeyRecord record;
    record.ke_id = key.ke_id;
    record.key = std::move(message->credential);
    record.peer_ae_id = message->enrolee_id;
    record.local_ae_id = key.local_ae_id;
    record.suid = static_cast<int>(key.suid);
    record.expires_at = now() + message->lifetime_s;
    const std::string reason = "key for peer " + record.peer_ae_id + " (fingerprint " + record.key.fingerprint() +
                               ") until " + std::to_string(record.expires_at);
    // A KeID the feed revoked while its ESPrim key was on the way: not stored, and its waiting callers get denied.
    if (key.for_esprim() && revoked.count(key.ke_id) != 0) {
      return give_up(make_error(Errc::denied, "KeID " + key.ke_id + " was revoked by its MEF (feed) during the "
                                                  "retrieval of its ESPrim key"));
    }
    if (auto stored = store.put(std::move(record)); !stored.ok()) return give_up(std::move(stored).error());
    set_state(key, mef_fqdn, FetchState::stored, reason);
    tell(key.ke_id, ok_result());
    answer_esprim_waiters(key, ok_result());
  }
};

TargetKeys::TargetKeys(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
TargetKeys::~TargetKeys() = default;

Result<std::unique_ptr<TargetKeys>> TargetKeys::create(transport::Node& node, crypto::KeyStore& store,
                                                       TargetKeysConfig config) {
  if (auto valid = crypto::validate_ae_id(config.local_ae_id); !valid.ok()) return std::move(valid).error();
  if (config.max_fetches_in_flight == 0) {
    return make_error(Errc::invalid_argument, "target keys: max_fetches_in_flight = 0: must be at least 1");
  }
  if (!config.clock) config.clock = system_unix_clock();
  if (!config.log) config.log = stderr_log_sink();
  if (!config.jitter) config.jitter = random_jitter();
  return std::unique_ptr<TargetKeys>(new TargetKeys(std::make_shared<Impl>(node, store, std::move(config))));
}

Result<void> TargetKeys::add_mef(std::string_view mef_fqdn, MefContact contact, std::string_view local_ae_id) {
  if (auto valid = crypto::validate_fqdn(mef_fqdn); !valid.ok()) return valid;
  const std::string ae = local_ae_id.empty() ? impl_->config.local_ae_id : std::string(local_ae_id);
  if (auto valid = crypto::validate_ae_id(ae); !valid.ok()) return valid;
  impl_->served.emplace(ae, crypto::server_name_for_ae_id(ae));
  const Impl::ContactKey key{ae, crypto::canonical_fqdn(mef_fqdn)};
  if (impl_->config.observe_feed) {
    // A replaced contact subscribes again with its new address/credentials (the old subscription is cancelled).
    auto& feed = impl_->feeds[key];
    feed = impl_->make_feed(key, contact);
    feed->start();
  }
  impl_->mefs[key] = std::move(contact);
  return ok_result();
}

Result<transport::PskGrant> TargetKeys::lookup_psk(const transport::PskRequest& request) {
  return impl_->lookup_psk(request.identity, request.sni);
}
Result<transport::PskGrant> TargetKeys::lookup_psk(std::string_view identity) {
  return impl_->lookup_psk(identity, {});
}

transport::PskLookup TargetKeys::psk_lookup() {
  std::weak_ptr<Impl> weak = impl_;
  return [weak](const transport::PskRequest& request) -> Result<transport::PskGrant> {
    if (auto self = weak.lock()) return self->lookup_psk(request.identity, request.sni);
    return make_error(Errc::not_found, "target key retrieval has shut down");
  };
}

void TargetKeys::esprim_key(std::string_view ke_id, std::string_view local_ae_id, EsprimKeyCallback done) {
  impl_->esprim_key(ke_id, local_ae_id, std::move(done));
}

std::size_t TargetKeys::fetches_pending() const { return impl_->fetches.size(); }
void TargetKeys::set_fetch_observer(FetchObserver observer) { impl_->observer = std::move(observer); }

std::size_t TargetKeys::feeds_live() const {
  std::size_t live = 0;
  for (const auto& [key, feed] : impl_->feeds) live += feed->live() ? 1 : 0;
  return live;
}
std::uint64_t TargetKeys::feed_notifications() const { return impl_->notifications; }
bool TargetKeys::is_revoked(std::string_view ke_id) const {
  auto parsed = crypto::parse_ke_id(ke_id);  // the set holds canonical KeID text (feed decoding)
  return parsed && impl_->revoked.count(parsed->text()) != 0;
}
TargetKeys::FeedStats TargetKeys::feed_stats() const { return impl_->feed_stats; }

}  // namespace dauth::rspf

// Certificate revocation lists observed at the MEFs and applied in the handshake (revocation_watch.hpp).
#include "dauth/rspf/revocation_watch.hpp"

#include <map>
#include <optional>
#include <set>
#include <utility>
#include <vector>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/rspf/messages.hpp"

namespace dauth::rspf {

namespace {

// An unchanged list is written again only this often: it renews received_at (the staleness bound counts from the
// stored time after a restart) without a journal entry per subscription refresh.
constexpr std::int64_t kUnchangedListStoreInterval = 3600;

}  // namespace

struct RevocationWatch::Impl : std::enable_shared_from_this<RevocationWatch::Impl> {
  // One MEF: its contacts, its subscription, and the last list applied from it (received, or loaded from the store).
  struct Mef {
    std::vector<MefContact> contacts;
    std::unique_ptr<MefSubscription> subscription;
    bool received = false;  // a list arrived since start
    bool known = false;     // a list is held: received, or loaded from the store
    std::string issuer;     // the list's issuer DN; "" = an MEF of an earlier release: applies to every issuer
    std::int64_t version = -1;
    std::int64_t confirmed_at = 0;  // unix seconds: when its MEF last sent it
    std::int64_t stored_at = 0;     // confirmed_at of the copy in the store (0: none)
    std::set<std::string> serials;  // crypto::canonical_serial form

    bool applies_to(const std::string& certificate_issuer) const {
      return issuer.empty() || issuer == certificate_issuer;
    }
  };

  transport::Node& node;
  RevocationWatchConfig config;
  std::map<std::string, Mef> mefs;  // by crypto::canonical_fqdn
  RevokedObserver observer;
  std::uint64_t applied = 0;

  Impl(transport::Node& n, RevocationWatchConfig c) : node(n), config(std::move(c)) {}

  std::int64_t now() const { return config.clock(); }

  bool is_revoked(const std::string& serial) const {
    for (const auto& [fqdn, mef] : mefs) {
      if (mef.serials.count(serial) != 0) return true;
    }
    return false;
  }

  // Why the list of `mef` cannot vouch now (unknown or stale), if so.
  std::optional<std::string> unusable(const std::string& fqdn, const Mef& mef, std::int64_t at) const {
    if (!mef.known) {
      return "the revocation list of MEF " + fqdn + " is unknown (not received yet since start, none stored)";
    }
    const std::int64_t age = at - mef.confirmed_at;
    if (age > static_cast<std::int64_t>(config.max_list_age.count())) {
      return "the revocation list of MEF " + fqdn + " is stale: last received " + std::to_string(age) +
             " s ago, more than " + std::to_string(config.max_list_age.count()) + " s";
    }
    return std::nullopt;
  }

  Result<void> check(const transport::PeerIdentity& peer) const {
    if (peer.kind != transport::PeerKind::x509) return ok_result();
    // Both sides are crypto::canonical_serial: the list by decode, the peer's by Certificate::serial_hex().
    const std::string& serial = peer.certificate_serial;
    const std::string& issuer = peer.certificate_issuer;
    for (const auto& [fqdn, mef] : mefs) {
      if (mef.known && mef.applies_to(issuer) && mef.serials.count(serial) != 0) {
        return make_error(Errc::denied, "certificate serial " + serial + " (issuer '" + issuer + "') of '" +
                                            peer.value + "' is revoked by MEF " + fqdn);
      }
    }
    const std::int64_t at = now();
    // The MEF whose list names this issuer answers for it alone: other MEFs being unreachable does not matter.
    for (const auto& [fqdn, mef] : mefs) {
      if (!mef.known || mef.issuer.empty() || mef.issuer != issuer) continue;
      if (auto why = unusable(fqdn, mef, at)) {
        return make_error(Errc::denied, *why + ": certificates of its issuer '" + issuer +
                                            "' are refused until it answers (fail closed)");
      }
      return ok_result();
    }
    // No list names this issuer: any MEF whose list is unknown or stale may be the one that issued it.
    for (const auto& [fqdn, mef] : mefs) {
      if (auto why = unusable(fqdn, mef, at)) {
        return make_error(Errc::denied, *why + ", and no list held names the issuer '" + issuer +
                                            "': certificates of that issuer are refused until it arrives "
                                            "(fail closed)");
      }
    }
    return ok_result();
  }

  // The subscription's credentials: the first contact of this MEF that can authenticate now.
  MefContact combined_contact(const std::string& fqdn) {
    std::weak_ptr<Impl> weak = weak_from_this();
    MefContact contact;
    contact.address = mefs[fqdn].contacts.front().address;
    contact.credentials = [weak, fqdn]() -> Result<transport::ClientCredentials> {
      auto self = weak.lock();
      if (!self) return make_error(Errc::not_found, "revocation watch has shut down");
      auto it = self->mefs.find(fqdn);
      std::string reasons;
      if (it != self->mefs.end()) {
        for (const auto& candidate : it->second.contacts) {
          if (!candidate.credentials) continue;
          auto credentials = candidate.credentials();
          if (credentials.ok()) return credentials;
          reasons += (reasons.empty() ? "" : "; ") + credentials.error().message;
        }
      }
      return make_error(Errc::not_found, "no local AE can authenticate to MEF " + fqdn +
                                             (reasons.empty() ? std::string() : ": " + reasons));
    };
    return contact;
  }

  // The list stored for this MEF by an earlier run, if any (config.store).
  void load_stored(const std::string& fqdn, Mef& mef) {
    if (config.store == nullptr) return;
    const auto* stored = config.store->find<crypto::RevocationListRecord>(fqdn);
    if (stored == nullptr) return;
    mef.known = true;
    mef.issuer = stored->issuer;
    mef.version = stored->version;
    mef.confirmed_at = stored->received_at;
    mef.stored_at = stored->received_at;
    mef.serials = std::set<std::string>(stored->serials.begin(), stored->serials.end());
    config.log(LogKind::progress, fqdn, "revocation watch mef=" + fqdn + " loaded stored list version " + std::to_string(mef.version) + ": " +
               std::to_string(mef.serials.size()) + " revoked certificate serial(s), received " +
               std::to_string(now() - mef.confirmed_at) + " s ago");
  }

  void store_list(const std::string& fqdn, Mef& mef) {
    if (config.store == nullptr) return;
    crypto::RevocationListRecord record;
    record.mef_fqdn = fqdn;
    record.issuer = mef.issuer;
    record.version = mef.version;
    record.serials.assign(mef.serials.begin(), mef.serials.end());
    record.received_at = mef.confirmed_at;
    if (auto stored = config.store->put(std::move(record)); stored.ok()) {
      mef.stored_at = mef.confirmed_at;
    } else {
      // Still applied in memory; after a restart the previous stored list (or none) is what we start from.
      config.log(LogKind::failed, fqdn, "revocation watch mef=" + fqdn + " list version " + std::to_string(mef.version) +
                 " applied but not stored: " + stored.error().to_string());
    }
  }

  void on_list(const std::string& fqdn, const transport::Response& notification) {
    auto it = mefs.find(fqdn);
    if (it == mefs.end()) return;
    Mef& mef = it->second;
    auto format = content_format_from(notification.content_format.value_or(transport::kContentFormatCbor));
    auto list = format.ok() ? decode_revocation_list(ByteView(notification.payload), *format)
                            : Result<RevocationList>(std::move(format).error());
    if (!list.ok()) {
      // The previous list stays in force (or, before the first one, certificates stay refused).
      config.log(LogKind::failed, fqdn, "revocation watch mef=" + fqdn + " unreadable list: " + list.error().to_string());
      return;
    }
    if (list->version < mef.version) {
      config.log(LogKind::progress, fqdn, "revocation watch mef=" + fqdn + " ignored list version " + std::to_string(list->version) +
                 " (version " + std::to_string(mef.version) + " applied)");
      return;
    }
    std::set<std::string> serials(list->serials.begin(), list->serials.end());  // decode made them canonical
    std::vector<std::string> newly;
    for (const auto& serial : serials) {
      if (mef.serials.count(serial) == 0 || mef.issuer != list->issuer) newly.push_back(serial);
    }
    const bool first = !mef.received;
    const bool changed = !mef.known || mef.version != list->version || mef.issuer != list->issuer ||
                         mef.serials != serials;
    mef.serials = std::move(serials);
    mef.issuer = list->issuer;
    mef.version = list->version;
    mef.confirmed_at = now();
    mef.received = true;
    mef.known = true;
    ++applied;
    if (changed || mef.confirmed_at - mef.stored_at >= kUnchangedListStoreInterval) store_list(fqdn, mef);
    if (first || !newly.empty()) {
      config.log(LogKind::progress, fqdn, "revocation watch mef=" + fqdn + " applied list version " + std::to_string(mef.version) + ": " +
                 std::to_string(mef.serials.size()) + " revoked certificate serial(s), " +
                 std::to_string(newly.size()) + " new" +
                 (mef.issuer.empty() ? std::string(", no issuer named (any issuer)")
                                     : ", issuer '" + mef.issuer + "'"));
    }
    for (const auto& serial : newly) {
      const std::size_t closed = node.close_sessions_with_certificate_serial(serial, mef.issuer);
      config.log(LogKind::revoked, serial, "revocation watch: certificate serial " + serial + " revoked by MEF " + fqdn + ", " +
                 std::to_string(closed) + " live session(s) closed");
      if (observer) observer(serial, fqdn);
    }
  }
};

RevocationWatch::RevocationWatch(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
RevocationWatch::~RevocationWatch() = default;

std::unique_ptr<RevocationWatch> RevocationWatch::create(transport::Node& node, RevocationWatchConfig config) {
  if (!config.log) config.log = stderr_log_sink();
  if (!config.jitter) config.jitter = random_jitter();
  if (!config.clock) config.clock = system_unix_clock();
  return std::unique_ptr<RevocationWatch>(new RevocationWatch(std::make_shared<Impl>(node, std::move(config))));
}

Result<void> RevocationWatch::add_mef(std::string_view mef_fqdn, MefContact contact) {
  if (auto valid = crypto::validate_fqdn(mef_fqdn); !valid.ok()) return valid;
  const std::string fqdn = crypto::canonical_fqdn(mef_fqdn);
  Impl::Mef& mef = impl_->mefs[fqdn];
  mef.contacts.push_back(std::move(contact));
  if (!mef.subscription) {
    impl_->load_stored(fqdn, mef);
    transport::Request request;
    request.path = {"mef", "revoked"};
    request.accept = static_cast<std::uint16_t>(ContentFormat::cbor);
    std::weak_ptr<Impl> weak = impl_;
    mef.subscription = std::make_unique<MefSubscription>(
        impl_->node, "revocation watch mef=" + fqdn, impl_->combined_contact(fqdn), std::move(request),
        impl_->config.jitter, impl_->config.log, [weak, fqdn](const transport::Response& notification) {
          if (auto self = weak.lock()) self->on_list(fqdn, notification);
        });
    mef.subscription->set_refresh_interval(impl_->config.subscription_refresh);
    mef.subscription->start();
  }
  return ok_result();
}

bool RevocationWatch::is_revoked(std::string_view serial) const {
  auto canonical = crypto::canonical_serial(serial);
  return canonical && impl_->is_revoked(*canonical);
}

bool RevocationWatch::complete() const {
  for (const auto& [fqdn, mef] : impl_->mefs) {
    if (!mef.received) return false;
  }
  return true;
}

Result<void> RevocationWatch::check(const transport::PeerIdentity& peer) const { return impl_->check(peer); }

std::function<Result<void>(const transport::PeerIdentity&)> RevocationWatch::peer_check() const {
  std::weak_ptr<Impl> weak = impl_;
  return [weak](const transport::PeerIdentity& peer) -> Result<void> {
    if (auto self = weak.lock()) return self->check(peer);
    if (peer.kind != transport::PeerKind::x509) return ok_result();
    return make_error(Errc::denied, "revocation watch has shut down: certificates are refused");
  };
}

void RevocationWatch::retry_now() {
  for (auto& [fqdn, mef] : impl_->mefs) mef.subscription->retry_now();
}

void RevocationWatch::set_revoked_observer(RevokedObserver observer) { impl_->observer = std::move(observer); }

std::size_t RevocationWatch::feeds_live() const {
  std::size_t live = 0;
  for (const auto& [fqdn, mef] : impl_->mefs) live += mef.subscription->live() ? 1 : 0;
  return live;
}

std::uint64_t RevocationWatch::notifications() const { return impl_->applied; }

std::size_t RevocationWatch::revoked_count() const {
  std::size_t count = 0;
  for (const auto& [fqdn, mef] : impl_->mefs) count += mef.serials.size();
  return count;
}

}  // namespace dauth::rspf

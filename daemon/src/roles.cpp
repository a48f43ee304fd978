#include "roles_impl.hpp"

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <ctime>
#include <utility>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/daemon/log.hpp"
#include "dauth/rspf/credential_rules.hpp"
#include "dauth/transport/address.hpp"
#include "metrics.hpp"

namespace dauth::daemon {

namespace {

using transport::Method;
using transport::Request;
using transport::Response;

constexpr Method kAllMethods[] = {Method::get,   Method::post,  Method::put,   Method::del,
                                  Method::fetch, Method::patch, Method::ipatch};

// The certificates of a PEM file (a chain, or trust anchors), re-encoded as PEM; errors name the key.
Result<std::string> load_certificates_pem(const std::filesystem::path& path, const std::string& key) {
  auto certificates = crypto::Certificate::load_file(path.string());
  if (!certificates) return make_error(certificates.error().code, key + ": " + certificates.error().message);
  return certificates->pem();
}

// The MEF's X.509 server credentials (certificate RSPF): its FQDN certificate, and as trust anchors the device CA
// and, for AE-ID certificates it issued (EST re-enrolment), its issuing CA.
Result<transport::X509Credentials> mef_x509_credentials(const MefSettings& mef,
                                                        const std::shared_ptr<const SecretBuffer>& pkcs11_pin) {
  auto chain = crypto::Certificate::load_file(mef.certificate_file.string());
  if (!chain) return make_error(chain.error().code, "mef.certificate_file: " + chain.error().message);
  const auto dns_names = chain->san_dns_names();
  if (std::none_of(dns_names.begin(), dns_names.end(),
                   [&](const std::string& name) { return crypto::same_fqdn(name, mef.fqdn); })) {
    return make_error(Errc::invalid_argument, "mef.certificate_file " + mef.certificate_file.string() +
                                                  ": no subjectAltName dNSName " + mef.fqdn +
                                                  " (enrolees check the MEF's FQDN)");
  }
  transport::X509Credentials credentials;
  credentials.certificate_chain_pem = chain->pem();
  if (crypto::is_pkcs11_uri(mef.private_key_file.string())) {
    // The key stays in the token; transport loads it (and checks it is the certificate's) when the node starts.
    credentials.token_key = transport::TokenKey{mef.private_key_file.string(), pkcs11_pin};
  } else {
    auto key = crypto::PrivateKey::load_file(mef.private_key_file.string());
    if (!key) return make_error(key.error().code, "mef.private_key_file: " + key.error().message);
    if (key->public_key_der() != chain->public_key_der()) {
      return make_error(Errc::invalid_argument, "mef.private_key_file " + mef.private_key_file.string() +
                                                    " is not the key of mef.certificate_file");
    }
    auto key_pem = key->to_pem();
    if (!key_pem) return make_error(key_pem.error().code, "mef.private_key_file: " + key_pem.error().message);
    credentials.private_key_pem = std::move(key_pem).value();
  }
  for (const auto& [path, name] : {std::pair{mef.device_ca, "mef.device_ca"},
                                   std::pair{mef.issuing_ca_certificate, "mef.issuing_ca_certificate"}}) {
    if (path.empty()) continue;
    auto anchors = load_certificates_pem(path, name);
    if (!anchors) return std::move(anchors).error();
    credentials.trust_anchors_pem += *anchors;
  }
  return credentials;
}

}  // namespace

std::int64_t unix_now() { return static_cast<std::int64_t>(std::time(nullptr)); }

std::string device_certificate_name(const std::string& ae_id) { return "device:" + ae_id; }

Result<transport::Peer> resolve_address(const std::string& text) {
  auto split = transport::parse_host_port(text);
  if (!split) {
    return make_error(split.error().code, "address " + crypto::quote_for_error(text) + ": " + split.error().message);
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string port = std::to_string(split->port);
  if (const int rc = ::getaddrinfo(split->host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return make_error(Errc::not_found, "address " + crypto::quote_for_error(text) + ": " + ::gai_strerror(rc));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> owner(found, &::freeaddrinfo);
  char host[NI_MAXHOST];
  if (::getnameinfo(found->ai_addr, found->ai_addrlen, host, sizeof host, nullptr, 0, NI_NUMERICHOST) != 0) {
    return make_error(Errc::internal, "address " + crypto::quote_for_error(text) + ": getnameinfo failed");
  }
  return transport::Peer{host, split->port};
}

Roles::Impl::~Impl() {
  stopping = true;
  retry_timers.clear();
  for (auto& ae : aes) ae->timer.reset();
  for (auto& d : drivers) {
    d->watch.reset();
    d->timer.reset();
  }
  mef_slot.unbind();
  peer_slot.unbind();
  // Roles before their Nodes' teardown; the Nodes before the store (declared order would do the reverse).
  revocations.reset();
  target_keys.reset();
  aes.clear();
  mef.reset();
  drivers.clear();
}

Result<void> Roles::Impl::drive(NodeDriver& driver) {
  auto watch = loop.watch(driver.node->fd(), EPOLLIN, [this, &driver](std::uint32_t) { run_round(driver); });
  if (!watch) return std::move(watch).error();
  driver.watch = std::move(watch).value();
  rearm(driver);
  return ok_result();
}

void Roles::Impl::run_round(NodeDriver& driver) {
  driver.in_round = true;  // rearm() calls from this node's own handlers wait for after_io()
  driver.node->process_ready();
  driver.in_round = false;
  after_io();
}

void Roles::Impl::rearm(NodeDriver& driver) {
  // A one-shot timer at the node's next deadline (retransmissions, handshake and request timeouts, posted work),
  // at most 1 s away. 0 means work is due now: the timer fires in the next loop turn (EventLoop arms 1 ns), not a
  // 1 ms tick later. Only a node that keeps reporting due work it does not do gets the 1 ms floor back after
  // kMaxImmediateTurns turns in a row, so a transport bug cannot make dauthd spin.
  constexpr int kMaxImmediateTurns = 64;
  // Called by a request handler inside process_ready() (forward_to_peer): the node reports the completions of
  // this very round as due now, and after_io() re-arms once the round is over anyway.
  if (driver.in_round) return;
  auto delay = std::min(driver.node->next_timeout(), std::chrono::milliseconds(1000));
  if (delay.count() > 0) {
    driver.immediate_turns = 0;
  } else {
    delay = std::chrono::milliseconds(++driver.immediate_turns > kMaxImmediateTurns ? 1 : 0);
  }
  const auto due = std::chrono::steady_clock::now() + delay;
  // An armed timer that fires no later than needed stays: re-creating it after every I/O event (timerfd_create,
  // settime, two epoll_ctl, close, per driver) was about half of dauthd's system calls under proxy load (strace).
  // Firing early costs one empty process_ready().
  if (driver.timer.active() && driver.timer_due <= due) return;
  auto timer = loop.add_timer(delay, std::chrono::milliseconds(0), [this, &driver] {
    driver.timer_due = std::chrono::steady_clock::time_point::max();
    run_round(driver);
  });
  if (timer) {
    driver.timer = std::move(timer).value();
    driver.timer_due = due;
  }
}

void Roles::Impl::after_io() {
  for (auto& d : drivers) rearm(*d);
}

void Roles::Impl::serve_certificate_of(const std::string& ae_id) {
  const LocalAeState* ae = find_ae(ae_id);
  if (peer_driver == nullptr || peer_trust_anchors_pem.empty() || ae == nullptr || ae->config.endpoint.empty()) {
    return;  // not served on the peer endpoint, or no certificate sessions there
  }
  auto x509 = x509_of_local_ae(ae_id);
  if (!x509) {
    log::warning("peer: no certificate to present for " + ae_id + ": " + x509.error().message);
    return;
  }
  if (auto served = peer_driver->node->set_server_certificate(crypto::server_name_for_ae_id(ae_id),
                                                              std::move(x509).value());
      !served) {
    log::warning("peer: cannot present the certificate of " + ae_id + ": " + served.error().message);
    return;
  }
  certificate_aes.insert(ae_id);
  log::info("peer: X.509 sessions naming " + ae_id + " get its current certificate from the next handshake");
}

Result<transport::X509Credentials> Roles::Impl::x509_of_local_ae(const std::string& ae_id) const {
  const crypto::CertificateRecord* record = store->find<crypto::CertificateRecord>(ae_id);
  if (record == nullptr || record->chain_der.empty() || record->expires_at <= unix_now()) {
    record = store->find<crypto::CertificateRecord>(device_certificate_name(ae_id));
  }
  if (record == nullptr || record->chain_der.empty()) {
    return make_error(Errc::not_found, "local AE " + ae_id + " has no certificate (none issued over EST, no "
                                       "enrolee.ae.certificate_file)");
  }
  transport::X509Credentials credentials;
  for (const auto& der : record->chain_der) {
    auto certificate = crypto::Certificate::parse(ByteView(der));
    if (!certificate) return make_error(certificate.error().code, "certificate of " + ae_id + ": " + certificate.error().message);
    credentials.certificate_chain_pem += certificate->pem();
  }
  if (!record->private_key_uri.empty()) {
    // A key in a token (enrolee.ae.certificate_key, or a device certificate's private_key_file): the transport
    // loads it by URI and the token signs the handshakes.
    credentials.token_key = transport::TokenKey{record->private_key_uri, pkcs11_pin};
  } else {
    auto key = crypto::PrivateKey::parse(record->private_key_der);
    if (!key) return make_error(key.error().code, "key of " + ae_id + ": " + key.error().message);
    auto key_pem = key->to_pem();
    if (!key_pem) return make_error(key_pem.error().code, "key of " + ae_id + ": " + key_pem.error().message);
    credentials.private_key_pem = std::move(key_pem).value();
  }
  credentials.trust_anchors_pem = peer_trust_anchors_pem;
  credentials.local_ae_id = ae_id;  // presented by the peer endpoint, it grants its sessions this AE
  return credentials;
}

Result<transport::RpkCredentials> Roles::Impl::own_raw_key(const std::string& name, const std::string& source) {
  const auto* record = store->find<crypto::CertificateRecord>(name);
  if (record != nullptr && !record->chain_der.empty()) {
    return make_error(Errc::invalid_argument, "raw key " + name + ": the key store holds a certificate under that "
                                              "name, not a raw key");
  }
  if (crypto::is_pkcs11_uri(source)) {
    // In a token: loaded once here (a wrong PIN, a missing token or key is said now); the store keeps only its URI,
    // for the readers of the record (the Enrolee's raw-key bootstrap, credential = "rpk", dauthctl rpk show).
    transport::TokenKey token{source, pkcs11_pin};
    auto key_id = transport::check_token_key(token);
    if (!key_id) return make_error(key_id.error().code, "raw key " + name + ": " + key_id.error().message);
    if (record == nullptr || record->private_key_uri != source) {
      if (record != nullptr) {
        log::notice("raw key " + name + ": the configuration now names a key in a token; the key the store held is "
                    "replaced");
      }
      if (auto stored = store->put(crypto::CertificateRecord{name, {}, SecretBuffer(), 0, source}); !stored) {
        return make_error(stored.error().code, "raw key " + name + ": " + stored.error().message);
      }
      log::notice("raw key " + name + " in the token: " + *key_id + " (" +
                  crypto::public_key_id_forms(*key_id).sha256_hex + "); pin it on the other side");
    }
    return transport::RpkCredentials{SecretBuffer(), {}, std::move(token)};
  }
  if (record != nullptr && record->private_key_uri.empty()) {
    auto key = crypto::PrivateKey::parse(record->private_key_der);
    if (!key) return make_error(key.error().code, "raw key " + name + ": " + key.error().message);
    auto key_pem = key->to_pem();  // SEC1 "EC PRIVATE KEY": the form libcoap 4.3.1 takes for RPK
    if (!key_pem) return make_error(key_pem.error().code, "raw key " + name + ": " + key_pem.error().message);
    return transport::RpkCredentials{std::move(key_pem).value(), {}};
  }
  // First use (or the configuration moved it out of a token): a fresh P-256 key, sealed in the store before anyone
  // is told its id.
  auto key = crypto::PrivateKey::generate_p256();
  if (!key) return make_error(key.error().code, "raw key " + name + ": " + key.error().message);
  auto der = key->to_der();
  if (!der) return make_error(der.error().code, "raw key " + name + ": " + der.error().message);
  auto key_pem = key->to_pem();
  if (!key_pem) return make_error(key_pem.error().code, "raw key " + name + ": " + key_pem.error().message);
  if (auto stored = store->put(crypto::CertificateRecord{name, {}, std::move(der).value(), 0}); !stored) {
    return make_error(stored.error().code, "raw key " + name + ": " + stored.error().message);
  }
  log::notice("raw key " + name + " generated: " + key->public_key_id() + " (" +
              crypto::public_key_id_forms(key->public_key_id()).sha256_hex + "); pin it on the other side");
  return transport::RpkCredentials{std::move(key_pem).value(), {}};
}

Result<transport::RpkCredentials> Roles::Impl::raw_key_of_local_ae(const std::string& ae_id,
                                                                   const std::string& target) const {
  const auto* record = store->find<crypto::CertificateRecord>(ae_id);
  if (record == nullptr || !record->chain_der.empty()) {
    return make_error(Errc::not_found, "local AE " + ae_id + " has no raw key ([[enrolee.ae]] raw_key) for "
                                       "credential = \"rpk\"");
  }
  auto pinned = keys_pinned_to(target);
  if (pinned.empty()) {
    return make_error(Errc::not_found, "no raw public key pinned to " + target + " ([[peer.rpk]], dauthctl rpk add)");
  }
  if (!record->private_key_uri.empty()) {  // [[enrolee.ae]] raw_key = "pkcs11:...": the token signs
    return transport::RpkCredentials{SecretBuffer(), std::move(pinned),
                                     transport::TokenKey{record->private_key_uri, pkcs11_pin}};
  }
  auto key = crypto::PrivateKey::parse(record->private_key_der);
  if (!key) return make_error(key.error().code, "raw key of " + ae_id + ": " + key.error().message);
  auto key_pem = key->to_pem();  // SEC1 "EC PRIVATE KEY": the form libcoap 4.3.1 takes for RPK
  if (!key_pem) return make_error(key_pem.error().code, "raw key of " + ae_id + ": " + key_pem.error().message);
  return transport::RpkCredentials{std::move(key_pem).value(), std::move(pinned)};
}

std::string Roles::Impl::pinned_ae_of(const std::string& key_id) const {
  if (const auto configured = configured_pins.find(key_id); configured != configured_pins.end()) {
    return configured->second;
  }
  const auto* added = store->find<crypto::PinnedKeyRecord>(key_id);
  return added ? added->ae_id : std::string();
}

std::set<std::string> Roles::Impl::keys_pinned_to(const std::string& ae_id) const {
  std::set<std::string> keys;
  for (const auto& [key, pinned_ae] : configured_pins) {
    if (pinned_ae == ae_id) keys.insert(key);
  }
  store->for_each(crypto::RecordKind::pinned_key, [&](const crypto::Record& r) {
    const auto& pin = std::get<crypto::PinnedKeyRecord>(r);
    if (pin.ae_id == ae_id && !configured_pins.count(pin.public_key_id)) keys.insert(pin.public_key_id);
  });
  return keys;
}

Result<transport::RawKeyGrant> Roles::Impl::grant_raw_key(const transport::RawKeyRequest& request) const {
  const std::string key_id(request.key_id);
  const std::string peer_ae = pinned_ae_of(key_id);
  if (peer_ae.empty()) {
    return make_error(Errc::not_found, "raw public key " + key_id + " is not pinned ([[peer.rpk]], dauthctl rpk "
                                       "add)");
  }
  // The local AE as for PSK sessions: the one the SNI names; a client that sends none (gnutls-cli to an IP
  // address) reaches the only AE served here, if there is exactly one.
  std::string local_ae;
  std::size_t served = 0;
  std::string only;
  for (const auto& ae : aes) {
    if (ae->config.endpoint.empty()) continue;
    ++served;
    only = ae->config.id;
    if (!request.sni.empty() && crypto::server_name_for_ae_id(ae->config.id) == request.sni) local_ae = ae->config.id;
  }
  if (local_ae.empty() && request.sni.empty() && served == 1) local_ae = only;
  if (local_ae.empty()) {
    return make_error(Errc::not_found, "raw public key " + key_id + " (" + peer_ae + "): " +
                                           (request.sni.empty() ? std::string("no SNI")
                                                                : "SNI " + crypto::quote_for_error(request.sni)) +
                                           " names no local AE served here");
  }
  return transport::RawKeyGrant{peer_ae, local_ae};
}

void Roles::Impl::close_raw_key_sessions(const std::string& key_id, const std::string& why) {
  if (peer_driver == nullptr) return;
  const std::size_t closed = peer_driver->node->close_sessions_with_raw_key(key_id);
  log::notice("peer: raw public key " + key_id + " " + why +
              (closed ? "; " + std::to_string(closed) + " live session(s) closed" : std::string()));
}

LocalAeState* Roles::Impl::find_ae(const std::string& id) {
  for (auto& ae : aes) {
    if (ae->config.id == id) return ae.get();
  }
  return nullptr;
}

// Configured bootstrap credentials (Enrolee) and enrolee table (MEF) go into the store, so that the roles find
// them there; reload puts the new values (KeyStore::put replaces by id). Each id belongs to the configuration or to
// dauthctl (credentials add, enrolees add; those refuse configured ids), and nothing goes silently:
//   - a configured row replaces a stored one with the same id; when their content differs (changed in the file
//     while dauthd was stopped, or added with dauthctl before the file named it), a notice says so;
//   - a reload deletes the rows the previous configuration had and this one has not (removing a [[mef.enrolee]]
//     from the file and reloading ends that enrolee's bootstrap), logged; a bootstrap credential still used by a
//     running Enrolee moves to its AE's new kpm_id first, or stays until the restart;
//   - rows added with dauthctl stay across reloads and restarts; at start those not in the configuration are logged.
// Two steps, so that a reload that cannot be applied changes nothing (roles.hpp): plan_key_tables() builds and
// checks every record (device certificates loaded, KeyStore rules applied) without touching the store or an
// Enrolee; apply_key_tables() writes them and, if one write fails, puts back what it had already changed.
Result<void> Roles::Impl::put_key_tables(const Config& cfg, const LoadedSecrets& secrets) {
  auto plan = plan_key_tables(cfg, secrets);
  if (!plan) return std::move(plan).error();
  return apply_key_tables(std::move(plan).value());
}

Result<KeyTablePlan> Roles::Impl::plan_key_tables(const Config& cfg, const LoadedSecrets& secrets) const {
  KeyTablePlan plan;
  const auto add_write = [&](crypto::Record record, const std::string& where) -> Result<void> {
    if (auto valid = crypto::validate(record); !valid) {
      return make_error(valid.error().code, where + ": " + valid.error().message);
    }
    // Unchanged since the last start: nothing to write (holds() decodes nothing; find() would keep a decoded copy).
    if (!store->holds(record)) plan.writes.push_back(std::move(record));
    return ok_result();
  };
  if (cfg.enrolee) {
    for (const auto& ae : cfg.enrolee->aes) {
      if (!ae.certificate_file.empty()) {
        auto record = device_certificate_record(ae);
        if (!record) return std::move(record).error();
        if (auto r = add_write(std::move(record).value(), "enrolee.ae " + ae.id); !r) return std::move(r).error();
        continue;
      }
      if (ae.kpm_id.empty()) continue;
      const auto* key = secrets.find_file(ae.kpm_file);
      if (key == nullptr) return make_error(Errc::internal, "enrolee.ae " + ae.id + ": kpm_file not loaded");
      plan.kpm_ids.insert(ae.kpm_id);
      crypto::Record record = crypto::BootstrapKeyRecord{ae.kpm_id, key->key.clone(), ae.id};
      if (const auto* old = store->find<crypto::BootstrapKeyRecord>(ae.kpm_id);
          old && !configured_kpm_ids.count(ae.kpm_id) && !store->holds(record)) {
        plan.notices.push_back("enrolee.ae " + ae.id + ": kpm_file replaces the stored credential " + ae.kpm_id +
                               " (fingerprint " + old->kpm.fingerprint() + " -> " + key->key.fingerprint() + ")");
      }
      if (auto r = add_write(std::move(record), "enrolee.ae " + ae.id); !r) return std::move(r).error();
    }
  }
  if (cfg.mef) {
    for (const auto& row : cfg.mef->enrolees) {
      crypto::EnroleeRecord record;
      if (!row.certificate_ae_id.empty()) {
        // Certificate-bootstrapped enrolee: the Mef names an X.509 session "cert:<AE-ID>" (rspf/mef.hpp).
        record.credential_id = "cert:" + row.certificate_ae_id;
      } else if (!row.rpk.empty()) {
        record.credential_id = "rpk:" + row.rpk;  // a raw-key session (canonical id, config.cpp)
      } else {
        const auto* key = secrets.find_file(row.kpm_file);
        if (key == nullptr) return make_error(Errc::internal, "mef.enrolee " + row.kpm_id + ": kpm_file not loaded");
        record.credential_id = row.kpm_id;
        record.kpm = key->key.clone();
      }
      record.enrolee_id = row.enrolee_id;
      record.targets = row.targets;
      record.enrolment_lifetime_s = row.lifetime != 0 ? row.lifetime : cfg.mef->enrolment_lifetime;
      record.certificate_enrolment = row.certificate_enrolment;
      const std::string id = record.credential_id;
      plan.enrolee_ids.insert(id);
      crypto::Record row_record = std::move(record);
      if (!store->holds(row_record) && store->find<crypto::EnroleeRecord>(id) != nullptr &&
          !configured_enrolee_ids.count(id)) {
        plan.notices.push_back("mef.enrolee " + id + ": the configuration replaces the stored row (changed in the "
                               "file, or added with dauthctl enrolees add)");
      }
      if (auto r = add_write(std::move(row_record), "mef.enrolee " + id); !r) return std::move(r).error();
    }
  }
  if (!key_tables_loaded) {
    std::string runtime_rows;
    if (cfg.mef) {
      store->for_each(crypto::RecordKind::enrolee, [&](const crypto::Record& r) {
        const auto& row = std::get<crypto::EnroleeRecord>(r);
        if (!plan.enrolee_ids.count(row.credential_id)) {
          runtime_rows += (runtime_rows.empty() ? "" : ", ") + row.credential_id;
        }
      });
    }
    if (!runtime_rows.empty()) {
      plan.notices.push_back("mef: enrolee table rows kept from the key store, not in the configuration (added with "
                             "dauthctl enrolees add, or removed from the file while dauthd was stopped; dauthctl "
                             "enrolees remove deletes one): " + runtime_rows);
    }
    return plan;
  }
  for (const auto& id : configured_enrolee_ids) {
    if (plan.enrolee_ids.count(id) || !store->find<crypto::EnroleeRecord>(id)) continue;
    plan.removals.push_back({crypto::RecordKind::enrolee, id, {}});
  }
  for (const auto& id : configured_kpm_ids) {
    if (plan.kpm_ids.count(id) || !store->find<crypto::BootstrapKeyRecord>(id)) continue;
    KeyTablePlan::Removal removal{crypto::RecordKind::bootstrap_key, id, {}};
    for (const auto& ae : aes) {
      if (!ae->enrolee || ae->enrolee->kpm_id() != id) continue;
      // The AE's new configured credential, if it still has one (the set of local AEs changes at restart).
      std::string fresh;
      if (cfg.enrolee) {
        for (const auto& candidate : cfg.enrolee->aes) {
          if (candidate.id == ae->config.id && !candidate.kpm_id.empty()) fresh = candidate.kpm_id;
        }
      }
      removal.moves.push_back({ae.get(), fresh});
    }
    plan.removals.push_back(std::move(removal));
  }
  return plan;
}

namespace {
// A copy of the stored record of a kind the key tables write, to put back if a later write fails.
std::optional<crypto::Record> stored_copy(const crypto::KeyStore& store, crypto::RecordKind kind,
                                          const std::string& id) {
  switch (kind) {
    case crypto::RecordKind::bootstrap_key:
      if (const auto* r = store.find<crypto::BootstrapKeyRecord>(id)) {
        return crypto::Record{crypto::BootstrapKeyRecord{r->kpm_id, r->kpm.clone(), r->ae_id}};
      }
      break;
    case crypto::RecordKind::enrolee:
      if (const auto* r = store.find<crypto::EnroleeRecord>(id)) {
        return crypto::Record{crypto::EnroleeRecord{r->credential_id, r->kpm.clone(), r->enrolee_id, r->targets,
                                                    r->enrolment_lifetime_s, r->certificate_enrolment}};
      }
      break;
    case crypto::RecordKind::certificate:
      if (const auto* r = store.find<crypto::CertificateRecord>(id)) {
        return crypto::Record{
            crypto::CertificateRecord{r->name, r->chain_der, r->private_key_der.clone(), r->expires_at,
                                      r->private_key_uri}};
      }
      break;
    default:
      break;
  }
  return std::nullopt;
}
}  // namespace

Result<void> Roles::Impl::apply_key_tables(KeyTablePlan plan) {
  // What each store operation replaced, newest last: undone in reverse when a later one fails.
  struct Undo {
    crypto::RecordKind kind;
    std::string id;
    std::optional<crypto::Record> before;
  };
  std::vector<Undo> done;
  std::vector<std::pair<LocalAeState*, std::string>> moved;  // Enrolees moved off a retired KpmID, and that KpmID
  const auto roll_back = [&](const Error& error) -> Result<void> {
    for (auto& [ae, previous] : moved) (void)ae->enrolee->use_bootstrap_key(previous);
    for (auto it = done.rbegin(); it != done.rend(); ++it) {
      auto restored = it->before ? store->put(std::move(*it->before)) : store->remove(it->kind, it->id);
      if (!restored) log::error("key store: cannot undo the change of " + it->id + ": " + restored.error().message);
    }
    return make_error(error.code, error.message + " (key tables left as they were)");
  };
  for (auto& record : plan.writes) {
    const crypto::RecordKind kind = crypto::kind_of(record);
    std::string id = crypto::id_of(record);
    auto before = stored_copy(*store, kind, id);
    if (auto r = store->put(std::move(record)); !r) return roll_back(r.error());
    done.push_back({kind, std::move(id), std::move(before)});
  }
  std::vector<std::string> notices = std::move(plan.notices);
  for (auto& removal : plan.removals) {
    bool in_use = false;
    for (const auto& move : removal.moves) {
      LocalAeState& ae = *move.ae;
      auto moved_to = !move.to.empty()
                          ? ae.enrolee->use_bootstrap_key(move.to)
                          : Result<void>(make_error(Errc::not_found, "no kpm_id configured for it"));
      if (!moved_to) {
        in_use = true;
        notices.push_back("enrolee.ae " + ae.config.id + ": credential " + removal.id + " left the configuration but "
                          "stays in use until the restart (" + moved_to.error().message + ")");
      } else {
        moved.push_back({&ae, removal.id});
      }
    }
    if (in_use) continue;
    auto before = stored_copy(*store, removal.kind, removal.id);
    if (auto r = store->remove(removal.kind, removal.id); !r) return roll_back(r.error());
    done.push_back({removal.kind, removal.id, std::move(before)});
    notices.push_back(removal.kind == crypto::RecordKind::enrolee
                          ? "mef.enrolee " + removal.id + ": no longer in the configuration; deleted from the enrolee "
                            "table (its enrolments stay valid until they expire or are revoked)"
                          : "enrolee: bootstrap credential " + removal.id + " no longer in the configuration; deleted");
  }
  // Applied: the in-memory side follows.
  for (const auto& removal : plan.removals) {
    for (const auto& move : removal.moves) {
      if (!move.to.empty() && move.ae->enrolee->kpm_id() == move.to) move.ae->config.kpm_id = move.to;
    }
  }
  for (const auto& line : notices) log::notice(line);
  configured_kpm_ids = std::move(plan.kpm_ids);
  configured_enrolee_ids = std::move(plan.enrolee_ids);
  key_tables_loaded = true;
  return ok_result();
}

std::string Roles::Impl::bootstrap_kpm_id_of(const LocalAe& ae) const {
  std::string added;
  store->for_each(crypto::RecordKind::bootstrap_key, [&](const crypto::Record& r) {
    const auto& b = std::get<crypto::BootstrapKeyRecord>(r);
    if (b.ae_id == ae.id && !configured_kpm_ids.count(b.kpm_id) && added.empty()) added = b.kpm_id;
  });
  if (added.empty() || ae.kpm_id.empty()) return ae.kpm_id;
  log::notice("enrolee.ae " + ae.id + ": bootstraps with " + added + ", added with dauthctl credentials add, not "
              "the configured " + ae.kpm_id + " (dauthctl credentials remove " + added + " returns to it)");
  return added;
}

// The configured device (or AE-ID) certificate of a local AE becomes the CertificateRecord the certificate-
// bootstrapped Enrolee authenticates with, named device_certificate_name(AE-ID): the file stays the bootstrap
// credential, and an AE-ID certificate issued over EST (stored under the AE-ID itself) does not replace it.
Result<crypto::CertificateRecord> Roles::Impl::device_certificate_record(const LocalAe& ae) const {
  const auto fail = [&](const std::string& key, const Error& e) {
    return make_error(e.code, "enrolee.ae " + ae.id + ": " + key + ": " + e.message);
  };
  auto certificate = crypto::Certificate::load_file(ae.certificate_file.string());
  if (!certificate) return fail("certificate_file", certificate.error());
  auto named = certificate->ae_id();
  if (!named) return fail("certificate_file", named.error());
  if (*named != ae.id) {
    return make_error(Errc::invalid_argument, "enrolee.ae " + ae.id + ": certificate_file " +
                                                  ae.certificate_file.string() + " names AE-ID " +
                                                  crypto::quote_for_error(*named) + " (subjectAltName URI), not " +
                                                  ae.id);
  }
  if (crypto::is_pkcs11_uri(ae.private_key_file.string())) {
    // The key stays in the token: the record names it, and the bootstrap session signs there.
    auto key_id = transport::check_token_key(transport::TokenKey{ae.private_key_file.string(), pkcs11_pin});
    if (!key_id) return fail("private_key_file", key_id.error());
    if (*key_id != certificate->public_key_id()) {
      return make_error(Errc::invalid_argument, "enrolee.ae " + ae.id + ": private_key_file " +
                                                    ae.private_key_file.string() + " is not the key of certificate_file");
    }
    crypto::CertificateRecord record{device_certificate_name(ae.id), certificate->chain_der(), {},
                                     static_cast<std::int64_t>(certificate->not_after())};
    record.private_key_uri = ae.private_key_file.string();
    return record;
  }
  auto key = crypto::PrivateKey::load_file(ae.private_key_file.string());
  if (!key) return fail("private_key_file", key.error());
  if (key->public_key_der() != certificate->public_key_der()) {
    return make_error(Errc::invalid_argument, "enrolee.ae " + ae.id + ": private_key_file " +
                                                  ae.private_key_file.string() + " is not the key of certificate_file");
  }
  auto key_der = key->to_der();
  if (!key_der) return fail("private_key_file", key_der.error());
  return crypto::CertificateRecord{device_certificate_name(ae.id), certificate->chain_der(),
                                   std::move(key_der).value(), static_cast<std::int64_t>(certificate->not_after())};
}

Result<void> Roles::Impl::resolve_peers(const Config& cfg, std::map<std::string, PeerState>& out) const {
  if (!cfg.peer) return ok_result();
  for (const auto& entry : cfg.peer->addresses) {
    auto address = resolve_address(entry.address);
    if (!address) {
      return make_error(address.error().code, "peer.address " + entry.ae_id + ": " + address.error().message);
    }
    PeerState state;
    if (auto old = peers.find(entry.ae_id); old != peers.end()) state = old->second;  // keep the counters
    state.address_text = entry.address;
    state.credential = entry.credential;
    state.esprim_required = entry.esprim_required;
    state.server_name = crypto::server_name_for_ae_id(entry.ae_id);
    state.address = *address;
    out[entry.ae_id] = state;
  }
  return ok_result();
}

// A Node's failure, once: logged under the node's name; the MEF's handshake failures also become the latest failure
// of the enrolee whose identity was offered (dauthctl show on the MEF).
void Roles::Impl::on_node_failure(NodeDriver& driver, const transport::Failure& failure) {
  ++driver.failures[failure.kind];
  log_transport_failure(driver.name, failure);
  const bool handshake = failure.kind == transport::FailureKind::handshake_failed ||
                         failure.kind == transport::FailureKind::handshake_timeout;
  if (handshake && mef && &driver == mef_driver) mef->note_handshake_failure(failure.identity_offered, failure.reason);
}

// ---- enrolment ---------------------------------------------------------------------------------------------

void Roles::Impl::schedule_enrolment(LocalAeState& ae, std::chrono::milliseconds delay) {
  auto timer = loop.add_timer(std::max(delay, std::chrono::milliseconds(1)), std::chrono::milliseconds(0),
                              [this, &ae] { start_enrolment(ae); });
  if (!timer) {
    log::error("enrolee " + ae.config.id + ": cannot arm the enrolment timer: " + timer.error().message);
    return;
  }
  ae.timer = std::move(timer).value();
  ae.next_attempt_delay_ms = static_cast<std::int64_t>(delay.count());
  ae.next_attempt_at = unix_now() + (delay.count() + 999) / 1000;
  log::info("enrolee " + ae.config.id + ": next enrolment attempt in " + std::to_string(delay.count()) + " ms");
}

void Roles::Impl::start_enrolment(LocalAeState& ae) {
  if (stopping || draining || !ae.enrolee) return;
  if (ae.enrolee->state() == rspf::EnroleeState::enrolling) return;
  ae.timer.reset();
  ++ae.attempts_started;
  ae.last_attempt_at = unix_now();
  count("enrolments_started_total");
  ae.enrolee->enrol([this, &ae](Result<void> outcome) {
    ++ae.attempts_done;
    if (outcome) {
      ae.last_error.reset();
      ae.last_enrolled_at = unix_now();
      count("enrolments_succeeded_total");
      if (revocations) revocations->retry_now();  // its subscription may have waited for these credentials
      // An AE-ID certificate issued or renewed over EST: the next handshake naming this AE gets it.
      if (ae.config.certificate_enrolment) serve_certificate_of(ae.config.id);
    } else {
      ae.last_error = outcome.error().message;
      ae.last_error_at = unix_now();
      ++ae.attempts_failed;
      count("enrolments_failed_total");
    }
    // Renewal at 2/3 of the lifetime, or the next backoff step with jitter (Enrolee::next_attempt_delay()).
    if (!stopping) schedule_enrolment(ae, ae.enrolee->next_attempt_delay());
  });
  if (enrolee_driver) rearm(*enrolee_driver);
}

// ---- start ---------------------------------------------------------------------------------------------------

Roles::Roles(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Roles::~Roles() = default;

bool Roles::has_mef() const { return impl_->mef != nullptr; }
bool Roles::has_enrolee() const { return !impl_->aes.empty(); }
bool Roles::has_peer() const { return impl_->peer_driver != nullptr; }

namespace {
// What Roles keeps of a configuration: the typed sections it consults after start (listen addresses, policy, peer
// addresses, the MEF's certificate files). Not the parse tables (every key's value and position: the Daemon keeps
// them for messages and `dauthctl config`), nor the [[mef.enrolee]] rows (put_key_tables stores them in the key
// store, which is what enrolment consults). With 10,000 rows those were some 8 MB of a second copy.
Config what_roles_keep(const Config& config) {
  Config kept;
  kept.source = config.source;
  kept.daemon = config.daemon;
  kept.enrolee = config.enrolee;
  kept.peer = config.peer;
  kept.relay = config.relay;
  if (config.mef) {
    MefSettings mef = *config.mef;
    mef.enrolees.clear();
    mef.enrolees.shrink_to_fit();
    kept.mef = std::move(mef);
  }
  return kept;
}

// The steps of Roles::start, in its order; each uses only what the ones before it set up.

// A role's Node, driven by the loop (rearm) and logging its failures under its name ("mef", "enrolee", "peer").
Result<NodeDriver*> add_node_driver(Roles::Impl& s, const std::string& name, transport::NodeConfig node_config) {
  auto node = transport::Node::create(std::move(node_config));
  if (!node) return make_error(node.error().code, name + " node: " + node.error().message);
  auto driver = std::make_unique<NodeDriver>();
  driver->name = name;
  driver->node = std::move(node).value();
  driver->node->set_failure_observer(
      [impl = &s, node = driver.get()](const transport::Failure& failure) { impl->on_node_failure(*node, failure); });
  s.drivers.push_back(std::move(driver));
  return s.drivers.back().get();
}

// [mef]: its node (PSK, and X.509 with mef.certificate_file), the issuing CA, the Mef and its PSK lookup.
Result<void> start_mef(Roles::Impl& s, const Config& config, const LoadedSecrets& secrets) {
  auto listen = transport::parse_host_port(config.mef->listen);
  if (!listen) return make_error(listen.error().code, "mef.listen: " + listen.error().message);
  transport::NodeConfig node_config;
  node_config.secure_addresses = {listen->host};
  node_config.secure_port = listen->port;
  node_config.psk_lookup = s.mef_slot.lookup();
  if (!config.mef->certificate_file.empty()) {
    auto x509 = mef_x509_credentials(*config.mef, secrets.pkcs11_pin());
    if (!x509) return std::move(x509).error();
    if (auto loaded = crypto::Certificate::load_file(config.mef->certificate_file.string())) {
      s.mef_certificate_expires_at = static_cast<std::int64_t>(loaded->not_after());
    }
    node_config.x509 = std::move(x509).value();
  }
  if (!config.mef->raw_key.empty()) {
    // RPK-bootstrapped enrolees: our raw key, and the enrolee table decides which keys get in ("rpk:<key id>" rows,
    // configured or added with dauthctl enrolees add); the Mef then names the session's enrolee by the same row.
    auto key = s.own_raw_key(kMefRawKeyName, config.mef->raw_key);
    if (!key) return make_error(key.error().code, "mef.raw_key: " + key.error().message);
    node_config.rpk = std::move(key).value();
    node_config.raw_key_lookup =
        [impl = &s](const transport::RawKeyRequest& request) -> Result<transport::RawKeyGrant> {
      const auto* row = impl->store->find<crypto::EnroleeRecord>("rpk:" + std::string(request.key_id));
      if (row == nullptr) {
        return make_error(Errc::not_found, "raw public key " + std::string(request.key_id) + " is no enrolee "
                                           "([[mef.enrolee]] rpk, dauthctl enrolees add)");
      }
      return transport::RawKeyGrant{row->enrolee_id, ""};
    };
  }
  auto driver = add_node_driver(s, "mef", std::move(node_config));
  if (!driver) return std::move(driver).error();
  s.mef_driver = *driver;
  rspf::MefConfig mef_config;
  mef_config.fqdn = config.mef->fqdn;
  mef_config.session_key_lifetime_s = config.mef->session_key_lifetime;
  mef_config.log = s.log_sink();
  if (!config.mef->issuing_ca_certificate.empty() && !config.mef->issuing_ca_key.empty()) {
    auto certificate = crypto::Certificate::load_file(config.mef->issuing_ca_certificate.string());
    if (!certificate) return make_error(certificate.error().code, "mef.issuing_ca_certificate: " + certificate.error().message);
    // A key in a token signs each certificate there (crypto::Token); a file key is read into memory.
    const std::string& key_name = config.mef->issuing_ca_key.string();
    auto key = crypto::is_pkcs11_uri(key_name) ? s.signing_token->private_key(key_name)
                                               : crypto::PrivateKey::load_file(key_name);
    if (!key) return make_error(key.error().code, "mef.issuing_ca_key: " + key.error().message);
    s.mef_issuing_ca_expires_at = static_cast<std::int64_t>(certificate->not_after());
    auto ca = crypto::CertificateAuthority::from(std::move(certificate).value(), std::move(key).value());
    if (!ca) return make_error(ca.error().code, "mef issuing CA: " + ca.error().message);
    mef_config.ca.emplace(std::move(ca).value());
    mef_config.max_certificate_validity_s = config.mef->certificate_lifetime;
  }
  auto mef = rspf::Mef::create(*s.mef_driver->node, *s.store, std::move(mef_config));
  if (!mef) return std::move(mef).error();
  s.mef = std::move(mef).value();
  s.mef_slot.bind(s.mef->psk_lookup());
  log::notice("mef " + config.mef->fqdn + " listening on coaps://" + config.mef->listen + " (port " +
              std::to_string(s.mef_driver->node->secure_port()) + "), " +
              (config.mef->certificate_file.empty() ? "PSK" : "PSK and X.509") +
              (config.mef->raw_key.empty() ? std::string() : " and raw-key") + " enrolees" +
              (crypto::is_pkcs11_uri(config.mef->private_key_file.string())
                   ? ", server key in the token: " + config.mef->private_key_file.string()
                   : std::string()));
  return ok_result();
}

// [enrolee]: the client-only node and one Enrolee per [[enrolee.ae]].
Result<void> start_enrolees(Roles::Impl& s, const Config& config) {
  auto driver = add_node_driver(s, "enrolee", transport::NodeConfig{});  // client only
  if (!driver) return std::move(driver).error();
  s.enrolee_driver = *driver;
  auto mef_address = resolve_address(config.enrolee->mef_address);
  if (!mef_address) return make_error(mef_address.error().code, "enrolee.mef_address: " + mef_address.error().message);
  std::string mef_trust_anchors;  // certificate RSPF: the CA(s) of the MEF's FQDN certificate
  if (!config.enrolee->mef_trust_anchor.empty()) {
    auto anchors = load_certificates_pem(config.enrolee->mef_trust_anchor, "enrolee.mef_trust_anchor");
    if (!anchors) return std::move(anchors).error();
    mef_trust_anchors = std::move(anchors).value();
  }
  for (const auto& ae : config.enrolee->aes) {
    auto state = std::make_unique<LocalAeState>();
    state->config = ae;
    rspf::EnroleeConfig enrolee_config;
    if (!ae.raw_key.empty()) {
      // Made now if new, so that dauthctl rpk show can print it for the MEF's [[mef.enrolee]] rpk row.
      if (auto key = s.own_raw_key(ae.id, ae.raw_key); !key) {
        return make_error(key.error().code, "enrolee.ae " + ae.id + ": raw_key: " + key.error().message);
      }
    }
    if (ae.raw_key_bootstrap()) {
      enrolee_config.raw_public_key_name = ae.id;  // own_raw_key() kept it under the AE-ID
      enrolee_config.mef_pinned_keys = config.enrolee->mef_raw_keys;
    } else if (ae.certificate_file.empty()) {
      enrolee_config.kpm_id = s.bootstrap_kpm_id_of(ae);  // a credential added with dauthctl wins
    } else {
      enrolee_config.certificate_name = device_certificate_name(ae.id);  // put_key_tables() stored it
      enrolee_config.mef_trust_anchors_pem = mef_trust_anchors;
    }
    enrolee_config.mef_address = *mef_address;
    enrolee_config.mef_fqdn = config.enrolee->mef_fqdn;
    enrolee_config.request_certificate = ae.certificate_enrolment;
    enrolee_config.token_pin = s.pkcs11_pin;
    if (!ae.certificate_key.empty()) {
      // Generated in the token on first use, reused by renewals; the store keeps the certificate and the URI.
      enrolee_config.certificate_key = [token = s.signing_token, uri = ae.certificate_key] {
        return token->private_key_or_generate(uri);
      };
    }
    enrolee_config.log = s.log_sink();
    auto enrolee = rspf::Enrolee::create(*s.enrolee_driver->node, *s.store, std::move(enrolee_config));
    if (!enrolee) return make_error(enrolee.error().code, "enrolee.ae " + ae.id + ": " + enrolee.error().message);
    state->enrolee = std::move(enrolee).value();
    s.aes.push_back(std::move(state));
  }
  return ok_result();
}

// [peer]: the node with the peer endpoint (PSK by TargetKeys, X.509 per served AE) and the local endpoint.
Result<void> start_peer_node(Roles::Impl& s, const Config& config) {
  auto listen = transport::parse_host_port(config.peer->listen);
  if (!listen) return make_error(listen.error().code, "peer.listen: " + listen.error().message);
  transport::NodeConfig node_config;
  node_config.secure_addresses = {listen->host};
  node_config.secure_port = listen->port;
  node_config.psk_lookup = s.peer_slot.lookup();
  for (const auto& path : config.peer->trust_anchors) {
    auto anchors = load_certificates_pem(path, "peer.trust_anchors " + path.string());
    if (!anchors) return std::move(anchors).error();
    s.peer_trust_anchors_pem += *anchors;
  }
  // Certificate peer sessions: every served AE with a certificate (EST-issued, else its device certificate) is
  // presented to the handshakes whose SNI names it; one issued later is added by serve_certificate_of(). The
  // OpenSSL build cannot choose per handshake (transport: unsupported): it presents the first one only.
  if (!s.peer_trust_anchors_pem.empty() && config.enrolee) {
    for (const auto& ae : config.enrolee->aes) {
      if (ae.endpoint.empty()) continue;
      auto x509 = s.x509_of_local_ae(ae.id);
      if (!x509) continue;
      s.certificate_aes.insert(ae.id);
      if (!transport::backend_selects_server_certificates()) {
        node_config.x509 = std::move(x509).value();
        log::notice("peer: this " + std::string(transport::to_string(transport::compiled_backend())) +
                    " build presents one certificate (" + ae.id + "'s); other AEs' certificates need the "
                    "GnuTLS build");
        break;
      }
      node_config.x509_by_server_name.emplace(crypto::server_name_for_ae_id(ae.id), std::move(x509).value());
    }
  }
  if (config.enrolee) {
    auto local = transport::parse_host_port(config.enrolee->local_listen);
    if (!local) return make_error(local.error().code, "enrolee.local_listen: " + local.error().message);
    node_config.local_address = local->host;
    node_config.local_port = local->port;
  }
  node_config.limits.idle_timeout = std::chrono::seconds(config.peer->idle_timeout);
  node_config.limits.max_sessions = static_cast<std::size_t>(config.peer->max_sessions);
  node_config.limits.max_client_sessions = static_cast<std::size_t>(config.peer->max_outgoing_sessions);
  node_config.limits.max_handshakes = static_cast<std::size_t>(config.peer->max_handshakes);
  node_config.limits.handshake_timeout = std::chrono::seconds(config.peer->handshake_timeout);
  // peer.nstart / local_nstart (config table: 1–32): A→B requests and B→A separate responses share one session
  // per AE pair, and B's deliveries one plain session per local AE, so NSTART 1 would serialise them.
  node_config.limits.nstart = static_cast<std::uint16_t>(config.peer->nstart);
  node_config.limits.plain_nstart = static_cast<std::uint16_t>(config.peer->local_nstart);
  // Both endpoints of this node (peers and local AEs); libcoap 4.3.1 builds refuse it here (Node::create).
  node_config.accept_legacy_onem2m_options = config.peer->legacy_onem2m_options;
  if (!config.peer->raw_key.empty()) {
    auto key = s.own_raw_key(kPeerRawKeyName, config.peer->raw_key);
    if (!key) return make_error(key.error().code, "peer.raw_key: " + key.error().message);
    node_config.rpk = std::move(key).value();
  }
  if (transport::backend_supports_rpk()) {
    // Raw-key clients are decided by the pins at each handshake (a pin removed at run time refuses the next one).
    node_config.raw_key_lookup = [impl = &s](const transport::RawKeyRequest& request) {
      return impl->grant_raw_key(request);
    };
  }
  if (!s.peer_trust_anchors_pem.empty()) {
    // Certificate peers, both directions, against the MEFs' revocation lists (the watch is created below).
    node_config.peer_check = [impl = &s](const transport::PeerIdentity& peer) -> Result<void> {
      return impl->revocations ? impl->revocations->check(peer) : ok_result();
    };
  }
  auto driver = add_node_driver(s, "peer", std::move(node_config));
  if (!driver) return std::move(driver).error();
  s.peer_driver = *driver;
  return ok_result();
}

// The peer node's routes, the served AEs (TargetKeys) and the MEFs' revocation lists.
Result<void> serve_local_aes(Roles::Impl& s) {
  Roles::Impl* self = &s;
  for (const Method m : kAllMethods) {
    s.peer_driver->node->add_route(m, {}, transport::Access::local,
                                   [self](const transport::Session& session, const Request& request,
                                          transport::Responder responder) {
                                     self->on_local_request(session, request, std::move(responder));
                                   });
    s.peer_driver->node->add_route(m, {}, transport::Access::secure,
                                   [self](const transport::Session& session, const Request& request,
                                          transport::Responder responder) {
                                     self->on_secure_request(session, request, std::move(responder));
                                   });
  }
  // The served AEs: every local AE with an endpoint and an Enrolee is an Enrolment Target. The client names
  // the target AE as SNI (forward_to_peer), so TargetKeys picks the AE, and retrieves keys as that AE.
  for (auto& ae : s.aes) {
    if (ae->config.endpoint.empty() || !ae->enrolee) continue;
    if (!s.target_keys) {
      rspf::TargetKeysConfig target_config;
      target_config.local_ae_id = ae->config.id;
      target_config.log = s.log_sink();
      auto target_keys = rspf::TargetKeys::create(*s.peer_driver->node, *s.store, std::move(target_config));
      if (!target_keys) return std::move(target_keys).error();
      s.target_keys = std::move(target_keys).value();
      s.target_keys->set_fetch_observer([self](const std::string& ke_id, const Result<void>& outcome) {
        self->count(outcome ? "key_fetches_succeeded_total" : "key_fetches_failed_total");
        // A failure is a notice: TargetKeys' own line about it is the warning.
        log::write(outcome ? log::Level::info : log::Level::notice,
                   "peer: key retrieval for KeID " + ke_id + ": " +
                       (outcome ? std::string("stored") : outcome.error().message));
      });
    }
    rspf::Enrolee* enrolee = ae->enrolee.get();
    LocalAeState* owner = ae.get();
    rspf::MefContact contact{enrolee->mef_address(), [enrolee] { return enrolee->mef_credentials(); },
                             [self, owner] { self->confirm_enrolment_of(*owner); }};
    if (auto r = s.target_keys->add_mef(enrolee->mef_fqdn(), std::move(contact), ae->config.id); !r) {
      return make_error(r.error().code, "enrolee.ae " + ae->config.id + ": " + r.error().message);
    }
    s.served_aes.push_back(ae->config.id);
  }
  // [[peer.hop_client]] identities first, then the KeIDs of the served AEs (TargetKeys), if any.
  s.peer_slot.bind(s.peer_psk_lookup());
  if (s.config.peer->esprim_accept) {
    rspf::esprim::ReceiverConfig esprim_config;
    esprim_config.rand_lifetime_s = s.config.peer->esprim_rand_lifetime;
    esprim_config.max_sessions_per_rand = static_cast<std::size_t>(s.config.peer->esprim_max_sessions);
    s.esprim_receiver = std::make_unique<rspf::esprim::Receiver>(esprim_config);
  }
  // The MEFs the local AEs are enrolled with, observed for certificate revocations (rspf/revocation_watch.hpp:
  // lists kept in the key store; fail closed per MEF while its list is unknown or stale).
  if (!s.peer_trust_anchors_pem.empty()) {
    for (auto& ae : s.aes) {
      if (!ae->enrolee) continue;
      if (!s.revocations) {
        rspf::RevocationWatchConfig watch_config;
        watch_config.log = s.log_sink();
        watch_config.store = &*s.store;  // each MEF's last list, loaded again after a restart
        s.revocations = rspf::RevocationWatch::create(*s.peer_driver->node, std::move(watch_config));
      }
      rspf::Enrolee* enrolee = ae->enrolee.get();
      LocalAeState* owner = ae.get();
      rspf::MefContact contact{enrolee->mef_address(), [enrolee] { return enrolee->mef_credentials(); },
                               [self, owner] { self->confirm_enrolment_of(*owner); }};
      if (auto r = s.revocations->add_mef(enrolee->mef_fqdn(), std::move(contact)); !r) {
        return make_error(r.error().code, "enrolee.ae " + ae->config.id + ": " + r.error().message);
      }
    }
  }
  return ok_result();
}

void log_peer_listening(const Roles::Impl& s, const Config& config) {
  std::string served;
  for (const auto& id : s.served_aes) {
    // A peer must name an AE-ID that is no DNS name by its hashed server name (PROTOCOL.md §2): show it.
    const std::string server_name = crypto::server_name_for_ae_id(id);
    served += (served.empty() ? "" : ", ") + id + (server_name == id ? "" : " (SNI " + server_name + ")");
  }
  std::string by_certificate;
  for (const auto& id : s.certificate_aes) by_certificate += (by_certificate.empty() ? "" : ", ") + id;
  log::notice("peer listening on coaps://" + config.peer->listen + " (port " +
              std::to_string(s.peer_driver->node->secure_port()) + ")" +
              (config.enrolee ? ", local AEs on coap://" + config.enrolee->local_listen + " (port " +
                                    std::to_string(s.peer_driver->node->local_port()) + ")"
                              : std::string()) +
              (served.empty() ? std::string() : ", serving " + served) +
              (s.certificate_aes.empty() ? std::string() : "; X.509 sessions reach " + by_certificate));
}

// Every node's fd in the loop, then the first enrolments.
Result<void> drive_and_enrol(Roles::Impl& s) {
  for (auto& driver : s.drivers) {
    if (auto r = s.drive(*driver); !r) return std::move(r).error();
  }
  // Enrol at start: an AE still enrolled from before a restart waits for its renewal time.
  for (auto& ae : s.aes) {
    if (!ae->enrolee) continue;
    if (ae->enrolee->state() == rspf::EnroleeState::enrolled) {
      log::info("enrolee " + ae->config.id + ": enrolment from the key store still valid (KeID " +
                ae->enrolee->ke_id().value_or("?") + ")");
      s.schedule_enrolment(*ae, ae->enrolee->next_attempt_delay());
    } else {
      s.start_enrolment(*ae);
    }
  }
  return ok_result();
}

// Opens the PKCS#11 token crypto/ signs with when the configuration names a key there (enrolee.ae.certificate_key,
// mef.issuing_ca_key = "pkcs11:..."), with the module and PIN of the transport's token keys: the MEF's issuing CA
// key is then loaded and checked at start (wrong PIN, missing token or key: dauthd does not start), EST keys when an
// enrolment asks for one.
Result<void> open_signing_token(Roles::Impl& s, const Config& config, const std::string& module_path,
                                const SecretBuffer* pin) {
  std::string first;  // the first key that needs the token, for messages
  if (config.mef && crypto::is_pkcs11_uri(config.mef->issuing_ca_key.string())) first = "mef.issuing_ca_key";
  if (config.enrolee) {
    for (const auto& ae : config.enrolee->aes) {
      if (first.empty() && !ae.certificate_key.empty()) first = "enrolee.ae.certificate_key (" + ae.id + ")";
    }
  }
  if (first.empty()) return ok_result();
  if (pin == nullptr) {
    return make_error(Errc::not_found, first + " names a key in a PKCS#11 token, and no token PIN is loaded "
                                               "(daemon.pkcs11_pin_credential or daemon.pkcs11_pin_file)");
  }
  auto token = crypto::Token::open(crypto::TokenOptions{module_path}, pin->clone());
  if (!token) return make_error(token.error().code, first + ": " + token.error().message);
  s.signing_token = std::make_shared<const crypto::Token>(std::move(token).value());
  return ok_result();
}

}  // namespace

// The set-up list: the key store and its configured tables, the peers' addresses, then one step per role
// (docs/rspf.md "Wiring"), then the loop watches and the first enrolments. Tear-down is Impl::~Impl.
Result<std::unique_ptr<Roles>> Roles::start(EventLoop& loop, const Config& config, const LoadedSecrets& secrets) {
  auto impl = std::make_unique<Impl>(loop);
  Impl& s = *impl;
  s.config = what_roles_keep(config);
  // One PIN for the process's token keys (daemon.pkcs11_pin_file or _credential, LoadedSecrets): the transport's
  // and crypto/'s signing token. Kept from the start: a process stays logged in (a new PIN waits for a restart).
  s.pkcs11_pin = secrets.pkcs11_pin();
  // The next master key too (dauthd(8) MASTER KEY ROTATION): a rotation that finished, or was cut off after its
  // switch, left a store that only the next key opens.
  std::vector<SecretBuffer> master_keys;
  master_keys.push_back(secrets.master_key().clone());
  if (!secrets.next_master_key().empty()) master_keys.push_back(secrets.next_master_key().clone());
  crypto::OpenReport opened;
  auto store = crypto::KeyStore::open(config.daemon.state_directory, std::move(master_keys), &opened);
  if (!store) return std::move(store).error();
  s.store.emplace(std::move(store).value());
  if (opened.master_key_index == 1) {
    const bool credential = config.daemon.master_key_source == "credential";
    log::warning("key store: sealed under the next master key (" +
                 std::string(credential ? "daemon.master_key_next_credential" : "daemon.master_key_next_file") +
                 ", fingerprint " + secrets.next_master_key().fingerprint() +
                 "), not the current one: a rotation has switched it; make the next key the current one "
                 "(dauthd(8) MASTER KEY ROTATION)");
  }
  if (auto r = s.put_key_tables(config, secrets); !r) return std::move(r).error();
  if (auto r = s.resolve_peers(config, s.peers); !r) return std::move(r).error();
  if (auto r = s.resolve_hops(config, secrets, s.hops, s.hop_clients); !r) return std::move(r).error();
  if (config.peer) {
    for (const auto& pin : config.peer->pinned_keys) {
      s.configured_pins[pin.key] = pin.ae_id;
      if (const auto* added = s.store->find<crypto::PinnedKeyRecord>(pin.key); added && added->ae_id != pin.ae_id) {
        log::notice("peer.rpk " + pin.key + ": the configuration pins it to " + pin.ae_id + ", not to " +
                    added->ae_id + " as dauthctl rpk add did");
      }
    }
  }
  if (auto r = open_signing_token(s, config, config.daemon.pkcs11_module, s.pkcs11_pin.get()); !r) {
    return std::move(r).error();
  }

  if (config.mef) {
    if (auto r = start_mef(s, config, secrets); !r) return std::move(r).error();
  }
  if (config.enrolee) {
    if (auto r = start_enrolees(s, config); !r) return std::move(r).error();
  }
  if (config.peer) {
    if (auto r = start_peer_node(s, config); !r) return std::move(r).error();
    if (auto r = serve_local_aes(s); !r) return std::move(r).error();
    log_peer_listening(s, config);
  }
  if (auto r = drive_and_enrol(s); !r) return std::move(r).error();
  return std::unique_ptr<Roles>(new Roles(std::move(impl)));
}

// Applies what the reload rules call live (config_schema.cpp); Daemon::reload names the rest as needing a restart.
// Everything that can fail comes first (peer addresses resolved, key tables written or rolled back); the rest is
// assignment, so a reload is applied whole or not at all.
Result<void> Roles::reload(const Config& config, const LoadedSecrets& secrets) {
  Impl& s = *impl_;
  std::map<std::string, PeerState> peers;
  if (auto r = s.resolve_peers(config, peers); !r) return r;
  std::map<std::string, HopState> hops;
  std::map<std::string, std::shared_ptr<const SecretBuffer>> hop_clients;
  if (auto r = s.resolve_hops(config, secrets, hops, hop_clients); !r) return r;
  if (auto r = s.put_key_tables(config, secrets); !r) return r;
  s.peers = std::move(peers);
  // Hop tables: from the next message and handshake; live sessions keep the key they were made with.
  s.hops = std::move(hops);
  s.hop_clients = std::move(hop_clients);
  s.config.relay = config.relay;
  if (s.config.peer && config.peer) {
    // Pins: from the next handshake on; a key unpinned or pinned to another AE-ID also loses its live sessions,
    // which were granted the old AE-ID.
    // Every key a row names, before or after, is compared: a new row may also re-pin a key dauthctl rpk add
    // pinned to another AE-ID.
    std::map<std::string, std::string> pins;
    for (const auto& pin : config.peer->pinned_keys) pins[pin.key] = pin.ae_id;
    std::map<std::string, std::string> owner_before;
    for (const auto& [key, ae_id] : s.configured_pins) owner_before[key] = s.pinned_ae_of(key);
    for (const auto& [key, ae_id] : pins) owner_before.emplace(key, s.pinned_ae_of(key));
    s.configured_pins = std::move(pins);
    for (const auto& [key, was] : owner_before) {
      const std::string now = s.pinned_ae_of(key);
      if (now == was || was.empty()) continue;  // unchanged, or newly pinned: no session was granted it
      s.close_raw_key_sessions(key, now.empty()
                                        ? "is no longer pinned (was " + was + "); its next handshake is refused"
                                        : "is now pinned to " + now + " (was " + was + ")");
    }
  }
  // Keep the running sections' shape (the roles were built from it), take the new policy and endpoints.
  if (s.config.peer && config.peer) {
    s.config.peer->policy = config.peer->policy;
    s.config.peer->addresses = config.peer->addresses;
  }
  if (s.config.mef && config.mef) s.config.mef->enrolment_lifetime = config.mef->enrolment_lifetime;
  // A value changes live, setting or removing one waits for a restart (Reload::live_while_set).
  const auto take_while_set = [](auto& running, const auto& fresh) {
    if (!running.empty() && !fresh.empty()) running = fresh;
  };
  if (s.config.enrolee && config.enrolee) {
    for (const LocalAe& fresh : config.enrolee->aes) {
      for (auto& ae : s.config.enrolee->aes) {
        if (ae.id == fresh.id) take_while_set(ae.endpoint, fresh.endpoint);
      }
      LocalAeState* running = s.find_ae(fresh.id);
      if (running == nullptr) continue;  // a new local AE: at the restart
      running->config.local_source = fresh.local_source;
      take_while_set(running->config.endpoint, fresh.endpoint);
      const bool certificate_ae = !running->config.certificate_file.empty() && !fresh.certificate_file.empty();
      take_while_set(running->config.certificate_file, fresh.certificate_file);
      take_while_set(running->config.private_key_file, fresh.private_key_file);
      // The Enrolee reads its device certificate from the store at each attempt (put_key_tables wrote it, also when
      // the file was renewed in place under the same name); the peer endpoint presents the current one from the
      // next handshake.
      if (certificate_ae) s.serve_certificate_of(fresh.id);
    }
  }
  return ok_result();
}

// ---- control verbs -------------------------------------------------------------------------------------------

Result<nlohmann::json> Roles::enrol(const std::string& ae_id) {
  LocalAeState* ae = impl_->find_ae(ae_id);
  if (ae == nullptr || !ae->enrolee) {
    return make_error(Errc::not_found, "enrol: " + crypto::quote_for_error(ae_id) +
                                           " is not a configured local AE ([[enrolee.ae]])");
  }
  if (ae->enrolee->state() == rspf::EnroleeState::enrolling) {
    return nlohmann::json{{"ae_id", ae_id}, {"attempt", ae->attempts_started}, {"state", "enrolling"}};
  }
  impl_->start_enrolment(*ae);
  return nlohmann::json{{"ae_id", ae_id}, {"attempt", ae->attempts_started},
                        {"state", std::string(rspf::to_string(ae->enrolee->state()))}};
}

Result<nlohmann::json> Roles::enrolment_status(const std::string& ae_id) const {
  const LocalAeState* ae = impl_->find_ae(ae_id);
  if (ae == nullptr || !ae->enrolee) {
    return make_error(Errc::not_found, "enrol.status: " + crypto::quote_for_error(ae_id) +
                                           " is not a configured local AE ([[enrolee.ae]])");
  }
  nlohmann::json result{{"ae_id", ae_id},
                        {"state", std::string(rspf::to_string(ae->enrolee->state()))},
                        {"attempts_started", ae->attempts_started},
                        {"attempts_done", ae->attempts_done},
                        {"last_error", ae->last_error ? nlohmann::json(*ae->last_error) : nlohmann::json(nullptr)},
                        {"keId", ae->enrolee->ke_id() ? nlohmann::json(*ae->enrolee->ke_id()) : nlohmann::json(nullptr)},
                        {"enroleeId", ae_id},
                        {"next_attempt_delay_ms", ae->next_attempt_delay_ms},
                        {"next_attempt_at", ae->timer.active() ? ae->next_attempt_at : 0},
                        {"last_enrolled_at", ae->last_enrolled_at},
                        {"last_error_at", ae->last_error ? ae->last_error_at : 0},
                        {"now", unix_now()}};
  if (const auto ke_id = ae->enrolee->ke_id()) {
    if (const auto* record = impl_->store->find<crypto::EnrolmentKeyRecord>(*ke_id)) {
      result["expiry"] = record->expires_at;
    }
  }
  return result;
}

Result<nlohmann::json> Roles::revoke(const std::string& id) {
  if (!impl_->mef) return make_error(Errc::unsupported, "revoke: this dauthd has no [mef] role");
  // A KeID names its MEF after '@'; anything else is tried as a certificate serial (Mef::revoke would refuse it as
  // a malformed KeID, not as not_found).
  auto revoked = id.find('@') != std::string::npos
                     ? impl_->mef->revoke(id)
                     : Result<void>(make_error(Errc::not_found, "revoke: " + crypto::quote_for_error(id) +
                                                                    " is not a KeID"));
  if (!revoked && revoked.error().code == Errc::not_found) {
    auto certificate = impl_->mef->revoke_certificate(id);
    if (certificate) return nlohmann::json{{"id", id}, {"kind", "certificate"}};
    if (certificate.error().code != Errc::not_found) return std::move(certificate).error();
    return make_error(Errc::not_found, "revoke: no enrolment (KeID) or issued certificate (serial) " +
                                           crypto::quote_for_error(id));
  }
  if (!revoked) return std::move(revoked).error();
  return nlohmann::json{{"id", id}, {"kind", "enrolment"}};
}

crypto::KeyStore& Roles::key_store() { return *impl_->store; }
const crypto::KeyStore& Roles::key_store() const { return *impl_->store; }

Result<nlohmann::json> Roles::add_credential(const std::string& given_kpm_id, const std::string& ae_id,
                                             SecretBuffer kpm) {
  Impl& s = *impl_;
  LocalAeState* ae = s.find_ae(ae_id);
  if (ae == nullptr || !ae->enrolee) {
    return make_error(Errc::not_found, "credentials.add: " + crypto::quote_for_error(ae_id) +
                                           " is not a configured local AE; dauthd enrols only the AEs of its "
                                           "configuration: add an [[enrolee.ae]] for it and restart");
  }
  auto canonical = crypto::canonical_kpm_id(given_kpm_id);  // stored and compared in one form (PROTOCOL.md §1)
  if (!canonical) return make_error(Errc::invalid_argument, "credentials.add: " + canonical.error().message);
  const std::string& kpm_id = *canonical;
  // The bootstrap key's rules (PSK AE, well-formed KpmID naming its MEF, not enrolling) are the Enrolee's.
  if (auto acceptable = ae->enrolee->check_bootstrap_key(kpm_id); !acceptable) {
    return make_error(acceptable.error().code, "credentials.add: " + acceptable.error().message);
  }
  if (s.configured_kpm_ids.count(kpm_id)) {
    return make_error(Errc::exists, "credentials.add: KpmID " + kpm_id + " belongs to the configuration "
                                    "([[enrolee.ae]] kpm_id and kpm_file): change that key file and reload, or add "
                                    "the new key under another KpmID");
  }
  const auto* existing = s.store->find<crypto::BootstrapKeyRecord>(kpm_id);
  if (existing && existing->ae_id != ae_id) {
    return make_error(Errc::exists, "credentials.add: KpmID " + kpm_id + " is already the credential of " +
                                        existing->ae_id + " (dauthctl credentials remove " + kpm_id + " first)");
  }
  const std::string fingerprint = kpm.fingerprint();
  const std::string previous = ae->enrolee->kpm_id();
  if (auto r = s.store->put(crypto::BootstrapKeyRecord{kpm_id, std::move(kpm), ae_id}); !r) {
    return make_error(r.error().code, "credentials.add: " + r.error().message);
  }
  if (auto r = ae->enrolee->use_bootstrap_key(kpm_id); !r) {
    if (!existing) (void)s.store->remove(crypto::RecordKind::bootstrap_key, kpm_id);
    return make_error(r.error().code, "credentials.add: " + r.error().message);
  }
  // One credential added at run time per AE: the one it replaces goes (named in the reply and the log).
  nlohmann::json replaced = nullptr;
  if (previous != kpm_id && !s.configured_kpm_ids.count(previous)) {
    if (s.store->remove(crypto::RecordKind::bootstrap_key, previous)) replaced = previous;
  }
  log::notice("credentials: " + kpm_id + " (fingerprint " + fingerprint + ") added for local AE " + ae_id +
              (replaced.is_null() ? std::string() : ", replacing " + previous) + "; the next enrolment uses it");
  return nlohmann::json{{"kpm_id", kpm_id}, {"ae_id", ae_id}, {"fingerprint", fingerprint}, {"replaced", replaced}};
}

Result<nlohmann::json> Roles::remove_credential(const std::string& given_kpm_id) {
  Impl& s = *impl_;
  auto canonical = crypto::canonical_kpm_id(given_kpm_id);  // as add_credential stored it
  const std::string kpm_id = canonical ? *canonical : given_kpm_id;
  if (s.aes.empty()) return make_error(Errc::unsupported, "credentials.remove: no [enrolee] role");
  if (s.configured_kpm_ids.count(kpm_id)) {
    return make_error(Errc::invalid_argument, "credentials.remove: KpmID " + kpm_id + " belongs to the configuration "
                                    "([[enrolee.ae]] kpm_id and kpm_file): remove it there and restart");
  }
  const auto* record = s.store->find<crypto::BootstrapKeyRecord>(kpm_id);
  if (record == nullptr) {
    return make_error(Errc::not_found, "credentials.remove: no bootstrap credential " +
                                           crypto::quote_for_error(kpm_id) + " (dauthctl credentials list)");
  }
  const std::string ae_id = record->ae_id;
  // An AE bootstrapping with it returns to its configured credential.
  nlohmann::json now_uses = nullptr;
  for (auto& ae : s.aes) {
    if (!ae->enrolee || ae->enrolee->kpm_id() != kpm_id) continue;
    if (auto r = ae->enrolee->use_bootstrap_key(ae->config.kpm_id); !r) {
      return make_error(r.error().code, "credentials.remove: " + r.error().message);
    }
    now_uses = ae->config.kpm_id;
  }
  if (auto r = s.store->remove(crypto::RecordKind::bootstrap_key, kpm_id); !r) {
    return make_error(r.error().code, "credentials.remove: " + r.error().message);
  }
  log::notice("credentials: " + kpm_id + " of " + ae_id + " removed" +
              (now_uses.is_null() ? std::string() : "; " + ae_id + " bootstraps with " + now_uses.get<std::string>() +
                                                        " again"));
  return nlohmann::json{{"kpm_id", kpm_id}, {"ae_id", ae_id}, {"now_uses", now_uses}};
}

namespace {

nlohmann::json enrolee_row(const crypto::EnroleeRecord& e, bool configured) {
  const bool psk = !e.kpm.empty();
  return {{"id", e.credential_id},
          {"kind", psk ? "psk" : e.credential_id.rfind("rpk:", 0) == 0 ? "rpk" : "certificate"},
          {"enrolee_id", e.enrolee_id},
          {"targets", e.targets},
          {"lifetime", e.enrolment_lifetime_s},
          {"certificate_enrolment", e.certificate_enrolment},
          {"fingerprint", psk ? nlohmann::json(e.kpm.fingerprint()) : nlohmann::json(nullptr)},
          {"origin", configured ? "configuration" : "dauthctl"}};
}

}  // namespace

namespace {
// A raw key id in the forms operators compare (crypto::canonical_public_key_id takes each).
nlohmann::json key_id_forms(const std::string& key_id) {
  const auto forms = crypto::public_key_id_forms(key_id);
  return {{"key", key_id}, {"sha256", forms.sha256_hex}, {"pin_sha256", forms.pin_sha256}};
}
}  // namespace

nlohmann::json Roles::raw_keys() const {
  nlohmann::json keys = nlohmann::json::array();
  impl_->store->for_each(crypto::RecordKind::certificate, [&](const crypto::Record& r) {
    const auto& record = std::get<crypto::CertificateRecord>(r);
    if (!record.chain_der.empty()) return;
    std::string key_id;
    if (!record.private_key_uri.empty()) {  // in a token: its public half, read there
      auto id = transport::check_token_key(transport::TokenKey{record.private_key_uri, impl_->pkcs11_pin});
      if (!id) return;
      key_id = *std::move(id);
    } else {
      auto key = crypto::PrivateKey::parse(record.private_key_der);
      if (!key) return;
      key_id = key->public_key_id();
    }
    nlohmann::json row = key_id_forms(key_id);
    row["name"] = record.name;
    if (!record.private_key_uri.empty()) row["token"] = record.private_key_uri;
    row["use"] = record.name == kPeerRawKeyName ? "peer endpoint (peer.raw_key)"
                 : record.name == kMefRawKeyName ? "MEF endpoint (mef.raw_key)"
                                                 : "local AE " + record.name + " ([[enrolee.ae]] raw_key)";
    keys.push_back(std::move(row));
  });
  return {{"raw_keys", keys}};
}

nlohmann::json Roles::pinned_keys() const {
  const Impl& s = *impl_;
  nlohmann::json pins = nlohmann::json::array();
  for (const auto& [key, ae_id] : s.configured_pins) {
    nlohmann::json row = key_id_forms(key);
    row["ae_id"] = ae_id;
    row["origin"] = "configuration";
    pins.push_back(std::move(row));
  }
  s.store->for_each(crypto::RecordKind::pinned_key, [&](const crypto::Record& r) {
    const auto& pin = std::get<crypto::PinnedKeyRecord>(r);
    if (s.configured_pins.count(pin.public_key_id)) return;  // the configuration's row decides (Roles::start)
    nlohmann::json row = key_id_forms(pin.public_key_id);
    row["ae_id"] = pin.ae_id;
    row["origin"] = "dauthctl";
    pins.push_back(std::move(row));
  });
  return {{"pins", pins}};
}

Result<nlohmann::json> Roles::add_pin(const std::string& given_key, const std::string& ae_id) {
  Impl& s = *impl_;
  if (!transport::backend_supports_rpk()) {
    return make_error(Errc::unsupported, "rpk.add: raw public keys need the GnuTLS build of dauthd");
  }
  auto key = crypto::canonical_public_key_id(given_key);
  if (!key) return make_error(key.error().code, "rpk.add: " + key.error().message);
  if (auto valid = crypto::validate_ae_id(ae_id); !valid) {
    return make_error(Errc::invalid_argument, "rpk.add: " + valid.error().message);
  }
  if (const auto configured = s.configured_pins.find(*key); configured != s.configured_pins.end()) {
    return make_error(Errc::exists, "rpk.add: " + *key + " is pinned to " + configured->second +
                                        " by the configuration ([[peer.rpk]]): change it there and reload");
  }
  if (const auto* existing = s.store->find<crypto::PinnedKeyRecord>(*key)) {
    if (existing->ae_id == ae_id) return nlohmann::json{{"key", *key}, {"ae_id", ae_id}, {"added", false}};
    return make_error(Errc::exists, "rpk.add: " + *key + " is already pinned to " + existing->ae_id +
                                        " (dauthctl rpk remove " + *key + " first: a key authenticates one AE-ID)");
  }
  if (auto r = s.store->put(crypto::PinnedKeyRecord{*key, ae_id}); !r) {
    return make_error(r.error().code, "rpk.add: " + r.error().message);
  }
  log::notice("peer: raw public key " + *key + " pinned to " + ae_id + " with dauthctl; its next handshake gets in");
  nlohmann::json result = key_id_forms(*key);
  result["ae_id"] = ae_id;
  result["added"] = true;
  return result;
}

Result<nlohmann::json> Roles::remove_pin(const std::string& given_key) {
  Impl& s = *impl_;
  auto key = crypto::canonical_public_key_id(given_key);
  if (!key) return make_error(key.error().code, "rpk.remove: " + key.error().message);
  if (const auto configured = s.configured_pins.find(*key); configured != s.configured_pins.end()) {
    return make_error(Errc::invalid_argument, "rpk.remove: " + *key + " is pinned to " + configured->second +
                                                  " by the configuration ([[peer.rpk]]): remove it there and reload");
  }
  const auto* existing = s.store->find<crypto::PinnedKeyRecord>(*key);
  if (existing == nullptr) {
    return make_error(Errc::not_found, "rpk.remove: " + *key + " is not pinned (dauthctl rpk list)");
  }
  const std::string ae_id = existing->ae_id;
  if (auto r = s.store->remove(crypto::RecordKind::pinned_key, *key); !r) {
    return make_error(r.error().code, "rpk.remove: " + r.error().message);
  }
  // The lookup refuses the key from now on; the sessions it already let in go too.
  s.close_raw_key_sessions(*key, "unpinned from " + ae_id + " with dauthctl; its next handshake is refused");
  return nlohmann::json{{"key", *key}, {"ae_id", ae_id}};
}

nlohmann::json Roles::enrolees() const {
  nlohmann::json rows = nlohmann::json::array();
  impl_->store->for_each(crypto::RecordKind::enrolee, [&](const crypto::Record& r) {
    const auto& e = std::get<crypto::EnroleeRecord>(r);
    rows.push_back(enrolee_row(e, impl_->configured_enrolee_ids.count(e.credential_id) != 0));
  });
  return {{"enrolees", rows}};
}

Result<nlohmann::json> Roles::add_enrolee(const MefEnrolee& row, SecretBuffer kpm) {
  Impl& s = *impl_;
  if (!s.mef || !s.config.mef) return make_error(Errc::unsupported, "enrolees.add: no [mef] role");
  const MefSettings& mef = *s.config.mef;
  // The row rules are rspf's, the same as for a [[mef.enrolee]] row of the configuration (config.cpp).
  rspf::EnroleeRow checked{row.kpm_id,     !kpm.empty(), row.certificate_ae_id,    row.rpk,
                           row.enrolee_id, row.targets,  row.lifetime, row.certificate_enrolment};
  const rspf::MefOffer offer{mef.fqdn, !mef.certificate_file.empty() && !mef.device_ca.empty(),
                             !mef.issuing_ca_certificate.empty(), !mef.raw_key.empty()};
  if (const auto problems = rspf::check_enrolee_row(checked, offer); !problems.empty()) {
    std::string why;
    for (const auto& problem : problems) why += (why.empty() ? "" : "; ") + problem.field + ": " + problem.message;
    return make_error(Errc::invalid_argument, "enrolees.add: " + why);
  }
  const bool psk = row.certificate_ae_id.empty() && row.rpk.empty();
  crypto::EnroleeRecord record;
  // The Mef's name for an X.509 session is "cert:<AE-ID>", for a raw-key session "rpk:<key id>" (rspf/mef.hpp).
  // A KpmID in the form the Mef looks its PSK identities up in (checked above, so canonical_kpm_id succeeds).
  record.credential_id = psk                        ? crypto::canonical_kpm_id(row.kpm_id).value()
                         : !row.certificate_ae_id.empty() ? "cert:" + row.certificate_ae_id
                                                          : "rpk:" + crypto::canonical_public_key_id(row.rpk).value();
  if (s.configured_enrolee_ids.count(record.credential_id)) {
    return make_error(Errc::exists, "enrolees.add: " + record.credential_id + " belongs to the configuration "
                                    "([[mef.enrolee]]): change it there and reload");
  }
  if (s.store->find<crypto::EnroleeRecord>(record.credential_id)) {
    return make_error(Errc::exists, "enrolees.add: " + record.credential_id + " is already in the enrolee table "
                                    "(dauthctl enrolees remove " + record.credential_id + " first)");
  }
  record.kpm = std::move(kpm);
  record.enrolee_id = row.enrolee_id;
  record.targets = row.targets;
  record.enrolment_lifetime_s = row.lifetime != 0 ? row.lifetime : mef.enrolment_lifetime;
  record.certificate_enrolment = row.certificate_enrolment;
  nlohmann::json result = enrolee_row(record, false);
  if (auto r = s.store->put(std::move(record)); !r) return make_error(r.error().code, "enrolees.add: " + r.error().message);
  log::notice("mef: enrolee " + result["id"].get<std::string>() + " (AE-ID " + row.enrolee_id + ") added with dauthctl" +
              (psk ? ", Kpm fingerprint " + result["fingerprint"].get<std::string>() : std::string()));
  return result;
}

Result<nlohmann::json> Roles::remove_enrolee(const std::string& given_id) {
  Impl& s = *impl_;
  auto canonical = crypto::canonical_kpm_id(given_id);  // a KpmID as add_enrolee stored it; "cert:..." as given
  const std::string id = canonical ? *canonical : given_id;
  if (!s.mef) return make_error(Errc::unsupported, "enrolees.remove: no [mef] role");
  if (s.configured_enrolee_ids.count(id)) {
    return make_error(Errc::invalid_argument, "enrolees.remove: " + id + " belongs to the configuration ([[mef.enrolee]]): "
                                    "remove it there and reload");
  }
  const auto* record = s.store->find<crypto::EnroleeRecord>(id);
  if (record == nullptr) {
    return make_error(Errc::not_found, "enrolees.remove: no enrolee " + crypto::quote_for_error(id) +
                                           " in the enrolee table (dauthctl enrolees list)");
  }
  const std::string enrolee_id = record->enrolee_id;
  if (auto r = s.store->remove(crypto::RecordKind::enrolee, id); !r) {
    return make_error(r.error().code, "enrolees.remove: " + r.error().message);
  }
  log::notice("mef: enrolee " + id + " (AE-ID " + enrolee_id + ") removed with dauthctl; its enrolments stay valid "
              "until they expire or are revoked");
  return nlohmann::json{{"id", id}, {"enrolee_id", enrolee_id}};
}

nlohmann::json Roles::credentials() const {
  nlohmann::json rows = nlohmann::json::array();
  const auto& store = *impl_->store;
  store.for_each(crypto::RecordKind::bootstrap_key, [&](const crypto::Record& r) {
    const auto& b = std::get<crypto::BootstrapKeyRecord>(r);
    rows.push_back({{"kind", "bootstrap"}, {"id", b.kpm_id}, {"ae_id", b.ae_id}, {"fingerprint", b.kpm.fingerprint()}});
  });
  store.for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& r) {
    const auto& e = std::get<crypto::EnrolmentKeyRecord>(r);
    rows.push_back({{"kind", "enrolment"}, {"id", e.ke_id}, {"ae_id", e.enrolee_id}, {"expires_at", e.expires_at},
                    {"revoked_at", e.revoked_at}, {"fingerprint", e.ke.fingerprint()}});
  });
  store.for_each(crypto::RecordKind::session_key, [&](const crypto::Record& r) {
    const auto& k = std::get<crypto::SessionKeyRecord>(r);
    // suid 22: the SAEF key of a peer session; 23: the ESPrim key (PROTOCOL.md §7). One KeID may hold both.
    rows.push_back({{"kind", "session"}, {"id", k.ke_id}, {"suid", k.suid}, {"ae_id", k.local_ae_id},
                    {"peer", k.peer_ae_id}, {"expires_at", k.expires_at}, {"fingerprint", k.key.fingerprint()}});
  });
  store.for_each(crypto::RecordKind::certificate, [&](const crypto::Record& r) {
    const auto& c = std::get<crypto::CertificateRecord>(r);
    rows.push_back({{"kind", "certificate"}, {"id", c.name}, {"expires_at", c.expires_at}});
  });
  if (impl_->mef) {
    store.for_each(crypto::RecordKind::enrolee, [&](const crypto::Record& r) {
      const auto& e = std::get<crypto::EnroleeRecord>(r);
      rows.push_back({{"kind", "enrolee"}, {"id", e.credential_id}, {"ae_id", e.enrolee_id},
                      {"fingerprint", e.kpm.empty() ? std::string() : e.kpm.fingerprint()}});
    });
  }
  return {{"credentials", rows}};
}

namespace {

std::int64_t unix_seconds(std::chrono::system_clock::time_point at) {
  return std::chrono::duration_cast<std::chrono::seconds>(at.time_since_epoch()).count();
}

// The key of Impl::seen for a live session (note_session's key).
std::string seen_key(const transport::SessionSummary& live) {
  return std::string(live.client ? "out" : "in") + " " + live.remote_address + " " + live.peer.value;
}

}  // namespace

std::string Roles::Impl::peer_at(const std::string& remote_address) const {
  for (const auto& [ae_id, p] : peers) {
    if (p.address && transport::host_port_text(p.address->host, p.address->port) == remote_address) return ae_id;
  }
  return {};
}

void Roles::Impl::forget_ended_sessions() {
  std::set<std::string> live_keys;
  if (peer_driver) {
    for (const auto& live : peer_driver->node->live_sessions()) live_keys.insert(seen_key(live));
  }
  for (auto it = seen.begin(); it != seen.end();) it = live_keys.count(it->first) ? std::next(it) : seen.erase(it);
}

nlohmann::json Roles::sessions() const {
  Impl& s = *impl_;
  s.forget_ended_sessions();
  nlohmann::json rows = nlohmann::json::array();
  if (s.peer_driver) {
    // Live DTLS sessions only (transport's list), with the requests dauthd proxied over each (`seen`).
    for (const auto& live : s.peer_driver->node->live_sessions()) {
      if (!live.secure) continue;
      const auto noted = s.seen.find(seen_key(live));
      const SeenSession* carried = noted == s.seen.end() ? nullptr : &noted->second;
      rows.push_back({{"direction", live.client ? "out" : "in"},
                      {"peer_ae_id", carried ? carried->peer_ae_id
                                             : (live.client ? s.peer_at(live.remote_address) : live.grant.peer_ae_id)},
                      {"local_ae_id", live.grant.local_ae_id},
                      {"identity", live.client ? live.credential_id : live.peer.value},
                      {"kind", std::string(transport::to_string(live.peer.kind))},
                      {"remote", live.remote_address},
                      {"cipher", live.cipher_suite},
                      {"created", unix_seconds(live.created)},
                      {"last_used", unix_seconds(live.last_received)},
                      {"requests", carried ? carried->requests : 0}});
    }
  }
  nlohmann::json live = nullptr;
  if (impl_->peer_driver) {
    const auto stats = impl_->peer_driver->node->stats();
    live = {{"server_sessions", stats.live_server_sessions}, {"client_sessions", stats.live_client_sessions},
            {"handshakes_in_progress", stats.live_server_handshakes}};
  }
  return {{"sessions", rows}, {"live", live}};
}

// dauthctl show (docs/control-protocol.md "show"): per local AE, per remote AE and, on an MEF, per enrolee: who,
// with which credential until when, live sessions, the latest handshake, request, success and failure with its
// reason. Times are unix seconds, 0 = never; "" = none. One place: dauthctl's show, dump and --json all print this.
nlohmann::json Roles::show() const {
  Impl& s = *impl_;
  const auto live = s.peer_driver ? s.peer_driver->node->live_sessions() : std::vector<transport::SessionSummary>{};

  nlohmann::json local_aes = nlohmann::json::array();
  for (const auto& ae : s.aes) {
    const auto ke_id = ae->enrolee ? ae->enrolee->ke_id() : std::nullopt;
    std::int64_t expires_at = 0;
    if (ke_id) {
      if (const auto* record = s.store->find<crypto::EnrolmentKeyRecord>(*ke_id)) expires_at = record->expires_at;
    }
    // Peer sessions only: out with its KeID to a configured peer (not its key retrievals from the MEF), or in.
    std::size_t sessions = 0;
    for (const auto& session : live) {
      if (!session.secure) continue;
      if (session.client ? ke_id && session.credential_id == *ke_id && !s.peer_at(session.remote_address).empty()
                         : session.grant.local_ae_id == ae->config.id) {
        ++sessions;
      }
    }
    const bool psk = !ae->config.kpm_id.empty();
    local_aes.push_back({{"ae_id", ae->config.id},
                         {"credential_kind", psk ? "psk" : "certificate"},
                         {"credential", ae->enrolee && psk ? ae->enrolee->kpm_id() : ae->config.certificate_file.string()},
                         {"state", ae->enrolee ? std::string(rspf::to_string(ae->enrolee->state())) : "none"},
                         {"ke_id", ke_id ? *ke_id : std::string()},
                         {"expires_at", expires_at},
                         {"next_attempt_at", ae->timer.active() ? ae->next_attempt_at : 0},
                         {"last_enrolled_at", ae->last_enrolled_at},
                         {"last_request_at", ae->last_request_at},
                         {"last_failure_at", ae->last_error ? ae->last_error_at : 0},
                         {"last_failure", ae->last_error.value_or("")},
                         {"attempts", ae->attempts_started},
                         {"sessions", sessions}});
  }

  // Configured peers first, then the AEs that reached us without being configured (incoming sessions).
  std::map<std::string, nlohmann::json> peers;
  auto peer_row = [&](const std::string& ae_id) -> nlohmann::json& {
    auto [it, added] = peers.try_emplace(ae_id);
    if (added) {
      const auto known = s.peers.find(ae_id);
      const PeerState* p = known == s.peers.end() ? nullptr : &known->second;
      const auto noted = s.peer_activity.find(ae_id);
      const PeerActivity none;
      const PeerActivity& a = noted == s.peer_activity.end() ? none : noted->second;
      it->second = {{"ae_id", ae_id},
                    {"address", p ? p->address_text : std::string()},
                    {"credential", p ? p->credential : std::string()},
                    {"sessions", 0},
                    {"last_handshake_at", a.last_handshake_at},
                    {"last_request_at", a.last_request_at},
                    {"last_success_at", a.last_success_at},
                    {"last_failure_at", a.last_failure_at},
                    {"last_failure", a.last_failure},
                    {"requests", p ? p->requests : 0},
                    {"failures", p ? p->failures : 0}};
    }
    return it->second;
  };
  for (const auto& [ae_id, p] : s.peers) peer_row(ae_id);
  for (const auto& [ae_id, a] : s.peer_activity) peer_row(ae_id);
  for (const auto& session : live) {
    if (!session.secure) continue;
    // Outgoing: the session to a configured peer's address; incoming: the AE its handshake authenticated.
    const std::string ae_id = session.client ? s.peer_at(session.remote_address) : session.grant.peer_ae_id;
    if (ae_id.empty()) continue;
    auto& row = peer_row(ae_id);
    row["sessions"] = row["sessions"].get<std::size_t>() + 1;
    row["last_handshake_at"] = std::max(row["last_handshake_at"].get<std::int64_t>(), unix_seconds(session.created));
  }
  nlohmann::json peer_rows = nlohmann::json::array();
  for (auto& [ae_id, row] : peers) peer_rows.push_back(std::move(row));

  nlohmann::json enrolees = nullptr;
  if (s.mef) {
    enrolees = nlohmann::json::array();
    // Live enrolments (not revoked, not expired) per enrolee, and the one that expires last.
    struct Enrolments {
      std::size_t valid = 0;
      std::int64_t expires_at = 0;
    };
    std::map<std::string, Enrolments> by_enrolee;
    const std::int64_t now = unix_now();
    s.store->for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& r) {
      const auto& e = std::get<crypto::EnrolmentKeyRecord>(r);
      if (e.revoked_at != 0 || e.expires_at <= now) return;
      auto& entry = by_enrolee[e.enrolee_id];
      ++entry.valid;
      entry.expires_at = std::max(entry.expires_at, e.expires_at);
    });
    const auto& activity = s.mef->activity();
    s.store->for_each(crypto::RecordKind::enrolee, [&](const crypto::Record& r) {
      const auto& e = std::get<crypto::EnroleeRecord>(r);
      const auto seen = activity.find(e.enrolee_id);
      const rspf::EnroleeActivity none;
      const rspf::EnroleeActivity& a = seen == activity.end() ? none : seen->second;
      const auto valid = by_enrolee.find(e.enrolee_id);
      enrolees.push_back({{"id", e.credential_id},
                          {"enrolee_id", e.enrolee_id},
                          {"kind", e.kpm.empty() ? "certificate" : "psk"},
                          {"enrolments", valid == by_enrolee.end() ? 0 : valid->second.valid},
                          {"expires_at", valid == by_enrolee.end() ? 0 : valid->second.expires_at},
                          {"last_ke_id", a.last_ke_id},
                          {"last_seen_at", a.last_seen_at},
                          {"last_enrolled_at", a.last_enrolled_at},
                          {"last_failure_at", a.last_failure_at},
                          {"last_failure", a.last_failure},
                          {"failures", a.failures}});
    });
  }
  return {{"local_aes", local_aes}, {"peers", peer_rows}, {"enrolees", enrolees}};
}

nlohmann::json Roles::peers() const {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& [ae_id, p] : impl_->peers) {
    rows.push_back({{"ae_id", ae_id}, {"address", p.address_text}, {"credential", p.credential},
                    {"resolved", p.address ? p.address->host + ":" + std::to_string(p.address->port) : ""},
                    {"requests", p.requests}, {"failures", p.failures}, {"retries", p.retries},
                    {"last_outcome", p.last_outcome}, {"last_at", p.last_at}});
  }
  return {{"peers", rows}};
}

void Roles::stats(MetricSet& out) const {
  const Impl& s = *impl_;
  const std::int64_t now = unix_now();
  // Role counters (Impl::count) are reported from zero for the roles that count them, so that a series exists
  // before its first event.
  const auto role_counters = [&](std::initializer_list<const char*> names) {
    for (const char* name : names) {
      const auto it = s.counters.find(std::string(name).substr(6));  // counted without the "dauth_" prefix
      out.add(name, it == s.counters.end() ? 0 : it->second);
    }
  };
  if (!s.aes.empty()) {
    role_counters({"dauth_enrolments_started_total", "dauth_enrolments_succeeded_total",
                   "dauth_enrolments_failed_total"});
  }
  if (s.peer_driver && s.config.enrolee) {
    role_counters({"dauth_proxy_requests_total", "dauth_proxy_forwarded_total", "dauth_proxy_rejected_total",
                   "dauth_proxy_retries_total", "dauth_proxy_failed_total"});
  }
  if (s.peer_driver) {
    role_counters({"dauth_peer_requests_total", "dauth_peer_rejected_total", "dauth_peer_impersonation_total",
                   "dauth_peer_denied_total", "dauth_peer_delivered_total", "dauth_peer_delivery_failed_total"});
  }
  if (s.target_keys) role_counters({"dauth_key_fetches_succeeded_total", "dauth_key_fetches_failed_total"});
  if (s.peer_driver && s.config.enrolee) {
    role_counters({"dauth_esprim_sent_total", "dauth_esprim_answered_total", "dauth_esprim_failed_total",
                   "dauth_esprim_answers_rejected_total", "dauth_esprim_rand_requests_total"});
  }
  if (s.esprim_receiver) {
    role_counters({"dauth_esprim_requests_total", "dauth_esprim_accepted_total", "dauth_esprim_refused_total",
                   "dauth_esprim_impersonation_total", "dauth_esprim_rand_objects_handed_total"});
    const auto esprim = s.esprim_receiver->stats();
    out.add("dauth_esprim_sessions", esprim.sessions);
    out.add("dauth_esprim_rand_objects", esprim.live_rand_objects);
  }
  // The relay path (relay.cpp): refusals also count hop sessions' non-ESPrim requests, so with any peer endpoint.
  if (s.peer_driver) {
    role_counters({"dauth_relay_forwarded_total", "dauth_relay_refused_total", "dauth_relay_failed_total"});
  }

  for (const auto& driver : s.drivers) {
    const auto n = driver->node->stats();
    const MetricLabels node{{"node", driver->name}};
    out.add("dauth_handshakes_completed_total", node, n.handshakes_completed);
    out.add("dauth_handshakes_failed_total", node, n.handshakes_failed);
    out.add("dauth_handshakes_restarted_total", node, n.handshakes_restarted);
    out.add("dauth_requests_served_total", node, n.requests_served);
    out.add("dauth_requests_rejected_total", node, n.requests_rejected);
    out.add("dauth_client_requests_failed_total", node, n.client_requests_failed);
    out.add("dauth_server_sessions", node, n.live_server_sessions);
    out.add("dauth_client_sessions", node, n.live_client_sessions);
    for (const auto kind : {transport::FailureKind::handshake_failed, transport::FailureKind::handshake_timeout,
                            transport::FailureKind::request_rejected, transport::FailureKind::request_failed,
                            transport::FailureKind::limit}) {
      const auto it = driver->failures.find(kind);
      out.add("dauth_transport_failures_total",
              {{"node", driver->name}, {"kind", std::string(transport::to_string(kind))}},
              it == driver->failures.end() ? 0 : it->second);
    }
  }

  // Local AEs: configured ones only, so the series are bounded by the configuration.
  const auto expiry = [&](const char* kind, const std::string& owner, std::int64_t expires_at) {
    out.add("dauth_credential_expires_in_seconds", {{"kind", kind}, {"owner", owner}}, expires_at - now);
  };
  for (const auto& ae : s.aes) {
    const std::string& id = ae->config.id;
    out.add("dauth_enrolment_attempts_total", {{"ae", id}}, ae->attempts_started);
    out.add("dauth_enrolment_failures_total", {{"ae", id}}, ae->attempts_failed);
    for (const auto state : {rspf::EnroleeState::idle, rspf::EnroleeState::enrolling, rspf::EnroleeState::enrolled,
                             rspf::EnroleeState::failed}) {
      out.add("dauth_enrolment_state", {{"ae", id}, {"state", std::string(rspf::to_string(state))}},
              ae->enrolee && ae->enrolee->state() == state ? 1 : 0);
    }
    if (const auto ke_id = ae->enrolee ? ae->enrolee->ke_id() : std::nullopt) {
      if (const auto* record = s.store->find<crypto::EnrolmentKeyRecord>(*ke_id)) {
        expiry("enrolment_key", id, record->expires_at);
      }
    }
    // The certificate x509_of_local_ae() presents: the one issued over EST while valid, else the device's.
    const crypto::CertificateRecord* certificate = s.store->find<crypto::CertificateRecord>(id);
    if (certificate == nullptr || certificate->chain_der.empty() || certificate->expires_at <= now) {
      if (const auto* device = s.store->find<crypto::CertificateRecord>(device_certificate_name(id))) {
        certificate = device;
      }
    }
    if (certificate != nullptr && !certificate->chain_der.empty()) expiry("certificate", id, certificate->expires_at);
  }
  if (s.mef) {
    const std::string& fqdn = s.config.mef->fqdn;
    if (s.mef_certificate_expires_at != 0) expiry("mef_certificate", fqdn, s.mef_certificate_expires_at);
    if (s.mef_issuing_ca_expires_at != 0) expiry("mef_issuing_ca", fqdn, s.mef_issuing_ca_expires_at);
    // Counts by state, not one series per KeID or serial: an MEF issues without a bound the configuration sets.
    const auto by_state = [&](const char* metric, crypto::RecordKind kind, auto times) {
      std::uint64_t valid = 0;
      std::uint64_t expired = 0;
      std::uint64_t revoked = 0;
      s.store->for_each(kind, [&](const crypto::Record& r) {
        const auto [expires_at, revoked_at] = times(r);
        if (revoked_at != 0) {
          ++revoked;
        } else if (expires_at <= now) {
          ++expired;
        } else {
          ++valid;
        }
      });
      out.add(metric, {{"state", "valid"}}, valid);
      out.add(metric, {{"state", "expired"}}, expired);
      out.add(metric, {{"state", "revoked"}}, revoked);
    };
    by_state("dauth_mef_enrolment_keys", crypto::RecordKind::enrolment_key, [](const crypto::Record& r) {
      const auto& e = std::get<crypto::EnrolmentKeyRecord>(r);
      return std::pair{e.expires_at, e.revoked_at};
    });
    by_state("dauth_mef_issued_certificates", crypto::RecordKind::issuance, [](const crypto::Record& r) {
      const auto& i = std::get<crypto::IssuanceRecord>(r);
      return std::pair{i.expires_at, i.revoked_at};
    });
  }

  // Configured peers (peer.address): the proxy's view of each.
  for (const auto& [ae_id, p] : s.peers) {
    const MetricLabels peer{{"peer", ae_id}};
    out.add("dauth_proxy_peer_requests_total", peer, p.requests);
    out.add("dauth_proxy_peer_failures_total", peer, p.failures);
    out.add("dauth_proxy_peer_retries_total", peer, p.retries);
    out.add("dauth_proxy_peer_in_flight", peer, *p.in_flight);
  }

  if (s.target_keys) out.add("dauth_key_fetches_pending", s.target_keys->fetches_pending());
  if (s.revocations) {
    out.add("dauth_revocation_lists_applied_total", s.revocations->notifications());
    out.add("dauth_revoked_certificates", s.revocations->revoked_count());
  }
  out.add("dauth_keystore_records", s.store->size());
  // The disk's share of every durable write (each put/remove waits for one journal fdatasync).
  const auto syncs = s.store->sync_stats();
  out.add("dauth_keystore_fdatasync_total", syncs.syncs);
  out.add("dauth_keystore_durable_entries_total", syncs.entries);  // more than the syncs when group commit shared
  out.add("dauth_keystore_fdatasync_seconds_total", std::chrono::duration<double>(syncs.time).count());
}

nlohmann::json Roles::ports() const {
  nlohmann::json out = nlohmann::json::object();
  if (impl_->mef_driver) out["mef"] = impl_->mef_driver->node->secure_port();
  if (impl_->peer_driver) {
    out["peer"] = impl_->peer_driver->node->secure_port();
    if (impl_->config.enrolee) out["local"] = impl_->peer_driver->node->local_port();
  }
  return out;
}

// ---- drain (SIGTERM) -------------------------------------------------------------------------------------------

void Roles::begin_drain() {
  impl_->draining = true;
  for (auto& ae : impl_->aes) ae->timer.reset();  // no renewal or backoff attempt starts during the drain
}

bool Roles::idle() const {
  for (const auto& ae : impl_->aes) {
    if (ae->enrolee && ae->enrolee->state() == rspf::EnroleeState::enrolling) return false;
  }
  return impl_->in_flight->unanswered().empty();
}

std::vector<std::string> Roles::pending() const {
  std::vector<std::string> out;
  for (const auto& ae : impl_->aes) {
    if (ae->enrolee && ae->enrolee->state() == rspf::EnroleeState::enrolling) {
      out.push_back("enrolment of " + ae->config.id + " with the MEF");
    }
  }
  for (auto& what : impl_->in_flight->unanswered()) out.push_back(std::move(what));
  return out;
}

std::size_t Roles::abandon_in_flight() {
  // The refusal body of every dauth answer (PROTOCOL.md §2); no oneM2M-RSC: stock clients reject it (proxy.cpp).
  const transport::Response response = rspf::refusal_response(
      503, make_error(Errc::timeout, "dauthd is shutting down (daemon.shutdown_timeout reached); retry later"));
  const std::size_t answered = impl_->in_flight->answer_unanswered(response);
  if (answered != 0) impl_->after_io();  // deferred answers leave on the Nodes' next round
  return answered;
}

}  // namespace dauth::daemon

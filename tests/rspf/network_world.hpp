// A small world for the rspf network tests: an MEF, a meter (Enrolee A) and a valve (Enrolee B and Enrolment
// Target), each a real transport::Node with real DTLS on loopback and a real KeyStore in its own TempDir, all
// driven from the test thread.
#pragma once

#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ctime>
#include <stdexcept>

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dauth/crypto/keystore.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/rspf/enrolee.hpp"
#include "dauth/rspf/mef.hpp"
#include "dauth/rspf/target_keys.hpp"
#include "loopback_ports.hpp"
#include "support.hpp"

namespace dauth::test {

using namespace std::chrono_literals;

// Drives `nodes` (others stay paused: their datagrams wait in their sockets) until done() or max; each_round runs
// after every round.
inline bool pump_nodes(const std::vector<transport::Node*>& nodes, const std::function<bool()>& done,
                       std::chrono::milliseconds max = 8000ms, const std::function<void()>& each_round = {}) {
  const int epoll = ::epoll_create1(EPOLL_CLOEXEC);
  for (auto* node : nodes) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = node->fd();
    ::epoll_ctl(epoll, EPOLL_CTL_ADD, node->fd(), &event);
  }
  const auto end = std::chrono::steady_clock::now() + max;
  while (!done() && std::chrono::steady_clock::now() < end) {
    epoll_event event{};
    (void)::epoll_wait(epoll, &event, 1, 20);
    for (auto* node : nodes) node->process_ready();
    if (each_round) each_round();
  }
  ::close(epoll);
  return done();
}

inline constexpr const char* kMefFqdn = "mef.example.net";
inline constexpr const char* kMeterKpmId = "meter@mef.example.net";
inline constexpr const char* kValveKpmId = "valve@mef.example.net";
inline constexpr std::int64_t kMeterLifetime = 600;
inline constexpr std::int64_t kValveLifetime = 3600;

struct TestClock {
  std::int64_t now = static_cast<std::int64_t>(std::time(nullptr));
  rspf::UnixClock function() {
    return [this] { return now; };
  }
};

struct LogLines {
  std::vector<std::string> lines;
  rspf::LogSink sink() {
    return [this](rspf::LogKind, const std::string&, const std::string& line) { lines.push_back(line); };
  }
  bool contains(const std::string& text) const {
    for (const auto& line : lines) {
      if (line.find(text) != std::string::npos) return true;
    }
    return false;
  }
  std::size_t count(const std::string& text) const {
    std::size_t n = 0;
    for (const auto& line : lines) n += line.find(text) != std::string::npos ? 1 : 0;
    return n;
  }
};

// An MEF's issuing CA built from another authority's certificate and key (MefConfig::ca takes its own copy).
inline crypto::CertificateAuthority copy_of_authority(const crypto::CertificateAuthority& authority) {
  return crypto::CertificateAuthority::from(crypto::Certificate::parse(ByteView(authority.certificate().der())).value(),
                                            crypto::PrivateKey::parse(authority.key().to_der().value()).value())
      .value();
}

inline crypto::KeyStore open_store(const std::filesystem::path& dir, const SecretBuffer& master_key) {
  std::filesystem::create_directories(dir);
  ::chmod(dir.c_str(), 0700);
  auto store = crypto::KeyStore::open(dir, master_key.clone());
  if (!store.ok()) throw std::runtime_error("key store: " + store.error().to_string());
  return std::move(*store);
}

inline transport::Limits quick_limits() {
  transport::Limits limits;
  limits.handshake_timeout = 1500ms;  // the wrong-Kpm case waits for this: no alert is sent (docs/transport.md §3)
  limits.request_timeout = 4000ms;
  return limits;
}

// secure_port 0: any port the kernel picks (the Node reports it).
inline std::unique_ptr<transport::Node> make_node(std::optional<transport::PskLookup> server_lookup,
                                                  std::vector<transport::Failure>* failures,
                                                  std::uint16_t secure_port = 0) {
  transport::NodeConfig config;
  if (server_lookup) {
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = secure_port;
    config.psk_lookup = std::move(*server_lookup);
  }
  config.limits = quick_limits();
  auto node = transport::Node::create(std::move(config));
  if (!node.ok()) throw std::runtime_error("node: " + node.error().to_string());
  (*node)->set_failure_observer([failures](const transport::Failure& f) { failures->push_back(f); });
  return std::move(*node);
}

struct World {
  TempDir dir;
  SecretBuffer master_key = SecretBuffer::random(crypto::kMasterKeySize);
  TestClock clock;
  LogLines log;
  std::vector<transport::Failure> failures;
  SecretBuffer meter_kpm = SecretBuffer::random(32);
  SecretBuffer valve_kpm = SecretBuffer::random(32);
  std::optional<crypto::Certificate> ca_certificate;

  // MEF
  std::optional<crypto::KeyStore> mef_store;
  rspf::PskLookupSlot mef_slot;
  std::unique_ptr<transport::Node> mef_node;
  std::unique_ptr<rspf::Mef> mef;
  // meter: Enrolee A (client only)
  std::optional<crypto::KeyStore> meter_store;
  std::unique_ptr<transport::Node> meter_node;
  std::unique_ptr<rspf::Enrolee> meter;
  // valve: Enrolee B and the Enrolment Target's server
  std::optional<crypto::KeyStore> valve_store;
  rspf::PskLookupSlot valve_slot;
  std::unique_ptr<transport::Node> valve_node;
  std::unique_ptr<rspf::Enrolee> valve;
  std::unique_ptr<rspf::TargetKeys> valve_keys;

  // observe_feed: the valve's TargetKeys subscribes to the MEF's /fetchCredentials feed (off by default, so that
  // the tests of on-demand retrieval see the first handshake refused). session_key_lifetime_s: the MEF's
  // MefConfig::session_key_lifetime_s (0: its default).
  explicit World(bool with_ca = false, bool observe_feed = false, std::int64_t session_key_lifetime_s = 0) {
    mef_store.emplace(open_store(dir / "mef", master_key));
    put(*mef_store, enrolee_row(kMeterKpmId, meter_kpm, "CAE-meter", {"CAE-valve"}, kMeterLifetime, true));
    put(*mef_store, enrolee_row(kValveKpmId, valve_kpm, "CAE-valve", {}, kValveLifetime, false));
    // A port no other test takes while this MEF is down: tests restart it on the same one.
    mef_node = make_node(mef_slot.lookup(), &failures, free_loopback_port());
    rspf::MefConfig config;
    config.fqdn = kMefFqdn;
    config.clock = clock.function();
    config.log = log.sink();
    if (session_key_lifetime_s != 0) config.session_key_lifetime_s = session_key_lifetime_s;
    if (with_ca) {
      auto key = crypto::PrivateKey::generate_p256();
      auto ca = crypto::CertificateAuthority::create_self_signed(std::move(*key), "CN=Test MEF CA", clock.now - 3600,
                                                                 clock.now + 10 * 365 * 86400);
      if (!ca.ok()) throw std::runtime_error("CA: " + ca.error().to_string());
      ca_certificate.emplace(crypto::Certificate::parse(ByteView(ca->certificate().der())).value());
      config.ca.emplace(std::move(*ca));
    }
    mef = rspf::Mef::create(*mef_node, *mef_store, std::move(config)).value();
    mef_slot.bind(mef->psk_lookup());

    meter_store.emplace(open_store(dir / "meter", master_key));
    put(*meter_store, crypto::BootstrapKeyRecord{kMeterKpmId, meter_kpm.clone(), "CAE-meter"});
    meter_node = make_node(std::nullopt, &failures);
    meter = make_enrolee(*meter_node, *meter_store, kMeterKpmId, with_ca);

    valve_store.emplace(open_store(dir / "valve", master_key));
    put(*valve_store, crypto::BootstrapKeyRecord{kValveKpmId, valve_kpm.clone(), "CAE-valve"});
    valve_node = make_node(valve_slot.lookup(), &failures);
    valve = make_enrolee(*valve_node, *valve_store, kValveKpmId, false);
    rspf::TargetKeysConfig target;
    target.local_ae_id = "CAE-valve";
    target.clock = clock.function();
    target.log = log.sink();
    target.observe_feed = observe_feed;
    target.jitter = [] { return 0.0; };
    valve_keys = rspf::TargetKeys::create(*valve_node, *valve_store, std::move(target)).value();
    rspf::Enrolee* valve_enrolee = valve.get();
    (void)valve_keys->add_mef(kMefFqdn, rspf::MefContact{mef_address(), [valve_enrolee] {
                                                           return valve_enrolee->mef_credentials();
                                                         }});
    valve_slot.bind(valve_keys->psk_lookup());
    // The target's application resource: answers with the identity the DTLS session authenticated.
    valve_node->add_route(transport::Method::get, {"temp"}, transport::Access::secure,
                          [](const transport::Session& session, const transport::Request&, transport::Responder out) {
                            out.respond(transport::Response::with_text(205, session.peer().value));
                          });
  }

  ~World() {
    mef_slot.unbind();
    valve_slot.unbind();
  }

  static crypto::EnroleeRecord enrolee_row(const std::string& kpm_id, const SecretBuffer& kpm, const std::string& ae,
                                           std::vector<std::string> targets, std::int64_t lifetime, bool certs) {
    crypto::EnroleeRecord row;
    row.credential_id = kpm_id;
    row.kpm = kpm.clone();
    row.enrolee_id = ae;
    row.targets = std::move(targets);
    row.enrolment_lifetime_s = lifetime;
    row.certificate_enrolment = certs;
    return row;
  }

  static void put(crypto::KeyStore& store, crypto::Record record) {
    auto stored = store.put(std::move(record));
    if (!stored.ok()) throw std::runtime_error("put: " + stored.error().to_string());
  }

  transport::Peer mef_address() const { return transport::Peer{"127.0.0.1", mef_node->secure_port()}; }
  transport::Peer valve_address() const { return transport::Peer{"127.0.0.1", valve_node->secure_port()}; }

  // mef_port: where the Enrolee sends (e.g. an impairment relay in front of the MEF); 0 = the MEF itself.
  std::unique_ptr<rspf::Enrolee> make_enrolee(transport::Node& node, crypto::KeyStore& store, const std::string& kpm_id,
                                              bool certificate, std::uint16_t mef_port = 0) {
    rspf::EnroleeConfig config;
    config.kpm_id = kpm_id;
    config.mef_address = mef_address();
    if (mef_port != 0) config.mef_address.port = mef_port;
    config.request_certificate = certificate;
    config.clock = clock.function();
    config.log = log.sink();
    auto enrolee = rspf::Enrolee::create(node, store, std::move(config));
    if (!enrolee.ok()) throw std::runtime_error("enrolee: " + enrolee.error().to_string());
    return std::move(*enrolee);
  }

  // Drives every node until done() or max. The target's retrievals start from its own posted work (Node::post).
  bool pump(const std::function<bool()>& done, std::chrono::milliseconds max = 8000ms) {
    return pump_nodes({mef_node.get(), meter_node.get(), valve_node.get()}, done, max);
  }

  // A second local AE on the valve's node, served as a target next to the valve: enrolled with the MEF under its
  // own KpmID, and the meter's enrolee row names both as targets. Returns its Enrolee (not yet enrolled).
  std::unique_ptr<rspf::Enrolee> add_second_target(const std::string& kpm_id, const std::string& ae_id) {
    SecretBuffer kpm = SecretBuffer::random(32);
    put(*mef_store, enrolee_row(kMeterKpmId, meter_kpm, "CAE-meter", {"CAE-valve", ae_id}, kMeterLifetime, false));
    put(*mef_store, enrolee_row(kpm_id, kpm, ae_id, {}, kValveLifetime, false));
    put(*valve_store, crypto::BootstrapKeyRecord{kpm_id, kpm.clone(), ae_id});
    auto enrolee = make_enrolee(*valve_node, *valve_store, kpm_id, false);
    rspf::Enrolee* raw = enrolee.get();
    auto added = valve_keys->add_mef(kMefFqdn, rspf::MefContact{mef_address(), [raw] { return raw->mef_credentials(); }},
                                     ae_id);
    if (!added.ok()) throw std::runtime_error("add_mef: " + added.error().to_string());
    return enrolee;
  }

  Result<void> enrol(rspf::Enrolee& enrolee) {
    std::optional<Result<void>> outcome;
    enrolee.enrol([&](Result<void> r) { outcome.emplace(std::move(r)); });
    if (!pump([&] { return outcome.has_value(); })) return make_error(Errc::timeout, "test: enrol did not complete");
    return std::move(*outcome);
  }

  // One request from `from`, pumping the world until it completes.
  Result<transport::Response> call(transport::Node& from, const transport::Peer& to,
                                   const transport::ClientCredentials& credentials, transport::Request request) {
    std::optional<Result<transport::Response>> outcome;
    from.request(to, credentials, std::move(request),
                 [&](Result<transport::Response> r, const transport::Session*) { outcome.emplace(std::move(r)); });
    if (!pump([&] { return outcome.has_value(); })) return make_error(Errc::timeout, "test: request did not complete");
    return std::move(*outcome);
  }

  std::size_t mef_enrolments() const { return mef_store->size(crypto::RecordKind::enrolment_key); }
};

}  // namespace dauth::test

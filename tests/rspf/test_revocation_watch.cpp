// Certificate revocation applied in the handshake (PROTOCOL.md §5, rspf/revocation_watch.hpp), over
// real DTLS on loopback: an MEF with a CA, gateway B serving with the valve's AE-ID certificate, gateway A reaching
// it with the meter's; each gateway's RevocationWatch observes the MEF's /mef/revoked through its own Node and is
// that Node's peer_check (server side on B, client side on A).
#include <catch2/catch.hpp>

#include <sys/epoll.h>
#include <unistd.h>

#include "dauth/rspf/revocation_watch.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace std::chrono_literals;

namespace {

constexpr const char* kGatewayAKpmId = "gw-a@mef.example.net";
constexpr const char* kGatewayBKpmId = "gw-b@mef.example.net";

struct RevocationWorld {
  test::TempDir dir;
  SecretBuffer master_key = SecretBuffer::random(crypto::kMasterKeySize);
  test::TestClock clock;
  test::LogLines mef_log;
  test::LogLines a_log;
  test::LogLines b_log;
  std::vector<transport::Failure> a_failures;
  std::vector<transport::Failure> b_failures;
  std::vector<transport::Failure> mef_failures;
  SecretBuffer a_kpm = SecretBuffer::random(32);
  SecretBuffer b_kpm = SecretBuffer::random(32);
  std::optional<crypto::CertificateAuthority> ca;
  std::string ca_pem;
  transport::X509Credentials valve_credentials;
  transport::X509Credentials meter_credentials;
  transport::X509Credentials mef_credentials;  // the MEF's FQDN certificate (EST sessions)
  std::string valve_serial;
  std::string meter_serial;

  std::optional<crypto::KeyStore> mef_store;
  rspf::PskLookupSlot mef_slot;
  std::uint16_t mef_port = test::free_loopback_port();  // kept across the MEF's restart
  std::unique_ptr<transport::Node> mef_node;
  std::unique_ptr<rspf::Mef> mef;

  std::unique_ptr<transport::Node> b_node;  // gateway B: the valve's certificate server
  std::unique_ptr<rspf::RevocationWatch> b_watch;
  std::unique_ptr<transport::Node> a_node;  // gateway A: client only
  std::unique_ptr<rspf::RevocationWatch> a_watch;
  int handled = 0;

  RevocationWorld() {
    ca.emplace(crypto::CertificateAuthority::create_self_signed(crypto::PrivateKey::generate_p256().value(),
                                                                 "CN=Revocation MEF CA", clock.now - 3600,
                                                                 clock.now + 10 * 86400)
                   .value());
    ca_pem = ca->certificate().pem();
    mef_store.emplace(test::open_store(dir / "mef", master_key));
    test::World::put(*mef_store, test::World::enrolee_row(kGatewayAKpmId, a_kpm, "CAE-meter", {"CAE-valve"}, 900, true));
    test::World::put(*mef_store, test::World::enrolee_row(kGatewayBKpmId, b_kpm, "CAE-valve", {}, 900, true));
    // Two AE-ID certificates "issued by the MEF": its CA signed them and its store records them (as EST would).
    valve_credentials = issue("CAE-valve", Bytes{0x52, 0x01}, valve_serial);
    meter_credentials = issue("CAE-meter", Bytes{0x52, 0x02}, meter_serial);
    auto mef_key = crypto::PrivateKey::generate_p256().value();
    auto mef_certificate = ca->issue_for_key(mef_key, crypto::SubjectNames{test::kMefFqdn, {}, {test::kMefFqdn}},
                                             crypto::IssueParams{Bytes{0x52, 0x00}, clock.now - 3600, clock.now + 86400})
                               .value();
    mef_credentials = transport::X509Credentials{mef_certificate.pem(), mef_key.to_pem().value(), ca_pem};
    start_mef();

    b_node = make_gateway_node(true, &b_failures, b_watch);
    b_node->add_route(transport::Method::get, {"temp"}, transport::Access::secure,
                      [this](const transport::Session& session, const transport::Request&, transport::Responder out) {
                        ++handled;
                        out.respond(transport::Response::with_text(205, session.peer().value));
                      });
    b_watch = make_watch(*b_node, b_log, kGatewayBKpmId, b_kpm);
    a_node = make_gateway_node(false, &a_failures, a_watch);
    a_watch = make_watch(*a_node, a_log, kGatewayAKpmId, a_kpm);
  }
  ~RevocationWorld() { mef_slot.unbind(); }

  // record = false: signed by the MEF's CA but unknown to its store (like a device certificate from that CA).
  transport::X509Credentials issue(const std::string& ae_id, Bytes serial, std::string& serial_hex,
                                   bool record = true) {
    auto key = crypto::PrivateKey::generate_p256().value();
    auto certificate = ca->issue_for_key(key, crypto::SubjectNames{ae_id, {ae_id}, {}},
                                         crypto::IssueParams{std::move(serial), clock.now - 3600, clock.now + 86400})
                           .value();
    serial_hex = certificate.serial_hex();
    if (!record) return transport::X509Credentials{certificate.pem(), key.to_pem().value(), ca_pem};
    crypto::IssuanceRecord issued;
    issued.serial_hex = serial_hex;
    issued.ae_id = ae_id;
    issued.issued_at = clock.now;
    issued.expires_at = clock.now + 86400;
    test::World::put(*mef_store, std::move(issued));
    return transport::X509Credentials{certificate.pem(), key.to_pem().value(), ca_pem};
  }

  // The MEF on its port (the same after a restart), on the same store.
  void start_mef() {
    transport::NodeConfig config;
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = mef_port;
    config.psk_lookup = mef_slot.lookup();
    config.x509 = transport::X509Credentials{mef_credentials.certificate_chain_pem,
                                             mef_credentials.private_key_pem.clone(), ca_pem};
    config.limits = test::quick_limits();
    mef_node = transport::Node::create(std::move(config)).value();
    mef_node->set_failure_observer([this](const transport::Failure& f) { mef_failures.push_back(f); });
    rspf::MefConfig mef_config;
    mef_config.fqdn = test::kMefFqdn;
    mef_config.clock = clock.function();
    mef_config.log = mef_log.sink();
    // EST (/sren) with the same CA that signed the peers' certificates.
    mef_config.ca.emplace(test::copy_of_authority(*ca));
    mef = rspf::Mef::create(*mef_node, *mef_store, std::move(mef_config)).value();
    mef_slot.bind(mef->psk_lookup());
  }
  void stop_mef() {
    mef_slot.unbind();
    mef.reset();
    mef_node.reset();
  }

  std::unique_ptr<transport::Node> make_gateway_node(bool server, std::vector<transport::Failure>* failures,
                                                     std::unique_ptr<rspf::RevocationWatch>& watch) {
    transport::NodeConfig config;
    if (server) {
      config.secure_addresses = {"127.0.0.1"};
      config.secure_port = 0;
      config.x509 = transport::X509Credentials{valve_credentials.certificate_chain_pem,
                                               valve_credentials.private_key_pem.clone(), ca_pem};
    }
    config.limits = test::quick_limits();
    // The watch is made after its Node (it observes through it): the check reaches it through the owner.
    config.peer_check = [&watch](const transport::PeerIdentity& peer) -> Result<void> {
      if (!watch) return make_error(Errc::denied, "test: no watch yet");
      return watch->check(peer);
    };
    auto node = transport::Node::create(std::move(config)).value();
    node->set_failure_observer([failures](const transport::Failure& f) { failures->push_back(f); });
    return node;
  }

  std::unique_ptr<rspf::RevocationWatch> make_watch(transport::Node& node, test::LogLines& log, const char* kpm_id,
                                                    const SecretBuffer& kpm,
                                                    std::chrono::milliseconds refresh = rspf::kSubscriptionRefresh) {
    rspf::RevocationWatchConfig config;
    config.jitter = [] { return 0.0; };
    config.log = log.sink();
    config.subscription_refresh = refresh;
    auto watch = rspf::RevocationWatch::create(node, std::move(config));
    // Any session the MEF authenticates may read the list; a bootstrap PSK keeps this world small.
    std::string identity = kpm_id;
    const SecretBuffer* key = &kpm;
    REQUIRE(watch
                ->add_mef(test::kMefFqdn, rspf::MefContact{mef_address(),
                                                            [identity, key]() -> Result<transport::ClientCredentials> {
                                                              return transport::ClientCredentials::psk(
                                                                  identity, key->clone(), test::kMefFqdn);
                                                            }})
                .ok());
    return watch;
  }

  transport::Peer mef_address() const { return transport::Peer{"127.0.0.1", mef_port}; }
  transport::Peer valve_address() const { return transport::Peer{"127.0.0.1", b_node->secure_port()}; }
  transport::ClientCredentials meter_client() const {
    transport::X509Credentials x509{meter_credentials.certificate_chain_pem,
                                    meter_credentials.private_key_pem.clone(), ca_pem};
    return transport::ClientCredentials::certificate(std::move(x509), "CAE-valve", "CAE-valve");
  }

  bool pump(const std::function<bool()>& done, std::chrono::milliseconds max = 8000ms) {
    const auto end = std::chrono::steady_clock::now() + max;
    while (!done() && std::chrono::steady_clock::now() < end) {
      for (auto* node : {mef_node.get(), a_node.get(), b_node.get()}) {
        if (node != nullptr) (void)node->run_until([] { return false; }, 3ms);
      }
    }
    return done();
  }

  Result<transport::Response> get_temp() {
    transport::Request request;
    request.path = {"temp"};
    std::optional<Result<transport::Response>> outcome;
    a_node->request(valve_address(), meter_client(), std::move(request),
                    [&](Result<transport::Response> r, const transport::Session*) { outcome.emplace(std::move(r)); });
    if (!pump([&] { return outcome.has_value(); })) return make_error(Errc::timeout, "test: request did not complete");
    return std::move(*outcome);
  }

  static bool has_failure(const std::vector<transport::Failure>& failures, const std::string& text) {
    for (const auto& f : failures) {
      if (f.kind == transport::FailureKind::handshake_failed && f.reason.find(text) != std::string::npos) return true;
    }
    return false;
  }
};

}  // namespace

TEST_CASE("revocation watch: certificates wait for the list, a revoked client certificate is refused and its live "
          "session closed",
          "[rspf][network][revocation]") {
  RevocationWorld world;
  // Fail closed: before the MEF's list has arrived (e.g. right after a restart, MEF unreachable), every X.509 peer
  // is refused; raw public keys and PSK peers are not concerned.
  REQUIRE_FALSE(world.b_watch->complete());
  const transport::PeerIdentity meter{transport::PeerKind::x509, "CAE-meter", world.meter_serial,
                                      world.ca->certificate().subject()};
  auto early = world.b_watch->check(meter);
  REQUIRE_FALSE(early.ok());
  CHECK(early.error().message.find("not received yet") != std::string::npos);
  CHECK(world.b_watch->check(transport::PeerIdentity{transport::PeerKind::rpk, "ni:///sha-256;x", {}, {}}).ok());
  CHECK(world.b_watch->check(transport::PeerIdentity{transport::PeerKind::psk, "k@mef.example.net", {}, {}}).ok());

  REQUIRE(world.pump([&] { return world.a_watch->complete() && world.b_watch->complete(); }));
  CHECK(world.b_watch->feeds_live() == 1);
  CHECK(world.b_log.contains("applied list version 0: 0 revoked certificate serial(s)"));
  const std::size_t mef_sessions = world.a_node->stats().live_client_sessions;  // A's watch -> MEF
  auto first = world.get_temp();
  INFO((first.ok() ? std::string("ok") : first.error().to_string()));
  REQUIRE(first.ok());
  REQUIRE(first->code == 205);
  CHECK(std::string(first->payload.begin(), first->payload.end()) == "CAE-meter");
  REQUIRE(world.a_node->stats().live_client_sessions == mef_sessions + 1);

  // The MEF revokes the meter's certificate: B learns it by notification and closes the live session with it.
  REQUIRE(world.mef->revoke_certificate(world.meter_serial).ok());
  REQUIRE(world.pump([&] { return world.b_watch->is_revoked(world.meter_serial); }));
  CHECK(world.b_watch->revoked_count() == 1);
  REQUIRE(world.pump([&] { return world.a_node->stats().live_client_sessions == mef_sessions; }));  // close_notify
  CHECK(world.b_log.contains("certificate serial " + world.meter_serial + " revoked by MEF mef.example.net, 1 live "
                             "session(s) closed"));

  // A new handshake with it is refused inside the handshake: no handler runs.
  const int handled_before = world.handled;
  auto refused = world.get_temp();
  REQUIRE_FALSE(refused.ok());
  CHECK(world.handled == handled_before);
  CHECK(RevocationWorld::has_failure(world.b_failures, "peer check refused client certificate serial " +
                                                           world.meter_serial));
  CHECK(RevocationWorld::has_failure(world.b_failures, "is revoked by MEF mef.example.net"));
}

TEST_CASE("revocation watch: a client refuses a server whose certificate was revoked and closes its session to it",
          "[rspf][network][revocation]") {
  RevocationWorld world;
  REQUIRE(world.pump([&] { return world.a_watch->complete() && world.b_watch->complete(); }));
  const std::size_t mef_sessions = world.a_node->stats().live_client_sessions;  // A's watch -> MEF
  REQUIRE(world.get_temp().ok());
  REQUIRE(world.a_node->stats().live_client_sessions == mef_sessions + 1);

  REQUIRE(world.mef->revoke_certificate(world.valve_serial).ok());
  REQUIRE(world.pump([&] { return world.a_watch->is_revoked(world.valve_serial); }));
  // A closed its own client session to the revoked server (B has no session whose peer presented that serial).
  CHECK(world.a_node->stats().live_client_sessions == mef_sessions);
  CHECK(world.a_log.contains("certificate serial " + world.valve_serial + " revoked by MEF mef.example.net, 1 live "
                             "session(s) closed"));
  CHECK(world.b_log.contains("certificate serial " + world.valve_serial + " revoked by MEF mef.example.net, 0 live "
                             "session(s) closed"));

  const int handled_before = world.handled;
  auto refused = world.get_temp();
  REQUIRE_FALSE(refused.ok());
  CHECK(world.handled == handled_before);
  CHECK(RevocationWorld::has_failure(world.a_failures, "peer check refused server certificate serial " +
                                                           world.valve_serial));
}

TEST_CASE("revocation watch: re-subscribes after the MEF restarts and keeps its list meanwhile",
          "[rspf][network][revocation]") {
  RevocationWorld world;
  REQUIRE(world.pump([&] { return world.b_watch->feeds_live() == 1 && world.a_watch->complete(); }));
  REQUIRE(world.mef->revoke_certificate(world.valve_serial).ok());
  REQUIRE(world.pump([&] { return world.b_watch->is_revoked(world.valve_serial); }));
  const auto applied_before = world.b_watch->notifications();

  // The MEF goes away (close_notify to its subscribers): the subscription is lost, the list stays in force.
  world.stop_mef();
  REQUIRE(world.pump([&] { return world.b_watch->feeds_live() == 0; }));
  CHECK(world.b_log.contains("revocation watch mef=mef.example.net lost:"));
  CHECK(world.b_watch->complete());
  CHECK(world.b_watch->is_revoked(world.valve_serial));
  CHECK(world.b_watch->check(transport::PeerIdentity{transport::PeerKind::x509, "CAE-meter", world.meter_serial,
                                                     world.ca->certificate().subject()})
            .ok());

  // Back on the same port and store: the watch subscribes again (backoff) and gets the next revocation.
  world.start_mef();
  REQUIRE(world.pump([&] { return world.b_watch->feeds_live() == 1; }, 9000ms));
  CHECK(world.b_watch->notifications() > applied_before);
  REQUIRE(world.mef->revoke_certificate(world.meter_serial).ok());
  REQUIRE(world.pump([&] { return world.b_watch->is_revoked(world.meter_serial); }));
  CHECK(world.b_watch->is_revoked(world.valve_serial));
}

TEST_CASE("revocation watch: a live subscription is renewed on its refresh interval and stays live",
          "[rspf][network][revocation]") {
  // An MEF that crashed sends neither close_notify nor notifications; only a renewed subscription finds out (its
  // failure ends the silent session in transport). Here the MEF is alive: each renewal gets the current list.
  RevocationWorld world;
  test::LogLines refresh_log;
  auto watch = world.make_watch(*world.b_node, refresh_log, kGatewayBKpmId, world.b_kpm, 300ms);
  REQUIRE(world.pump([&] { return watch->feeds_live() == 1; }));
  const auto first = watch->notifications();
  REQUIRE(world.pump([&] { return refresh_log.count("refreshing the subscription") >= 2; }, 5000ms));
  REQUIRE(world.pump([&] { return watch->feeds_live() == 1 && watch->notifications() >= first + 2; }));
  CHECK(watch->complete());
}

TEST_CASE("EST /sren is authorised by the certificate the session presented, which it does not supersede",
          "[rspf][network][revocation][est]") {
  RevocationWorld world;
  // The meter has a valid enrolment (a certificate never outlives it) and three certificates from the MEF's CA:
  // the recorded one, a second recorded one that gets revoked, and one the MEF never recorded.
  crypto::EnrolmentKeyRecord enrolment{"00112233445566778899AABBCCDDEEFF@mef.example.net", SecretBuffer::random(32),
                                       "CAE-meter", {"CAE-valve"}, world.clock.now + 900, 0};
  test::World::put(*world.mef_store, std::move(enrolment));
  std::string revoked_serial;
  std::string unrecorded_serial;
  auto revoked = world.issue("CAE-meter", Bytes{0x52, 0x04}, revoked_serial);
  auto unrecorded = world.issue("CAE-meter", Bytes{0x52, 0x05}, unrecorded_serial, /*record=*/false);
  REQUIRE(world.mef->revoke_certificate(revoked_serial).ok());
  REQUIRE(world.pump([&] { return world.a_watch->complete(); }));  // A's node checks the MEF's certificate too

  auto sren = [&](const transport::X509Credentials& presented) {
    auto key = crypto::PrivateKey::generate_p256().value();
    transport::Request request;
    request.method = transport::Method::post;
    request.path = {".well-known", "est", "sren"};
    request.content_format = rspf::kContentFormatPkcs10;
    request.payload = crypto::CertificateRequest::create(key, "CAE-meter").value().der();
    transport::X509Credentials x509{presented.certificate_chain_pem, presented.private_key_pem.clone(), world.ca_pem};
    auto credentials = transport::ClientCredentials::certificate(std::move(x509), test::kMefFqdn, test::kMefFqdn);
    std::optional<Result<transport::Response>> outcome;
    world.a_node->request(world.mef_address(), credentials, std::move(request),
                          [&](Result<transport::Response> r, const transport::Session*) { outcome.emplace(std::move(r)); });
    REQUIRE(world.pump([&] { return outcome.has_value(); }));
    REQUIRE(outcome->ok());
    return std::move(outcome->value());
  };
  const std::size_t issued_before = world.mef_store->size(crypto::RecordKind::issuance);

  // A certificate this MEF never issued (recorded), though its CA signed it for that AE-ID: refused.
  auto foreign = sren(unrecorded);
  CHECK(foreign.code == 403);
  CHECK(world.mef_log.contains("re-enrolment of 'CAE-meter' refused: the certificate this session presented "
                               "(serial " + unrecorded_serial + ") was not issued by this MEF"));
  // The revoked one: refused, although the AE holds another valid certificate.
  auto with_revoked = sren(revoked);
  CHECK(with_revoked.code == 403);
  CHECK(world.mef_log.contains("re-enrolment of 'CAE-meter' refused: certificate serial " + revoked_serial +
                               " is revoked"));
  CHECK(world.mef_store->size(crypto::RecordKind::issuance) == issued_before);  // nothing issued

  // The valid one: a new certificate, although another certificate of the AE is revoked; and it is not superseded
  // (not revoked): a second re-enrolment under it works too.
  auto renewed = sren(world.meter_credentials);
  INFO(std::string(renewed.payload.begin(), renewed.payload.end()));
  REQUIRE(renewed.code == 204);
  CHECK(world.mef_store->size(crypto::RecordKind::issuance) == issued_before + 1);
  CHECK(world.mef_store->find<crypto::IssuanceRecord>(world.meter_serial)->revoked_at == 0);
  CHECK(sren(world.meter_credentials).code == 204);
}

// ---- several MEFs: revocations by (issuer, serial), lists kept in the key store, fail closed per MEF ----

namespace {

// One MEF with its own issuing CA and store, which the watching gateway reads with a bootstrap PSK of its own.
struct CaMef {
  std::string fqdn;
  std::string gateway_kpm_id;
  SecretBuffer gateway_kpm = SecretBuffer::random(32);
  std::optional<crypto::CertificateAuthority> ca;
  std::optional<crypto::KeyStore> store;
  rspf::PskLookupSlot slot;
  std::uint16_t port = 0;
  std::unique_ptr<transport::Node> node;
  std::unique_ptr<rspf::Mef> mef;
  test::LogLines log;
  std::vector<transport::Failure> failures;

  CaMef(const std::filesystem::path& dir, const SecretBuffer& master_key, const std::string& mef_fqdn,
        const std::string& ca_name, std::int64_t now)
      : fqdn(mef_fqdn), gateway_kpm_id("gw@" + mef_fqdn) {
    ca.emplace(crypto::CertificateAuthority::create_self_signed(crypto::PrivateKey::generate_p256().value(),
                                                                 "CN=" + ca_name, now - 3600, now + 10 * 86400)
                   .value());
    store.emplace(test::open_store(dir, master_key));
    test::World::put(*store, test::World::enrolee_row(gateway_kpm_id, gateway_kpm, "CAE-gw", {}, 900, false));
  }
  ~CaMef() { slot.unbind(); }

  void start(test::TestClock& clock) {
    transport::NodeConfig config;
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = port;
    config.psk_lookup = slot.lookup();
    config.limits = test::quick_limits();
    node = transport::Node::create(std::move(config)).value();
    node->set_failure_observer([this](const transport::Failure& f) { failures.push_back(f); });
    port = node->secure_port();
    rspf::MefConfig mef_config;
    mef_config.fqdn = fqdn;
    mef_config.clock = clock.function();
    mef_config.log = log.sink();
    mef_config.ca.emplace(test::copy_of_authority(*ca));
    mef = rspf::Mef::create(*node, *store, std::move(mef_config)).value();
    slot.bind(mef->psk_lookup());
  }
  void stop() {
    slot.unbind();
    mef.reset();
    node.reset();
  }

  // The identity a peer presenting a certificate of this MEF's CA has in the handshake (issuer and serial read from
  // the certificate as transport reads them); recorded as issued, so the MEF can revoke it.
  transport::PeerIdentity issue(const std::string& ae_id, Bytes serial, std::int64_t now) {
    auto key = crypto::PrivateKey::generate_p256().value();
    auto certificate =
        ca->issue_for_key(key, crypto::SubjectNames{ae_id, {ae_id}, {}},
                          crypto::IssueParams{std::move(serial), now - 60, now + 86400})
            .value();
    crypto::IssuanceRecord issued;
    issued.serial_hex = certificate.serial_hex();
    issued.ae_id = ae_id;
    issued.issued_at = now;
    issued.expires_at = now + 86400;
    test::World::put(*store, std::move(issued));
    return transport::PeerIdentity{transport::PeerKind::x509, ae_id, certificate.serial_hex(), certificate.issuer()};
  }

  rspf::MefContact contact() const {
    std::string identity = gateway_kpm_id;
    const SecretBuffer* key = &gateway_kpm;
    std::string name = fqdn;
    return rspf::MefContact{transport::Peer{"127.0.0.1", port},
                            [identity, key, name]() -> Result<transport::ClientCredentials> {
                              return transport::ClientCredentials::psk(identity, key->clone(), name);
                            }};
  }
};

// A gateway (client-only node) watching two MEFs whose CAs issue the same serials, with its lists in its own store.
struct TwoMefWorld {
  test::TempDir dir;
  SecretBuffer master_key = SecretBuffer::random(crypto::kMasterKeySize);
  test::TestClock clock;
  CaMef first{dir / "mef1", master_key, "mef.example.net", "First MEF CA", clock.now};
  CaMef second{dir / "mef2", master_key, "mef2.example.net", "Second MEF CA", clock.now};
  std::optional<crypto::KeyStore> gateway_store;
  std::vector<transport::Failure> gateway_failures;
  std::unique_ptr<transport::Node> gateway_node;
  test::LogLines gateway_log;
  std::unique_ptr<rspf::RevocationWatch> watch;

  TwoMefWorld() {
    first.start(clock);
    second.start(clock);
    gateway_store.emplace(test::open_store(dir / "gateway", master_key));
    gateway_node = test::make_node(std::nullopt, &gateway_failures);
  }

  // The gateway's watch as after a (re)start; store = false: memory only.
  void start_watch(bool store = true) {
    watch.reset();
    rspf::RevocationWatchConfig config;
    config.jitter = [] { return 0.0; };
    config.log = gateway_log.sink();
    config.clock = clock.function();
    config.store = store ? &*gateway_store : nullptr;
    watch = rspf::RevocationWatch::create(*gateway_node, std::move(config));
    REQUIRE(watch->add_mef(first.fqdn, first.contact()).ok());
    REQUIRE(watch->add_mef(second.fqdn, second.contact()).ok());
  }

  bool pump(const std::function<bool()>& done, std::chrono::milliseconds max = 8000ms) {
    const auto end = std::chrono::steady_clock::now() + max;
    while (!done() && std::chrono::steady_clock::now() < end) {
      for (auto* node : {first.node.get(), second.node.get(), gateway_node.get()}) {
        if (node != nullptr) (void)node->run_until([] { return false; }, 3ms);
      }
    }
    return done();
  }
};

std::string refusal_of(const Result<void>& verdict) {
  return verdict.ok() ? std::string("accepted") : verdict.error().message;
}

}  // namespace

TEST_CASE("revocation watch: the same serial from two MEFs' CAs is two certificates - revoking one leaves the other",
          "[rspf][network][revocation]") {
  TwoMefWorld world;
  const auto from_first = world.first.issue("CAE-one", Bytes{0x52, 0x07}, world.clock.now);
  const auto from_second = world.second.issue("CAE-two", Bytes{0x52, 0x07}, world.clock.now);
  REQUIRE(from_first.certificate_serial == from_second.certificate_serial);
  REQUIRE(from_first.certificate_issuer != from_second.certificate_issuer);
  world.start_watch();
  REQUIRE(world.pump([&] { return world.watch->complete(); }));
  CHECK(world.watch->check(from_first).ok());
  CHECK(world.watch->check(from_second).ok());

  REQUIRE(world.first.mef->revoke_certificate(from_first.certificate_serial).ok());
  REQUIRE(world.pump([&] { return world.watch->is_revoked(from_first.certificate_serial); }));
  const auto refused = world.watch->check(from_first);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().message.find("is revoked by MEF mef.example.net") != std::string::npos);
  INFO(refusal_of(world.watch->check(from_second)));
  CHECK(world.watch->check(from_second).ok());
  CHECK(world.gateway_log.contains("issuer 'CN=First MEF CA'"));
}

TEST_CASE("revocation watch: after a restart the stored lists apply and one unreachable MEF blocks only its own "
          "certificates",
          "[rspf][network][revocation][keystore]") {
  TwoMefWorld world;
  const auto revoked = world.first.issue("CAE-one", Bytes{0x52, 0x01}, world.clock.now);
  const auto valid_first = world.first.issue("CAE-one", Bytes{0x52, 0x02}, world.clock.now);
  const auto valid_second = world.second.issue("CAE-two", Bytes{0x52, 0x03}, world.clock.now);
  world.start_watch();
  REQUIRE(world.pump([&] { return world.watch->complete(); }));
  REQUIRE(world.first.mef->revoke_certificate(revoked.certificate_serial).ok());
  REQUIRE(world.pump([&] { return world.watch->is_revoked(revoked.certificate_serial); }));
  const auto* stored = world.gateway_store->find<crypto::RevocationListRecord>("mef.example.net");
  REQUIRE(stored != nullptr);
  CHECK(stored->serials == std::vector<std::string>{revoked.certificate_serial});
  CHECK(stored->issuer == "CN=First MEF CA");

  // Restart of the gateway (its store reopened from disk) while the second MEF is down.
  world.watch.reset();
  world.gateway_store.reset();
  world.gateway_store.emplace(test::open_store(world.dir / "gateway", world.master_key));
  world.second.stop();
  world.clock.now += 600;
  world.start_watch();
  // Before any MEF answered: the stored lists decide.
  CHECK_FALSE(world.watch->complete());
  CHECK(world.watch->is_revoked(revoked.certificate_serial));
  const auto still_revoked = world.watch->check(revoked);
  REQUIRE_FALSE(still_revoked.ok());
  CHECK(still_revoked.error().message.find("is revoked by MEF mef.example.net") != std::string::npos);
  INFO(refusal_of(world.watch->check(valid_first)) + " / " + refusal_of(world.watch->check(valid_second)));
  CHECK(world.watch->check(valid_first).ok());
  CHECK(world.watch->check(valid_second).ok());
  CHECK(world.gateway_log.contains("revocation watch mef=mef2.example.net loaded stored list version 0"));

  // The first MEF answers, the second stays unreachable: the first's certificates are judged by its fresh list.
  const auto applied = world.watch->notifications();
  REQUIRE(world.pump([&] { return world.watch->notifications() > applied; }));
  CHECK_FALSE(world.watch->complete());
  CHECK(world.watch->check(valid_first).ok());
  CHECK_FALSE(world.watch->check(revoked).ok());

  // Beyond the age bound without a word from the second MEF, its certificates are refused; the first's are not
  // (its MEF sends a new list: a revocation).
  world.clock.now += std::chrono::duration_cast<std::chrono::seconds>(rspf::kMaxRevocationListAge).count() + 1;
  const auto other = world.first.issue("CAE-three", Bytes{0x52, 0x04}, world.clock.now);
  REQUIRE(world.first.mef->revoke_certificate(other.certificate_serial).ok());
  REQUIRE(world.pump([&] { return world.watch->is_revoked(other.certificate_serial); }));
  CHECK(world.watch->check(valid_first).ok());
  const auto stale = world.watch->check(valid_second);
  REQUIRE_FALSE(stale.ok());
  CHECK(stale.error().message.find("revocation list of MEF mef2.example.net is stale") != std::string::npos);
}

TEST_CASE("revocation watch: without a stored list an unreachable MEF blocks only certificates no list names",
          "[rspf][network][revocation]") {
  TwoMefWorld world;
  const auto from_first = world.first.issue("CAE-one", Bytes{0x52, 0x02}, world.clock.now);
  const auto from_second = world.second.issue("CAE-two", Bytes{0x52, 0x03}, world.clock.now);
  world.second.stop();
  world.start_watch(/*store=*/false);
  REQUIRE(world.pump([&] { return world.watch->notifications() >= 1; }));
  CHECK_FALSE(world.watch->complete());
  INFO(refusal_of(world.watch->check(from_first)));
  CHECK(world.watch->check(from_first).ok());
  const auto unknown = world.watch->check(from_second);
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.error().message.find("revocation list of MEF mef2.example.net is unknown") != std::string::npos);
}

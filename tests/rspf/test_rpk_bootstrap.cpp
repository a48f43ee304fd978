// Raw-public-key bootstrapped RSPF (PROTOCOL.md §3.1, RFC 7250; GnuTLS builds), over real DTLS on loopback: the MEF
// serves its own P-256 raw public key and pins the enrolee's key id, whose enrolee row is "rpk:<key id>"; the
// Enrolee authenticates with its key (a CertificateRecord with an empty chain) and pins the MEF's key id.
#include <catch2/catch.hpp>

#include "dauth/crypto/onem2m.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace std::chrono_literals;

namespace {

constexpr const char* kFqdn = "mef.example.net";
constexpr const char* kPumpAeId = "CAE-rpkpump";

struct RpkWorld {
  test::TempDir dir;
  SecretBuffer master_key = SecretBuffer::random(crypto::kMasterKeySize);
  test::TestClock clock;
  test::LogLines log;
  std::vector<transport::Failure> failures;
  crypto::PrivateKey mef_key = crypto::PrivateKey::generate_p256().value();
  crypto::PrivateKey pump_key = crypto::PrivateKey::generate_p256().value();
  crypto::PrivateKey stranger_key = crypto::PrivateKey::generate_p256().value();
  SecretBuffer meter_kpm = SecretBuffer::random(32);

  std::optional<crypto::KeyStore> mef_store;
  rspf::PskLookupSlot mef_slot;
  std::unique_ptr<transport::Node> mef_node;
  std::unique_ptr<rspf::Mef> mef;

  // One gateway: a PSK Enrolee and RPK Enrolees share its client Node and key store.
  std::optional<crypto::KeyStore> gateway_store;
  std::unique_ptr<transport::Node> gateway_node;

  RpkWorld() {
    mef_store.emplace(test::open_store(dir / "mef", master_key));
    crypto::EnroleeRecord row;
    row.credential_id = "rpk:" + pump_key.public_key_id();
    row.enrolee_id = kPumpAeId;
    row.targets = {"CAE-valve"};
    row.enrolment_lifetime_s = 900;
    test::World::put(*mef_store, std::move(row));
    test::World::put(*mef_store,
                     test::World::enrolee_row(test::kMeterKpmId, meter_kpm, "CAE-meter", {}, 600, false));
    // The MEF's transport accepts the pump's key and the stranger's (so that the MEF's own table decides for the
    // stranger), next to PSK enrolees.
    transport::NodeConfig config;
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = 0;
    config.psk_lookup = mef_slot.lookup();
    config.rpk = transport::RpkCredentials{mef_key.to_pem().value(),
                                           {pump_key.public_key_id(), stranger_key.public_key_id()}};
    config.limits = test::quick_limits();
    mef_node = transport::Node::create(std::move(config)).value();
    mef_node->set_failure_observer([this](const transport::Failure& f) { failures.push_back(f); });
    rspf::MefConfig mef_config;
    mef_config.fqdn = kFqdn;
    mef_config.clock = clock.function();
    mef_config.log = log.sink();
    mef = rspf::Mef::create(*mef_node, *mef_store, std::move(mef_config)).value();
    mef_slot.bind(mef->psk_lookup());

    gateway_store.emplace(test::open_store(dir / "gateway", master_key));
    test::World::put(*gateway_store, crypto::CertificateRecord{kPumpAeId, {}, pump_key.to_der().value(), 0});
    test::World::put(*gateway_store, crypto::CertificateRecord{"CAE-stranger", {}, stranger_key.to_der().value(), 0});
    test::World::put(*gateway_store, crypto::BootstrapKeyRecord{test::kMeterKpmId, meter_kpm.clone(), "CAE-meter"});
    gateway_node = test::make_node(std::nullopt, &failures);
  }
  ~RpkWorld() { mef_slot.unbind(); }

  transport::Peer mef_address() const { return transport::Peer{"127.0.0.1", mef_node->secure_port()}; }

  rspf::EnroleeConfig rpk_config(const std::string& name, std::set<std::string> pinned) {
    rspf::EnroleeConfig config;
    config.raw_public_key_name = name;
    config.mef_fqdn = kFqdn;
    config.mef_pinned_keys = std::move(pinned);
    config.mef_address = mef_address();
    config.clock = clock.function();
    config.log = log.sink();
    return config;
  }

  std::unique_ptr<rspf::Enrolee> rpk_enrolee(const std::string& name, std::set<std::string> pinned) {
    return rspf::Enrolee::create(*gateway_node, *gateway_store, rpk_config(name, std::move(pinned))).value();
  }

  bool pump(const std::function<bool()>& done) {
    const auto end = std::chrono::steady_clock::now() + 8s;
    while (!done() && std::chrono::steady_clock::now() < end) {
      (void)mef_node->run_until([] { return false; }, 5ms);
      (void)gateway_node->run_until([] { return false; }, 5ms);
    }
    return done();
  }

  Result<void> enrol(rspf::Enrolee& enrolee) {
    std::optional<Result<void>> outcome;
    enrolee.enrol([&](Result<void> r) { outcome.emplace(std::move(r)); });
    if (!pump([&] { return outcome.has_value(); })) return make_error(Errc::timeout, "test: enrol did not complete");
    return std::move(*outcome);
  }

  std::size_t enrolments_at_mef() const { return mef_store->size(crypto::RecordKind::enrolment_key); }
  std::size_t enrolments_at_gateway() const { return gateway_store->size(crypto::RecordKind::enrolment_key); }
};

std::string text_of(const Result<void>& result) { return result.ok() ? std::string("ok") : result.error().to_string(); }

}  // namespace

TEST_CASE("an Enrolee bootstrapped by a raw public key enrols, Ke, KeID and the target key match the MEF's",
          "[rspf][network][rpk]") {
  if (!transport::backend_supports_rpk()) {
    // OpenSSL builds: the configuration is refused up front, not at the first handshake.
    test::TempDir dir;
    SecretBuffer master_key = SecretBuffer::random(crypto::kMasterKeySize);
    crypto::KeyStore store = test::open_store(dir / "store", master_key);
    const auto key = crypto::PrivateKey::generate_p256().value();
    test::World::put(store, crypto::CertificateRecord{kPumpAeId, {}, key.to_der().value(), 0});
    std::vector<transport::Failure> failures;
    auto node = test::make_node(std::nullopt, &failures);
    rspf::EnroleeConfig config;
    config.raw_public_key_name = kPumpAeId;
    config.mef_fqdn = kFqdn;
    config.mef_pinned_keys = {key.public_key_id()};
    auto refused = rspf::Enrolee::create(*node, store, std::move(config));
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().code == Errc::unsupported);
    return;
  }
  RpkWorld world;
  // A PSK Enrolee shares the gateway's Node (enrol() closes only its own cached session to the MEF).
  rspf::EnroleeConfig meter_config;
  meter_config.kpm_id = test::kMeterKpmId;
  meter_config.mef_address = world.mef_address();
  meter_config.clock = world.clock.function();
  meter_config.log = world.log.sink();
  auto meter = rspf::Enrolee::create(*world.gateway_node, *world.gateway_store, std::move(meter_config)).value();
  REQUIRE(world.enrol(*meter).ok());

  auto pump = world.rpk_enrolee(kPumpAeId, {world.mef_key.public_key_id()});
  REQUIRE(pump->ae_id() == kPumpAeId);
  const auto enrolled = world.enrol(*pump);
  INFO(text_of(enrolled));
  REQUIRE(enrolled.ok());
  CHECK(world.log.contains("DTLS with raw public key CAE-rpkpump"));
  CHECK(world.log.contains("rpk:" + world.pump_key.public_key_id()));

  // Both ends derived the same Ke under the same KeID from the RPK-authenticated session.
  const std::string ke_id = pump->ke_id().value();
  CHECK(ke_id.size() > std::string("@mef.example.net").size());
  const auto* at_mef = world.mef_store->find<crypto::EnrolmentKeyRecord>(ke_id);
  const auto* at_gateway = world.gateway_store->find<crypto::EnrolmentKeyRecord>(ke_id);
  REQUIRE(at_mef != nullptr);
  REQUIRE(at_gateway != nullptr);
  CHECK(at_mef->ke.equals(at_gateway->ke));
  CHECK(at_mef->enrolee_id == kPumpAeId);
  CHECK(at_gateway->targets == std::vector<std::string>{"CAE-valve"});
  // The target key is the TS-0003 derivation from that shared Ke (SUID 22, target AE-ID).
  auto target_key = pump->key_for_target("CAE-valve");
  REQUIRE(target_key.ok());
  CHECK(target_key->ke_id == ke_id);
  const auto expected =
      crypto::derive_usage_constrained_key(at_mef->ke, crypto::Suid::rspf_key_for_saef, "CAE-valve").value();
  CHECK(target_key->key.equals(expected));
  CHECK(pump->key_for_target("CAE-other").error().code == Errc::denied);

  // A renewal needs a new session and gives a new KeID; the PSK Enrolee on the same Node renews as well.
  REQUIRE(world.enrol(*pump).ok());
  CHECK(*pump->ke_id() != ke_id);
  REQUIRE(world.enrol(*meter).ok());
  CHECK(world.enrolments_at_mef() == 4);
  CHECK(world.enrolments_at_gateway() == 4);
}

TEST_CASE("raw public key bootstrap: unpinned keys on either side are refused and nothing is stored",
          "[rspf][network][rpk]") {
  if (!transport::backend_supports_rpk()) return;  // the case above checks the refusal of the configuration
  RpkWorld world;

  SECTION("the MEF's transport does not pin the enrolee's key") {
    const auto unknown = crypto::PrivateKey::generate_p256().value();
    test::World::put(*world.gateway_store, crypto::CertificateRecord{"CAE-unknown", {}, unknown.to_der().value(), 0});
    auto enrolee = world.rpk_enrolee("CAE-unknown", {world.mef_key.public_key_id()});
    const auto refused = world.enrol(*enrolee);
    INFO(text_of(refused));
    REQUIRE_FALSE(refused.ok());
    CHECK(enrolee->state() == rspf::EnroleeState::failed);
  }
  SECTION("the transport accepts the key but the MEF's enrolee table has no rpk: row for it") {
    auto enrolee = world.rpk_enrolee("CAE-stranger", {world.mef_key.public_key_id()});
    const auto refused = world.enrol(*enrolee);
    INFO(text_of(refused));
    REQUIRE_FALSE(refused.ok());
    CHECK_THAT(refused.error().message, Catch::Contains("CAE-stranger"));
  }
  SECTION("the Enrolee does not pin the MEF's key") {
    const auto other = crypto::PrivateKey::generate_p256().value();
    auto enrolee = world.rpk_enrolee(kPumpAeId, {other.public_key_id()});
    const auto refused = world.enrol(*enrolee);
    INFO(text_of(refused));
    REQUIRE_FALSE(refused.ok());
  }
  CHECK(world.enrolments_at_mef() == 0);
  CHECK(world.enrolments_at_gateway() == 0);
}

TEST_CASE("raw public key bootstrap: configurations that cannot work are refused by Enrolee::create",
          "[rspf][rpk]") {
  if (!transport::backend_supports_rpk()) return;
  RpkWorld world;
  const std::string mef_id = world.mef_key.public_key_id();
  auto refused = [&](rspf::EnroleeConfig config, Errc code, const std::string& fragment) {
    auto created = rspf::Enrolee::create(*world.gateway_node, *world.gateway_store, std::move(config));
    INFO(fragment);
    REQUIRE_FALSE(created.ok());
    CHECK(created.error().code == code);
    CHECK_THAT(created.error().message, Catch::Contains(fragment));
  };
  auto config = world.rpk_config(kPumpAeId, {mef_id});
  config.kpm_id = test::kMeterKpmId;
  refused(std::move(config), Errc::invalid_argument, "one bootstrap credential");
  refused(world.rpk_config(kPumpAeId, {}), Errc::invalid_argument, "mef_pinned_keys");
  config = world.rpk_config(kPumpAeId, {mef_id});
  config.mef_fqdn.clear();
  refused(std::move(config), Errc::invalid_argument, "mef_fqdn");
  config = world.rpk_config(kPumpAeId, {mef_id});
  config.request_certificate = true;
  refused(std::move(config), Errc::invalid_argument, "cannot request a certificate");
  refused(world.rpk_config("CAE-absent", {mef_id}), Errc::not_found, "CAE-absent");
}

// Certificate-bootstrapped RSPF, EST re-enrolment (/sren) and the MEF's revocation list (PROTOCOL.md §3.1, §3.6, §5),
// over real DTLS with X.509 on loopback: the MEF serves its FQDN certificate, the Enrolee authenticates with its
// AE-ID certificate, both issued by one test CA that is also the MEF's EST CA.
#include <catch2/catch.hpp>

#include <sys/epoll.h>

#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/messages.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace std::chrono_literals;

namespace {

constexpr const char* kFqdn = "mef.example.net";
constexpr const char* kAeId = "CAE-certmeter";

transport::Request est_request(const std::string& last, const crypto::PrivateKey& key, const std::string& ae_id) {
  transport::Request request;
  request.method = transport::Method::post;
  request.path = {".well-known", "est", last};
  request.content_format = rspf::kContentFormatPkcs10;
  request.payload = crypto::CertificateRequest::create(key, ae_id).value().der();
  return request;
}

struct CertWorld {
  test::TempDir dir;
  SecretBuffer master_key = SecretBuffer::random(crypto::kMasterKeySize);
  test::TestClock clock;
  test::LogLines log;
  std::vector<transport::Failure> failures;
  std::optional<crypto::CertificateAuthority> ca;
  std::string ca_pem;
  Bytes bootstrap_serial;

  std::optional<crypto::KeyStore> mef_store;
  rspf::PskLookupSlot mef_slot;
  std::unique_ptr<transport::Node> mef_node;
  std::unique_ptr<rspf::Mef> mef;

  std::optional<crypto::KeyStore> enrolee_store;
  std::unique_ptr<transport::Node> enrolee_node;
  std::unique_ptr<rspf::Enrolee> enrolee;

  CertWorld() {
    ca.emplace(crypto::CertificateAuthority::create_self_signed(crypto::PrivateKey::generate_p256().value(),
                                                                 "CN=Cert MEF CA", clock.now - 3600,
                                                                 clock.now + 10 * 86400)
                   .value());
    ca_pem = ca->certificate().pem();
    auto issue = [&](const crypto::PrivateKey& key, crypto::SubjectNames names, Bytes serial) {
      return ca->issue_for_key(key, names, crypto::IssueParams{std::move(serial), clock.now - 3600, clock.now + 86400})
          .value();
    };
    // MEF: X.509 server credentials (its FQDN certificate) next to the PSK lookup, and the CA for EST.
    auto mef_key = crypto::PrivateKey::generate_p256().value();
    auto mef_certificate = issue(mef_key, crypto::SubjectNames{kFqdn, {}, {kFqdn}}, Bytes{0x41, 0x01});
    mef_store.emplace(test::open_store(dir / "mef", master_key));
    crypto::EnroleeRecord row;
    row.credential_id = std::string("cert:") + kAeId;
    row.enrolee_id = kAeId;
    row.targets = {"CAE-valve"};
    row.enrolment_lifetime_s = 900;
    row.certificate_enrolment = true;
    test::World::put(*mef_store, std::move(row));
    transport::NodeConfig config;
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = 0;
    config.psk_lookup = mef_slot.lookup();
    config.x509 = transport::X509Credentials{mef_certificate.pem(), mef_key.to_pem().value(), ca_pem};
    config.limits = test::quick_limits();
    mef_node = transport::Node::create(std::move(config)).value();
    mef_node->set_failure_observer([this](const transport::Failure& f) { failures.push_back(f); });
    rspf::MefConfig mef_config;
    mef_config.fqdn = kFqdn;
    mef_config.clock = clock.function();
    mef_config.log = log.sink();
    mef_config.ca.emplace(test::copy_of_authority(*ca));
    mef = rspf::Mef::create(*mef_node, *mef_store, std::move(mef_config)).value();
    mef_slot.bind(mef->psk_lookup());

    // Enrolee: its device certificate (AE-ID in the SAN URI) as the bootstrap credential.
    auto device_key = crypto::PrivateKey::generate_p256().value();
    bootstrap_serial = Bytes{0x41, 0x02};
    auto device_certificate = issue(device_key, crypto::SubjectNames{kAeId, {kAeId}, {}}, bootstrap_serial);
    enrolee_store.emplace(test::open_store(dir / "enrolee", master_key));
    test::World::put(*enrolee_store, crypto::CertificateRecord{kAeId, device_certificate.chain_der(),
                                                               device_key.to_der().value(), clock.now + 86400});
    enrolee_node = test::make_node(std::nullopt, &failures);
    rspf::EnroleeConfig enrolee_config;
    enrolee_config.certificate_name = kAeId;
    enrolee_config.mef_fqdn = kFqdn;
    enrolee_config.mef_trust_anchors_pem = ca_pem;
    enrolee_config.mef_address = transport::Peer{"127.0.0.1", mef_node->secure_port()};
    enrolee_config.request_certificate = true;
    enrolee_config.clock = clock.function();
    enrolee_config.log = log.sink();
    enrolee = rspf::Enrolee::create(*enrolee_node, *enrolee_store, std::move(enrolee_config)).value();
  }
  ~CertWorld() { mef_slot.unbind(); }

  bool pump(const std::function<bool()>& done) {
    const auto end = std::chrono::steady_clock::now() + 8s;
    while (!done() && std::chrono::steady_clock::now() < end) {
      (void)mef_node->run_until([] { return false; }, 5ms);
      (void)enrolee_node->run_until([] { return false; }, 5ms);
    }
    return done();
  }

  Result<void> enrol() {
    std::optional<Result<void>> outcome;
    enrolee->enrol([&](Result<void> r) { outcome.emplace(std::move(r)); });
    if (!pump([&] { return outcome.has_value(); })) return make_error(Errc::timeout, "test: enrol did not complete");
    return std::move(*outcome);
  }

  Result<transport::Response> call(const transport::ClientCredentials& credentials, transport::Request request) {
    std::optional<Result<transport::Response>> outcome;
    enrolee_node->request(transport::Peer{"127.0.0.1", mef_node->secure_port()}, credentials, std::move(request),
                          [&](Result<transport::Response> r, const transport::Session*) { outcome.emplace(std::move(r)); });
    if (!pump([&] { return outcome.has_value(); })) return make_error(Errc::timeout, "test: request did not complete");
    return std::move(*outcome);
  }

  // The enrolee's current certificate record as client credentials (the /sren session).
  transport::ClientCredentials certificate_credentials() const {
    const auto* record = enrolee_store->find<crypto::CertificateRecord>(kAeId);
    REQUIRE(record != nullptr);
    auto key = crypto::PrivateKey::parse(record->private_key_der).value();
    std::string chain;
    for (const auto& der : record->chain_der) chain += crypto::Certificate::parse(ByteView(der)).value().pem();
    return transport::ClientCredentials::certificate(
        transport::X509Credentials{chain, key.to_pem().value(), ca_pem}, kFqdn, kFqdn);
  }

  rspf::RevocationList revocation_list() {
    transport::Request request;
    request.method = transport::Method::get;
    request.path = {"mef", "revoked"};
    auto answer = call(certificate_credentials(), std::move(request));
    REQUIRE(answer.ok());
    REQUIRE(answer->code == 205);
    auto list = rspf::decode_revocation_list(ByteView(answer->payload), rspf::ContentFormat::cbor);
    REQUIRE(list.ok());
    return *list;
  }

  std::string current_serial() const {
    const auto* record = enrolee_store->find<crypto::CertificateRecord>(kAeId);
    return crypto::Certificate::parse(ByteView(record->chain_der.front())).value().serial_hex();
  }
};

}  // namespace

TEST_CASE("an Enrolee bootstrapped by its AE-ID certificate enrols and gets an EST certificate",
          "[rspf][network][certificate]") {
  CertWorld world;
  REQUIRE(world.enrolee->ae_id() == kAeId);
  auto enrolled = world.enrol();
  INFO((enrolled.ok() ? std::string("ok") : enrolled.error().to_string()));
  REQUIRE(enrolled.ok());
  REQUIRE(world.log.contains("DTLS with certificate CAE-certmeter"));
  // Both ends derived the same Ke under the same KeID from the certificate-authenticated session.
  const std::string ke_id = world.enrolee->ke_id().value();
  const auto* at_mef = world.mef_store->find<crypto::EnrolmentKeyRecord>(ke_id);
  const auto* at_enrolee = world.enrolee_store->find<crypto::EnrolmentKeyRecord>(ke_id);
  REQUIRE(at_mef != nullptr);
  REQUIRE(at_enrolee != nullptr);
  REQUIRE(at_mef->ke.equals(at_enrolee->ke));
  REQUIRE(at_mef->enrolee_id == kAeId);
  REQUIRE(at_enrolee->targets == std::vector<std::string>{"CAE-valve"});
  REQUIRE(world.enrolee->key_for_target("CAE-valve").ok());
  // EST on the same session replaced the device certificate with one the MEF issued and recorded.
  const std::string serial = world.current_serial();
  REQUIRE(serial != to_hex(ByteView(world.bootstrap_serial), true));
  const auto* issued = world.mef_store->find<crypto::IssuanceRecord>(serial);
  REQUIRE(issued != nullptr);
  REQUIRE(issued->ae_id == kAeId);
  REQUIRE(issued->expires_at <= at_mef->expires_at);
  REQUIRE(world.log.contains("mef audit: est/sen"));

  // A second enrolment authenticates with the MEF-issued certificate and gives a new KeID.
  REQUIRE(world.enrol().ok());
  REQUIRE(*world.enrolee->ke_id() != ke_id);
  REQUIRE(world.current_serial() != serial);
}

TEST_CASE("EST /sren re-enrols under the current certificate, refusals, the revocation list follows revocations",
          "[rspf][network][certificate][est]") {
  CertWorld world;
  // Before any enrolment: no issued certificate of this AE, so /sren with the device certificate is refused.
  auto next_key = crypto::PrivateKey::generate_p256().value();
  auto early = world.call(world.certificate_credentials(), est_request("sren", next_key, kAeId));
  REQUIRE(early.ok());
  REQUIRE(early->code == 403);
  REQUIRE(world.enrol().ok());
  const std::string first_serial = world.current_serial();

  // The revocation list, empty at version 0.
  auto list = world.revocation_list();
  REQUIRE(list.version == 0);
  REQUIRE(list.serials.empty());
  REQUIRE(list.ke_ids.empty());

  // /sren over the session authenticated by the MEF-issued certificate: a new certificate for a new key.
  auto renewed = world.call(world.certificate_credentials(), est_request("sren", next_key, kAeId));
  REQUIRE(renewed.ok());
  INFO(std::string(renewed->payload.begin(), renewed->payload.end()));
  REQUIRE(renewed->code == 204);
  REQUIRE(renewed->content_format == rspf::kContentFormatPkixCert);
  auto certificate = crypto::Certificate::parse(ByteView(renewed->payload)).value();
  REQUIRE(certificate.ae_id().value() == kAeId);
  REQUIRE(certificate.public_key_der() == next_key.public_key_der());
  REQUIRE(certificate.serial_hex() != first_serial);
  REQUIRE(certificate.verify(world.ca->certificate(), static_cast<std::time_t>(world.clock.now)).ok());
  REQUIRE(world.mef_store->find<crypto::IssuanceRecord>(certificate.serial_hex()) != nullptr);
  REQUIRE(world.log.contains("mef audit: est/sren"));

  // A CSR for another AE-ID, and /sren over a KeID/Ker session: refused, nothing issued.
  const std::size_t issued = world.mef_store->size(crypto::RecordKind::issuance);
  auto other = world.call(world.certificate_credentials(), est_request("sren", next_key, "CAE-valve"));
  REQUIRE(other.ok());
  REQUIRE(other->code == 403);
  auto over_psk = world.call(world.enrolee->mef_credentials().value(), est_request("sren", next_key, kAeId));
  REQUIRE(over_psk.ok());
  REQUIRE(over_psk->code == 403);
  REQUIRE(world.mef_store->size(crypto::RecordKind::issuance) == issued);

  // Revocations: audit lines, the list grows with its version, and /sren is refused while a revoked certificate
  // of the AE is unexpired (the MEF cannot tell which certificate the session used).
  const std::string ke_id = world.enrolee->ke_id().value();
  REQUIRE(world.mef->revoke_certificate(first_serial).ok());
  REQUIRE(world.log.contains("mef audit: revoked certificate serial " + first_serial + " of CAE-certmeter"));
  REQUIRE(world.mef->revoke(ke_id).ok());
  REQUIRE(world.log.contains("mef audit: revoked KeID " + ke_id + " of CAE-certmeter"));
  list = world.revocation_list();
  REQUIRE(list.version == 2);
  REQUIRE(list.serials == std::vector<std::string>{first_serial});
  REQUIRE(list.ke_ids == std::vector<std::string>{ke_id});
  REQUIRE(world.mef->revoke(ke_id).ok());  // idempotent: the version does not move
  REQUIRE(world.revocation_list().version == 2);
  auto after_revocation = world.call(world.certificate_credentials(), est_request("sren", next_key, kAeId));
  REQUIRE(after_revocation.ok());
  REQUIRE(after_revocation->code == 403);
}

TEST_CASE("revocation list messages: round trip and strict decoding", "[rspf][messages]") {
  rspf::RevocationList list{7, {"4A0B", "01"}, {"00112233445566778899AABBCCDDEEFF@mef.example.net"}, "CN=MEF CA"};
  for (auto format : {rspf::ContentFormat::cbor, rspf::ContentFormat::json}) {
    auto back = rspf::decode_revocation_list(ByteView(rspf::encode(list, format)), format);
    REQUIRE(back.ok());
    REQUIRE(back->version == 7);
    REQUIRE(back->serials == list.serials);
    REQUIRE(back->ke_ids == list.ke_ids);
    REQUIRE(back->issuer == "CN=MEF CA");
  }

  auto decode_json = [](const std::string& text) {
    return rspf::decode_revocation_list(ByteView::of(text), rspf::ContentFormat::json);
  };
  REQUIRE(decode_json(R"({"version":1,"serials":["0a"],"keIds":[]})")->serials == std::vector<std::string>{"0A"});
  // An MEF of an earlier release names no issuer (its list then applies to every issuer, RevocationWatch).
  REQUIRE(decode_json(R"({"version":1,"serials":[],"keIds":[]})")->issuer.empty());
  REQUIRE(decode_json(R"({"version":1,"issuer":7,"serials":[],"keIds":[]})").error().code == Errc::parse);
  REQUIRE(decode_json(R"({"version":1,"serials":["XYZ1"],"keIds":[]})").error().code == Errc::parse);
  // One spelling per serial (crypto::canonical_serial), the one Certificate::serial_hex() gives a peer's certificate:
  // a sign octet or an odd digit count would otherwise never match it.
  REQUIRE(decode_json(R"({"version":1,"serials":["008f0102"],"keIds":[]})")->serials ==
          std::vector<std::string>{"8F0102"});
  REQUIRE(decode_json(R"({"version":1,"serials":["ABC"],"keIds":[]})")->serials == std::vector<std::string>{"0ABC"});
  REQUIRE(decode_json(R"({"version":1,"serials":["0x1F"],"keIds":[]})").error().code == Errc::parse);
  REQUIRE(decode_json(R"({"version":1,"serials":[""],"keIds":[]})").error().code == Errc::parse);
  REQUIRE(decode_json(R"({"version":1,"serials":[],"keIds":["nokeid"]})").error().code == Errc::parse);
  REQUIRE(decode_json(R"({"serials":[],"keIds":[]})").error().code == Errc::parse);
  REQUIRE(decode_json(R"({"version":-1,"serials":[],"keIds":[]})").error().code == Errc::parse);
}

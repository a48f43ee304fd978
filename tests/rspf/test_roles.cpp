// The rspf network roles end to end (PROTOCOL.md §3–5): real DTLS-PSK on loopback between an MEF, an Enrolee and an
// Enrolment Target, each with its own KeyStore on disk.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>

#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/messages.hpp"
#include "network_world.hpp"

using namespace dauth;
using dauth::test::World;

namespace {

transport::Request get(std::vector<std::string> path) {
  transport::Request request;
  request.method = transport::Method::get;
  request.path = std::move(path);
  return request;
}

// The refusal's ErrorBody, for asserting on code word and reason.
rspf::ErrorBody error_body(const transport::Response& response) {
  auto body = rspf::decode_error_body(ByteView(response.payload), rspf::ContentFormat::cbor);
  REQUIRE(body.ok());
  return *body;
}

// A fetch by the valve (authenticated as its own KeID/Ker) with the given KeID and SUID.
Result<transport::Response> fetch_as_valve(World& world, const std::string& ke_id, const std::string& suid,
                                           const std::string& originator = "CAE-valve") {
  auto request = get({"fetchCredentials", ke_id, suid});
  request.originator = originator;
  auto credentials = world.valve->mef_credentials();
  REQUIRE(credentials.ok());
  return world.call(*world.valve_node, world.mef_address(), *credentials, std::move(request));
}

std::string hex_of(const SecretBuffer& secret) { return to_hex(secret.view()); }

}  // namespace

TEST_CASE("PSK RSPF end to end: enrolment, target key retrieval, then an AE-pair DTLS session", "[rspf][network]") {
  std::string meter_ke_id;
  SecretBuffer meter_ke;
  World world;
  {
    REQUIRE(world.meter->state() == rspf::EnroleeState::idle);
    auto enrolled = world.enrol(*world.meter);
    INFO((enrolled.ok() ? std::string("ok") : enrolled.error().to_string()));
    REQUIRE(enrolled.ok());
    REQUIRE(world.meter->state() == rspf::EnroleeState::enrolled);
    REQUIRE(world.meter->ke_id().has_value());
    meter_ke_id = *world.meter->ke_id();

    // Both ends derived Ke/KeID independently from their own side of the exporter and stored the same.
    const auto* at_mef = world.mef_store->find<crypto::EnrolmentKeyRecord>(meter_ke_id);
    const auto* at_meter = world.meter_store->find<crypto::EnrolmentKeyRecord>(meter_ke_id);
    REQUIRE(at_mef != nullptr);
    REQUIRE(at_meter != nullptr);
    REQUIRE(at_mef->ke.size() == crypto::kEnrolmentKeySize);
    REQUIRE(at_mef->ke.equals(at_meter->ke));
    REQUIRE(at_mef->enrolee_id == "CAE-meter");
    REQUIRE(at_meter->targets == std::vector<std::string>{"CAE-valve"});
    REQUIRE(at_mef->expires_at == world.clock.now + test::kMeterLifetime);
    REQUIRE(at_meter->expires_at == at_mef->expires_at);
    REQUIRE(crypto::parse_ke_id(meter_ke_id)->mef_fqdn == test::kMefFqdn);
    meter_ke = at_mef->ke.clone();
    // Renewal at 2/3 of the lifetime ± 10 %.
    const auto renewal = world.meter->next_attempt_delay();
    REQUIRE(renewal >= std::chrono::milliseconds(test::kMeterLifetime * 1000 * 2 / 3 * 9 / 10));
    REQUIRE(renewal <= std::chrono::milliseconds(test::kMeterLifetime * 1000 * 2 / 3 * 11 / 10 + 1));

    REQUIRE(world.enrol(*world.valve).ok());

    // The meter opens DTLS-PSK to the valve with identity KeID and the usage-constrained key.
    auto key = world.meter->key_for_target("CAE-valve");
    REQUIRE(key.ok());
    REQUIRE(key->ke_id == meter_ke_id);
    auto expected = crypto::derive_usage_constrained_key(meter_ke, crypto::Suid::rspf_key_for_saef, "CAE-valve");
    REQUIRE(key->key.equals(*expected));
    REQUIRE(world.meter->key_for_target("CAE-pump").error().code == Errc::denied);
    const auto to_valve = transport::ClientCredentials::psk(key->ke_id, key->key.clone(), "CAE-valve");

    // First attempt: the valve does not know the KeID yet, refuses the handshake and starts the retrieval.
    auto first = world.call(*world.meter_node, world.valve_address(), to_valve, get({"temp"}));
    REQUIRE_FALSE(first.ok());
    REQUIRE(first.error().code == Errc::unauthenticated);
    const bool refusal_logged = std::any_of(world.failures.begin(), world.failures.end(), [](const transport::Failure& f) {
      return f.kind == transport::FailureKind::handshake_failed && f.reason.find("key retrieval") != std::string::npos;
    });
    REQUIRE(refusal_logged);
    REQUIRE(world.pump([&] { return world.valve_keys->fetches_pending() == 0; }));
    const auto* fetched = world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(meter_ke_id, "CAE-valve"));
    REQUIRE(fetched != nullptr);
    REQUIRE(fetched->key.equals(key->key));
    REQUIRE(fetched->peer_ae_id == "CAE-meter");
    REQUIRE(fetched->local_ae_id == "CAE-valve");
    REQUIRE(fetched->expires_at == at_mef->expires_at);

    // The retry succeeds, and the valve sees the meter's KeID as the session identity.
    auto second = world.call(*world.meter_node, world.valve_address(), to_valve, get({"temp"}));
    INFO((second.ok() ? std::string("ok") : second.error().to_string()));
    REQUIRE(second.ok());
    REQUIRE(second->code == 205);
    REQUIRE(std::string(second->payload.begin(), second->payload.end()) == meter_ke_id);

    // No log line carries key material (docs/conventions.md §9).
    for (const auto& line : world.log.lines) {
      REQUIRE(line.find(hex_of(world.meter_kpm)) == std::string::npos);
      REQUIRE(line.find(hex_of(meter_ke)) == std::string::npos);
      REQUIRE(line.find(hex_of(key->key)) == std::string::npos);
    }
    REQUIRE(world.log.contains("idle -> enrolling"));
    REQUIRE(world.log.contains("enrolling -> enrolled"));
    REQUIRE(world.log.contains("fetching -> stored"));
  }

  // Durability: the MEF's store reopened from disk still has the enrolment.
  const auto store_dir = world.mef_store->directory();
  world.mef_slot.unbind();
  world.mef.reset();
  world.mef_store.reset();
  auto reopened = crypto::KeyStore::open(store_dir, world.master_key.clone());
  REQUIRE(reopened.ok());
  const auto* record = reopened->find<crypto::EnrolmentKeyRecord>(meter_ke_id);
  REQUIRE(record != nullptr);
  REQUIRE(record->ke.equals(meter_ke));
  REQUIRE(record->enrolee_id == "CAE-meter");
}

TEST_CASE("certificate enrolment over EST-coaps gives an AE-ID certificate from the MEF CA", "[rspf][network][est]") {
  World world(/*with_ca=*/true);
  auto enrolled = world.enrol(*world.meter);
  INFO((enrolled.ok() ? std::string("ok") : enrolled.error().to_string()));
  REQUIRE(enrolled.ok());
  const auto* stored = world.meter_store->find<crypto::CertificateRecord>("CAE-meter");
  REQUIRE(stored != nullptr);
  REQUIRE(stored->chain_der.size() == 1);
  auto certificate = crypto::Certificate::parse(ByteView(stored->chain_der.front()));
  REQUIRE(certificate.ok());
  REQUIRE(certificate->verify(*world.ca_certificate, static_cast<std::time_t>(world.clock.now)).ok());
  REQUIRE(certificate->ae_id().value() == "CAE-meter");
  // The private key stayed with the Enrolee and belongs to the certificate.
  auto key = crypto::PrivateKey::parse(stored->private_key_der);
  REQUIRE(key.ok());
  REQUIRE(key->public_key_der() == certificate->public_key_der());
  // Validity: min(MEF policy, enrolment expiry); the MEF recorded the issuance.
  const auto* enrolment = world.meter_store->find<crypto::EnrolmentKeyRecord>(*world.meter->ke_id());
  REQUIRE(static_cast<std::int64_t>(certificate->not_after()) <= enrolment->expires_at);
  REQUIRE(stored->expires_at == static_cast<std::int64_t>(certificate->not_after()));
  const auto* issued = world.mef_store->find<crypto::IssuanceRecord>(certificate->serial_hex());
  REQUIRE(issued != nullptr);
  REQUIRE(issued->ae_id == "CAE-meter");
  REQUIRE(certificate->serial_hex().size() == 2 * rspf::kCertificateSerialSize);

  // GET /.well-known/est/crts answers the CA certificate, to an enrolled node (KeID/Ker session).
  auto crts = world.call(*world.meter_node, world.mef_address(), *world.meter->mef_credentials(),
                         get({".well-known", "est", "crts"}));
  REQUIRE(crts.ok());
  REQUIRE(crts->code == 205);
  REQUIRE(crts->content_format == rspf::kContentFormatPkixCert);
  REQUIRE(crts->payload == world.ca_certificate->der());

  // Revocation of the serial is recorded.
  REQUIRE(world.mef->revoke_certificate(certificate->serial_hex()).ok());
  REQUIRE(world.mef_store->find<crypto::IssuanceRecord>(certificate->serial_hex())->revoked_at == world.clock.now);
  REQUIRE(world.mef->revoke_certificate("00").error().code == Errc::not_found);
}

TEST_CASE("the MEF refuses bad enrolments and certificate requests, stores nothing, and keeps serving",
          "[rspf][network][negative]") {
  World world(/*with_ca=*/true);
  const auto meter_bootstrap =
      transport::ClientCredentials::psk(test::kMeterKpmId, world.meter_kpm.clone(), test::kMefFqdn);
  auto post = [](std::vector<std::string> path, std::uint16_t format, Bytes payload) {
    transport::Request request;
    request.method = transport::Method::post;
    request.path = std::move(path);
    request.content_format = format;
    request.payload = std::move(payload);
    return request;
  };

  SECTION("unknown KpmID: the handshake is refused") {
    test::TempDir other;
    auto store = test::open_store(other.path() / "ghost", world.master_key);
    World::put(store, crypto::BootstrapKeyRecord{"ghost@mef.example.net", SecretBuffer::random(32), "CAE-ghost"});
    auto ghost = world.make_enrolee(*world.meter_node, store, "ghost@mef.example.net", false);
    auto outcome = world.enrol(*ghost);
    REQUIRE_FALSE(outcome.ok());
    REQUIRE(outcome.error().code == Errc::unauthenticated);
    REQUIRE(ghost->state() == rspf::EnroleeState::failed);
    REQUIRE(world.log.contains("enrolling -> failed"));
  }
  SECTION("wrong Kpm: the handshake fails (decryption error or silence), nothing stored") {
    test::TempDir other;
    auto store = test::open_store(other.path() / "meter2", world.master_key);
    World::put(store, crypto::BootstrapKeyRecord{test::kMeterKpmId, SecretBuffer::random(32), "CAE-meter"});
    auto impostor = world.make_enrolee(*world.meter_node, store, test::kMeterKpmId, false);
    auto outcome = world.enrol(*impostor);
    REQUIRE_FALSE(outcome.ok());
    INFO(outcome.error().to_string());
    // GnuTLS on both ends fails the Finished at once; other backend pairs stay silent until the handshake timeout
    // (docs/transport.md §3). Either way the reason names the handshake.
    REQUIRE((outcome.error().code == Errc::unauthenticated || outcome.error().code == Errc::timeout));
    REQUIRE(outcome.error().message.find("handshake") != std::string::npos);
    REQUIRE(impostor->state() == rspf::EnroleeState::failed);
    REQUIRE(store.size(crypto::RecordKind::enrolment_key) == 0);
    REQUIRE(world.mef_enrolments() == 0);
  }
  SECTION("enrolment on a re-authentication (KeID) session: 4.03 unknown enrolee") {
    REQUIRE(world.enrol(*world.meter).ok());
    const std::size_t before = world.mef_enrolments();
    auto answer = world.call(*world.meter_node, world.mef_address(), *world.meter->mef_credentials(),
                             post({"mef", "enrolment"}, 60, rspf::encode(rspf::EnrolmentRequest{}, rspf::ContentFormat::cbor)));
    REQUIRE(answer.ok());
    REQUIRE(answer->code == 403);
    REQUIRE(error_body(*answer).detail.find("unknown enrolee") != std::string::npos);
    REQUIRE(world.mef_enrolments() == before);
  }
  SECTION("a second enrolment on the same DTLS session (same exporter, same KeID): the same answer, nothing stored") {
    // The Enrolee asks again when our answer was lost (PROTOCOL.md §3.4): it must learn the KeID the MEF stored.
    const Bytes body = rspf::encode(rspf::EnrolmentRequest{true, false, false}, rspf::ContentFormat::cbor);
    auto first = world.call(*world.meter_node, world.mef_address(), meter_bootstrap, post({"mef", "enrolment"}, 60, body));
    REQUIRE(first.ok());
    REQUIRE(first->code == 204);
    world.clock.now += 5;  // a later expiry would betray a second decision
    auto again = world.call(*world.meter_node, world.mef_address(), meter_bootstrap, post({"mef", "enrolment"}, 60, body));
    REQUIRE(again.ok());
    REQUIRE(again->code == 204);
    CHECK(again->payload == first->payload);
    REQUIRE(world.mef_enrolments() == 1);
  }
  SECTION("malformed CBOR body: 4.00") {
    auto answer = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                             post({"mef", "enrolment"}, 60, Bytes{0xff, 0x00, 0x13}));
    REQUIRE(answer.ok());
    REQUIRE(answer->code == 400);
    REQUIRE(error_body(*answer).error == "parse");
    REQUIRE(world.mef_enrolments() == 0);
  }
  SECTION("CBOR with an invalid-UTF-8 key or value or a repeated key: 4.00 naming it, nothing stored") {
    // { "certEnrolment": true, <key>: <value> } written by hand: no encoder writes these.
    const Bytes cert_true = {0xa2, 0x6d, 'c', 'e', 'r', 't', 'E', 'n', 'r', 'o', 'l', 'm', 'e', 'n', 't', 0xf5};
    struct Case {
      const char* name;
      Bytes tail;  // the second entry
      const char* says;
    };
    const Case cases[] = {
        {"invalid UTF-8 key", {0x62, 'x', 0xff, 0xf5}, "not valid UTF-8"},
        {"invalid UTF-8 value", {0x61, 'x', 0x62, 0xc3, 0x28}, "not valid UTF-8"},
        {"repeated key", {0x6d, 'c', 'e', 'r', 't', 'E', 'n', 'r', 'o', 'l', 'm', 'e', 'n', 't', 0xf4},
         "'certEnrolment' appears more than once"},
    };
    for (const auto& c : cases) {
      INFO(c.name);
      Bytes body = cert_true;
      body.insert(body.end(), c.tail.begin(), c.tail.end());
      auto answer =
          world.call(*world.meter_node, world.mef_address(), meter_bootstrap, post({"mef", "enrolment"}, 60, body));
      REQUIRE(answer.ok());
      CHECK(answer->code == 400);
      const auto refused = error_body(*answer);
      CHECK(refused.error == "parse");
      CHECK_THAT(refused.detail, Catch::Contains(c.says));
      CHECK(world.mef_enrolments() == 0);
    }
    // The valid request still enrols, on the same session.
    auto fine = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                           post({"mef", "enrolment"}, 60, rspf::encode(rspf::EnrolmentRequest{true, false, false},
                                                                        rspf::ContentFormat::cbor)));
    REQUIRE(fine.ok());
    CHECK(fine->code == 204);
    CHECK(world.mef_enrolments() == 1);
  }
  SECTION("asking for more than the policy offers: 4.03") {
    auto answer = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                             post({"mef", "enrolment"}, 60,
                                  rspf::encode(rspf::EnrolmentRequest{false, true, false}, rspf::ContentFormat::cbor)));
    REQUIRE(answer.ok());
    REQUIRE(answer->code == 403);
    REQUIRE(error_body(*answer).detail.find("MAF") != std::string::npos);
    REQUIRE(world.mef_enrolments() == 0);
  }
  SECTION("CSR for another AE-ID, CSR with a bad signature, CSR before enrolment") {
    auto key = crypto::PrivateKey::generate_p256();
    auto foreign = crypto::CertificateRequest::create(*key, "CAE-valve");
    auto own = crypto::CertificateRequest::create(*key, "CAE-meter");
    const std::vector<std::string> sen = {".well-known", "est", "sen"};

    auto early = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                            post(sen, rspf::kContentFormatPkcs10, own->der()));
    REQUIRE(early.ok());
    REQUIRE(early->code == 403);
    REQUIRE(error_body(*early).detail.find("enrolment on that same session first") != std::string::npos);

    auto enrolment = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                                post({"mef", "enrolment"}, 60,
                                     rspf::encode(rspf::EnrolmentRequest{true, false, false}, rspf::ContentFormat::cbor)));
    REQUIRE(enrolment.ok());
    REQUIRE(enrolment->code == 204);

    auto other_id = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                               post(sen, rspf::kContentFormatPkcs10, foreign->der()));
    REQUIRE(other_id.ok());
    REQUIRE(other_id->code == 403);
    REQUIRE(error_body(*other_id).detail.find("'CAE-valve'") != std::string::npos);

    Bytes tampered = own->der();
    tampered[tampered.size() - 3] ^= 0x01;  // inside the ECDSA signature value
    auto bad_signature = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                                    post(sen, rspf::kContentFormatPkcs10, tampered));
    REQUIRE(bad_signature.ok());
    REQUIRE(bad_signature->code == 400);

    auto wrong_format = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                                   post(sen, 60, own->der()));
    REQUIRE(wrong_format.ok());
    REQUIRE(wrong_format->code == 415);
    REQUIRE(world.mef_store->size(crypto::RecordKind::issuance) == 0);

    // The same session still gets a certificate for its own AE-ID: the MEF kept serving.
    auto good = world.call(*world.meter_node, world.mef_address(), meter_bootstrap,
                           post(sen, rspf::kContentFormatPkcs10, own->der()));
    REQUIRE(good.ok());
    REQUIRE(good->code == 204);
    REQUIRE(world.mef_store->size(crypto::RecordKind::issuance) == 1);
  }
  // Whatever was refused above, a proper enrolment still works.
  REQUIRE(world.enrol(*world.valve).ok());
}

TEST_CASE("key retrieval is refused to non-targets, for SUID 42, for revoked and for expired KeIDs",
          "[rspf][network][negative]") {
  World world;
  REQUIRE(world.enrol(*world.meter).ok());
  REQUIRE(world.enrol(*world.valve).ok());
  const std::string first_ke_id = *world.meter->ke_id();

  // The meter is not a target of the valve's KeID.
  auto credentials = world.meter->mef_credentials();
  auto request = get({"fetchCredentials", *world.valve->ke_id(), "22"});
  request.originator = "CAE-meter";
  auto non_target = world.call(*world.meter_node, world.mef_address(), *credentials, std::move(request));
  REQUIRE(non_target.ok());
  REQUIRE(non_target->code == 403);
  REQUIRE(error_body(*non_target).detail.find("not an Enrolment Target") != std::string::npos);

  // oneM2M-FR other than the authenticated AE-ID: 4.03 with RSC 4106.
  auto impersonation = fetch_as_valve(world, first_ke_id, "22", "CAE-pump");
  REQUIRE(impersonation.ok());
  REQUIRE(impersonation->code == 403);
  REQUIRE(impersonation->response_status == 4106u);

  auto suid42 = fetch_as_valve(world, first_ke_id, "42");
  REQUIRE(suid42.ok());
  REQUIRE(suid42->code == 403);
  REQUIRE(error_body(*suid42).detail.find("SUID 42") != std::string::npos);

  auto unknown = fetch_as_valve(world, "000102030405060708090A0B0C0D0E0F@mef.example.net", "22");
  REQUIRE(unknown.ok());
  REQUIRE(unknown->code == 404);

  // The valve may fetch; the meter enrols again (a second KeID) and the first one is revoked.
  auto allowed = fetch_as_valve(world, first_ke_id, "22");
  REQUIRE(allowed.ok());
  REQUIRE(allowed->code == 205);
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string second_ke_id = *world.meter->ke_id();
  REQUIRE(second_ke_id != first_ke_id);
  REQUIRE(world.mef->revoke(first_ke_id).ok());
  REQUIRE(world.log.contains("revoked KeID " + first_ke_id));
  auto revoked = fetch_as_valve(world, first_ke_id, "22");
  REQUIRE(revoked.ok());
  REQUIRE(revoked->code == 403);
  REQUIRE(error_body(*revoked).detail.find("revoked") != std::string::npos);
  REQUIRE(world.mef->lookup_psk(first_ke_id).error().code == Errc::denied);  // no re-authentication either

  // Past the meter's expiry (the valve's enrolment lasts longer): refused as expired.
  world.clock.now += test::kMeterLifetime + 1;
  auto expired = fetch_as_valve(world, second_ke_id, "22");
  REQUIRE(expired.ok());
  REQUIRE(expired->code == 403);
  REQUIRE(error_body(*expired).detail.find("expired") != std::string::npos);
  REQUIRE(world.meter->key_for_target("CAE-valve").error().code == Errc::expired);

  // A KeID of an MEF the target has no contact for is refused and reported, nothing fetched.
  std::vector<std::string> reported;
  world.valve_keys->set_fetch_observer([&](const std::string& id, const Result<void>&) { reported.push_back(id); });
  auto foreign = world.valve_keys->lookup_psk("000102030405060708090A0B0C0D0E0F@other-mef.example.org");
  REQUIRE(foreign.error().code == Errc::denied);
  REQUIRE(reported.size() == 1);
  REQUIRE(world.valve_keys->fetches_pending() == 0);
}

TEST_CASE("an Enrolee whose KpmID writes the MEF's FQDN in capitals enrols: the MEF compares it as a DNS name",
          "[rspf][network]") {
  World world;
  const SecretBuffer kpm = SecretBuffer::random(32);
  // The MEF's enrolee table holds the KpmID as the daemon stores it (canonical) ...
  World::put(*world.mef_store, World::enrolee_row("dial@mef.example.net", kpm, "CAE-dial", {}, 600, false));
  // ... and the device was provisioned with the MEF's name written in another case (PROTOCOL.md §1).
  World::put(*world.valve_store, crypto::BootstrapKeyRecord{"dial@MEF.Example.NET", kpm.clone(), "CAE-dial"});
  auto dial = world.make_enrolee(*world.valve_node, *world.valve_store, "dial@MEF.Example.NET", false);
  CHECK(dial->mef_fqdn() == test::kMefFqdn);  // the SNI it sends

  auto enrolled = world.enrol(*dial);
  INFO((enrolled.ok() ? std::string("ok") : enrolled.error().to_string()));
  REQUIRE(enrolled.ok());
  // Both ends derived the same KeID, its FQDN part canonical, and the MEF's record names the right enrolee.
  REQUIRE(dial->ke_id().has_value());
  REQUIRE(crypto::parse_ke_id(*dial->ke_id())->mef_fqdn == test::kMefFqdn);
  const auto* at_mef = world.mef_store->find<crypto::EnrolmentKeyRecord>(*dial->ke_id());
  REQUIRE(at_mef != nullptr);
  REQUIRE(at_mef->enrolee_id == "CAE-dial");
}

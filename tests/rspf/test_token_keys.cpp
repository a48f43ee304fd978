// Keys in a PKCS#11 token in the rspf roles (PROTOCOL.md §3.6): an Enrolee whose EST key is generated in a
// throwaway SoftHSM2 token (tests/support/softhsm_token.hpp) gets its AE-ID certificate over real DTLS from the MEF,
// the store names the key by its URI and holds no private key bytes, and a renewal reuses the token key.
#include <catch2/catch.hpp>

#include "dauth/crypto/token.hpp"
#include "network_world.hpp"
#include "softhsm_token.hpp"

using namespace dauth;
using dauth::test::World;

TEST_CASE("an Enrolee's EST key generated in a PKCS#11 token: certificate issued, key named by URI, reused on renewal",
          "[rspf][network][est][token]") {
  test::ThrowawayToken softhsm("dauth-enrolee");
  crypto::TokenOptions options;
  options.module_path = test::ThrowawayToken::module_path();
  auto token = std::make_shared<crypto::Token>(crypto::Token::open(options, softhsm.pin_buffer()).value());
  const std::string uri = softhsm.uri("CAE-meter-est");

  World world(/*with_ca=*/true);
  rspf::EnroleeConfig config;
  config.kpm_id = test::kMeterKpmId;
  config.mef_address = world.mef_address();
  config.request_certificate = true;
  config.clock = world.clock.function();
  config.log = world.log.sink();
  config.certificate_key = [token, uri] { return token->private_key_or_generate(uri); };
  world.meter = rspf::Enrolee::create(*world.meter_node, *world.meter_store, std::move(config)).value();

  auto enrolled = world.enrol(*world.meter);
  INFO((enrolled.ok() ? std::string("ok") : enrolled.error().to_string()));
  REQUIRE(enrolled.ok());
  const auto* stored = world.meter_store->find<crypto::CertificateRecord>("CAE-meter");
  REQUIRE(stored != nullptr);
  CHECK(stored->private_key_uri == uri);
  CHECK(stored->private_key_der.empty());
  const auto certificate = crypto::Certificate::parse(ByteView(stored->chain_der.front())).value();
  CHECK(certificate.verify(*world.ca_certificate, static_cast<std::time_t>(world.clock.now)).ok());
  const crypto::PrivateKey key = token->private_key(uri).value();
  CHECK(certificate.public_key_id() == key.public_key_id());
  const std::string first_serial = certificate.serial_hex();

  // A new enrolment renews the certificate for the same token key (generated once, on first use).
  world.clock.now += 120;
  auto renewed = world.enrol(*world.meter);
  INFO((renewed.ok() ? std::string("ok") : renewed.error().to_string()));
  REQUIRE(renewed.ok());
  stored = world.meter_store->find<crypto::CertificateRecord>("CAE-meter");
  REQUIRE(stored != nullptr);
  const auto second = crypto::Certificate::parse(ByteView(stored->chain_der.front())).value();
  CHECK(second.serial_hex() != first_serial);
  CHECK(second.public_key_id() == key.public_key_id());
}

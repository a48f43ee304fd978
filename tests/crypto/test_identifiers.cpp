// Identifier validation (PROTOCOL.md §1, §3.1, §3.3): accepted forms, refused forms, and errors that quote the value.
#include <catch2/catch.hpp>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/secret.hpp"

namespace crypto = dauth::crypto;
using dauth::SecretBuffer;

TEST_CASE("AE-IDs: plain, SP-relative and absolute forms are accepted", "[identifiers]") {
  for (const char* ok : {"CAE-meter-01", "/in-cse/CAE-meter-01", "//m2m.example.net/in-cse/CAE-meter-01", "S9",
                         "a.b_c~d-e", "C"}) {
    INFO(ok);
    REQUIRE(crypto::validate_ae_id(ok).ok());
  }
  REQUIRE(crypto::validate_ae_id(std::string(128, 'a')).ok());
}

TEST_CASE("AE-IDs: bad length, characters and shapes are refused with the reason", "[identifiers]") {
  struct Case {
    std::string value;
    std::string says;
  };
  const Case cases[] = {
      {"", "length 0, must be 1–128"},
      {std::string(129, 'a'), "length 129"},
      {"CAE meter", "character ' ' at position 4"},
      {"CAE:meter", "':' at position 4"},
      {"urn:x-onem2m:ae:x", "not allowed"},
      {"///x/y", "more than two leading"},
      {"/", "no name"},
      {"CAE-x/", "ends with '/'"},
      {"/cse//x", "empty segment"},
      {std::string("CAE\xc3\xa9", 5), "\\xc3"},
  };
  for (const auto& c : cases) {
    auto result = crypto::validate_ae_id(c.value);
    INFO(c.value);
    REQUIRE_FALSE(result.ok());
    REQUIRE(result.error().code == dauth::Errc::invalid_argument);
    REQUIRE_THAT(result.error().message, Catch::Contains(c.says));
    REQUIRE_THAT(result.error().message, Catch::StartsWith("AE-ID '"));
  }
}

TEST_CASE("FQDNs follow RFC 1123", "[identifiers]") {
  for (const char* ok : {"mef.example.net", "a", "x-1.y2", "MEF.EXAMPLE.NET"}) REQUIRE(crypto::validate_fqdn(ok).ok());
  for (const char* bad : {"", ".a", "a.", "a..b", "-a.b", "a-.b", "a_b.c", "a b"}) {
    INFO(bad);
    REQUIRE_FALSE(crypto::validate_fqdn(bad).ok());
  }
  REQUIRE_FALSE(crypto::validate_fqdn(std::string(64, 'a') + ".b").ok());
  REQUIRE_FALSE(crypto::validate_fqdn(std::string(254, 'a')).ok());
}

TEST_CASE("KpmIDs are <relative>@<MEF-FQDN>", "[identifiers]") {
  REQUIRE(crypto::validate_kpm_id("meter-01@mef.example.net").ok());
  REQUIRE(crypto::validate_kpm_id("a.b_c-d@m").ok());
  REQUIRE_THAT(crypto::validate_kpm_id("meter").error().message, Catch::Contains("no '@'"));
  REQUIRE_THAT(crypto::validate_kpm_id("@mef.example").error().message, Catch::Contains("length 0"));
  REQUIRE_THAT(crypto::validate_kpm_id("a@b@c").error().message, Catch::Contains("more than one '@'"));
  REQUIRE_THAT(crypto::validate_kpm_id("me ter@mef").error().message, Catch::Contains("letters, digits"));
  REQUIRE_THAT(crypto::validate_kpm_id("meter@mef_x").error().message, Catch::Contains("not a valid FQDN"));
  REQUIRE_FALSE(crypto::validate_kpm_id(std::string(65, 'k') + "@mef").ok());
  REQUIRE(*crypto::issuer_fqdn_of("meter@mef.example.net") == "mef.example.net");
}

TEST_CASE("KeIDs: 32 hex digits @ FQDN, case-insensitive", "[identifiers]") {
  auto id = crypto::parse_ke_id("00112233445566778899aabbccddeeff@MEF.example.net");
  REQUIRE(id.ok());
  REQUIRE(id->relative[0] == 0x00);
  REQUIRE(id->relative[15] == 0xff);
  REQUIRE(id->text() == "00112233445566778899AABBCCDDEEFF@mef.example.net");
  REQUIRE_THAT(crypto::parse_ke_id("0011@mef").error().message, Catch::Contains("must be 32 hex digits"));
  REQUIRE_THAT(crypto::parse_ke_id("0011223344556677889XAABBCCDDEEFF@mef").error().message,
               Catch::Contains("not hexadecimal"));
  REQUIRE_FALSE(crypto::parse_ke_id("00112233445566778899AABBCCDDEEFF").ok());
}

TEST_CASE("quote_for_error escapes and truncates", "[identifiers]") {
  REQUIRE(crypto::quote_for_error("abc") == "'abc'");
  REQUIRE(crypto::quote_for_error(std::string("a\nb", 3)) == "'a\\x0ab'");
  REQUIRE(crypto::quote_for_error("it's") == "'it\\x27s'");
  REQUIRE(crypto::quote_for_error(std::string(70, 'x')) == "'" + std::string(64, 'x') + "...'");
}

// The vectors were computed independently of this code (python3):
//   import hashlib, base64
//   name = lambda ae: "ae-" + base64.b32encode(hashlib.sha256(ae.encode()).digest()[:20]).decode().lower().rstrip("=")
TEST_CASE("server names: an AE-ID that is a DNS name is sent as it is", "[identifiers]") {
  for (const char* dns : {"CAE-valve", "CAE-Valve.example", "S9", "a", "gw-1.example.net"}) {
    INFO(dns);
    CHECK(crypto::server_name_for_ae_id(dns) == dns);
  }
  const std::string longest_label(63, 'a');
  CHECK(crypto::server_name_for_ae_id(longest_label) == longest_label);
}

TEST_CASE("server names: any other AE-ID is ae- and base32 of 20 bytes of its SHA-256", "[identifiers]") {
  struct Vector {
    std::string ae_id;
    std::string server_name;
  };
  const Vector vectors[] = {
      {"/in-cse/CAE-sp-valve", "ae-hmcy3sydfhrarmgwkin7datqpozvciyc"},
      {"//m2m.example.net/in-cse/CAE-meter-01", "ae-xqmdfax4sdi53wybeh72yevkczdkl7po"},
      {"C_meter", "ae-bgvqn2txudyhtt6iborpcjdlcrak7n6x"},
      {"CAE-x~1", "ae-jfxv76s3usgvsjqhbgucyhqalswxel2c"},
      {"CAE-", "ae-32gbvuuirutb6dimkenwqrevb6pst3i7"},  // a label may not end with '-'
      {std::string(64, 'a'), "ae-77qfj7t24dfw3rs4hl43mhksbh2dtbi5"},  // a label longer than 63
  };
  for (const auto& vector : vectors) {
    INFO(vector.ae_id);
    const std::string name = crypto::server_name_for_ae_id(vector.ae_id);
    CHECK(name == vector.server_name);
    CHECK(crypto::validate_fqdn(name).ok());  // what a TLS server accepts as SNI
  }
}

TEST_CASE("canonical FQDNs are lower-case ASCII and compare case-insensitively", "[identifiers]") {
  REQUIRE(crypto::canonical_fqdn("MEF.Example.COM") == "mef.example.com");
  REQUIRE(crypto::canonical_fqdn("mef-1.example.com") == "mef-1.example.com");
  REQUIRE(crypto::same_fqdn("MEF.Example.COM", "mef.example.com"));
  REQUIRE_FALSE(crypto::same_fqdn("mef.example.com", "mef.example.net"));
  // RFC 1123 names are ASCII: bytes beyond it are not case-folded (no locale tolower).
  REQUIRE(crypto::canonical_fqdn("\xC3\x89") == "\xC3\x89");
  REQUIRE_FALSE(crypto::validate_fqdn("mef.example.com.").ok());  // no trailing dot to strip: it is refused
}

TEST_CASE("canonical KpmIDs keep the relative part and lower-case the MEF FQDN", "[identifiers]") {
  REQUIRE(*crypto::canonical_kpm_id("Meter-01@MEF.Example.COM") == "Meter-01@mef.example.com");
  REQUIRE(*crypto::canonical_kpm_id("meter@mef.example.com") == "meter@mef.example.com");
  REQUIRE_THAT(crypto::canonical_kpm_id("meter@mef_x").error().message, Catch::Contains("not a valid FQDN"));
  REQUIRE(crypto::key_id_names_mef("meter@mef.example.com", "MEF.Example.COM"));
  REQUIRE(crypto::key_id_names_mef("00112233445566778899AABBCCDDEEFF@Mef.Example.com", "mef.example.com"));
  REQUIRE_FALSE(crypto::key_id_names_mef("meter@mef.example.net", "mef.example.com"));
  REQUIRE_FALSE(crypto::key_id_names_mef("meter", "mef.example.com"));
}

TEST_CASE("KeID and enrolment key FQDNs use the canonical form", "[identifiers]") {
  auto id = crypto::parse_ke_id("00112233445566778899aabbccddeeff@MEF.Example.COM");
  REQUIRE(id.ok());
  REQUIRE(id->mef_fqdn == crypto::canonical_fqdn("MEF.Example.COM"));
  auto exported = SecretBuffer::random(crypto::kBootstrapExportSize);
  auto key = crypto::split_bootstrap_export(exported, "MEF.Example.COM");
  REQUIRE(key.ok());
  REQUIRE(key->ke_id.mef_fqdn == "mef.example.com");
}

TEST_CASE("canonical serials are Certificate::serial_hex spellings: upper-case whole octets without leading zeros",
          "[identifiers]") {
  REQUIRE(*crypto::canonical_serial("0a1b") == "0A1B");
  REQUIRE(*crypto::canonical_serial("A1B") == "0A1B");
  REQUIRE(*crypto::canonical_serial("000A1B") == "0A1B");
  REQUIRE(*crypto::canonical_serial("008f") == "8F");  // a DER sign octet is not part of the number
  REQUIRE(*crypto::canonical_serial("0") == "00");
  REQUIRE(*crypto::canonical_serial(std::string(40, 'f')) == std::string(40, 'F'));
  REQUIRE_THAT(crypto::canonical_serial("").error().message, Catch::Contains("must be 1–40 hex digits"));
  REQUIRE_FALSE(crypto::canonical_serial(std::string(41, 'a')).ok());
  REQUIRE_THAT(crypto::canonical_serial("0x1F").error().message, Catch::Contains("not hexadecimal"));
  REQUIRE_FALSE(crypto::canonical_serial("0A:1B").ok());

  // A certificate whose DER serial needs a sign octet (0x00 0x8F ...) prints as the canonical serial.
  auto ca = crypto::CertificateAuthority::create_self_signed(crypto::PrivateKey::generate_p256().value(),
                                                             "CN=serial test CA", 1700000000, 1800000000);
  REQUIRE(ca.ok());
  crypto::IssueParams params;
  params.serial = {0x8F, 0x01, 0x02};
  params.not_before = 1700000000;
  params.not_after = 1800000000;
  auto certificate = ca->issue_for_key(crypto::PrivateKey::generate_p256().value(), {"serial test", {}, {}}, params);
  REQUIRE(certificate.ok());
  REQUIRE(certificate->serial_hex() == "8F0102");
  REQUIRE(*crypto::canonical_serial("008f0102") == certificate->serial_hex());
}

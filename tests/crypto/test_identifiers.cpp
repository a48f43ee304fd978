// Identifier validation (PROTOCOL.md §1, §3.1, §3.3): accepted forms, refused forms, and errors that quote the value.
#include <catch2/catch.hpp>

#include "dauth/crypto/identifiers.hpp"

namespace crypto = dauth::crypto;

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

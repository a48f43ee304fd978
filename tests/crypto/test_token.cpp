// PKCS#11 keys through crypto::Token on a throwaway SoftHSM2 token per test (tests/support/softhsm_token.hpp): keys
// generated in the token are not extractable (asked through PKCS#11 itself, with p11-kit), signatures made in the
// token verify with mbedTLS and with the `openssl` command, a CA whose key is in the token issues certificates that
// `openssl verify` accepts, and a wrong PIN, a missing token or a bad URI are clear errors.
#include <catch2/catch.hpp>
#include <p11-kit/p11-kit.h>
#include <p11-kit/pkcs11.h>

#include <ctime>
#include <string>
#include <vector>

#include "dauth/crypto/token.hpp"
#include "dauth/crypto/x509.hpp"
#include "softhsm_token.hpp"
#include "support.hpp"

namespace crypto = dauth::crypto;
using dauth::Errc;
using dauth::test::ThrowawayToken;

namespace {

constexpr std::time_t kDay = 24 * 3600;

template <class T>
T must(dauth::Result<T> result) {
  INFO((result.ok() ? std::string() : result.error().to_string()));
  REQUIRE(result.ok());
  return std::move(result).value();
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

crypto::Token open_softhsm(const ThrowawayToken& token) {
  crypto::TokenOptions options;
  options.module_path = ThrowawayToken::module_path();
  return must(crypto::Token::open(options, token.pin_buffer()));
}

std::string must_run(const std::vector<std::string>& argv) {
  const auto result = dauth::test::run_command(argv);
  INFO(argv.front() << " ->\n" << result.output);
  REQUIRE(result.exit_code == 0);
  return result.output;
}

// What the token itself says about the private key labelled `label`, asked directly through PKCS#11 (p11-kit
// loading SoftHSM2), independently of crypto::Token.
struct PrivateKeyAttributes {
  CK_RV value_rv = CKR_OK;  // C_GetAttributeValue(CKA_VALUE)
  CK_BBOOL sensitive = CK_FALSE;
  CK_BBOOL extractable = CK_TRUE;
  CK_BBOOL persistent = CK_FALSE;  // CKA_TOKEN
  std::size_t found = 0;
};

PrivateKeyAttributes ask_the_token(const ThrowawayToken& token, const std::string& label) {
  PrivateKeyAttributes out;
  CK_FUNCTION_LIST* module = p11_kit_module_load(ThrowawayToken::module_path().c_str(), 0);
  REQUIRE(module != nullptr);
  REQUIRE(p11_kit_module_initialize(module) == CKR_OK);
  CK_SLOT_ID slots[8];
  CK_ULONG slot_count = 8;
  REQUIRE(module->C_GetSlotList(CK_TRUE, slots, &slot_count) == CKR_OK);
  for (CK_ULONG i = 0; i < slot_count; ++i) {
    CK_TOKEN_INFO info;
    REQUIRE(module->C_GetTokenInfo(slots[i], &info) == CKR_OK);
    if (std::string(reinterpret_cast<char*>(info.label), p11_kit_space_strlen(info.label, sizeof info.label)) !=
        token.label()) {
      continue;
    }
    CK_SESSION_HANDLE session = 0;
    REQUIRE(module->C_OpenSession(slots[i], CKF_SERIAL_SESSION, nullptr, nullptr, &session) == CKR_OK);
    std::string pin = token.pin();
    REQUIRE(module->C_Login(session, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(pin.data()), pin.size()) == CKR_OK);
    CK_OBJECT_CLASS klass = CKO_PRIVATE_KEY;
    std::string label_copy = label;
    CK_ATTRIBUTE search[] = {{CKA_CLASS, &klass, sizeof klass}, {CKA_LABEL, label_copy.data(), label_copy.size()}};
    REQUIRE(module->C_FindObjectsInit(session, search, 2) == CKR_OK);
    CK_OBJECT_HANDLE objects[4];
    CK_ULONG count = 0;
    REQUIRE(module->C_FindObjects(session, objects, 4, &count) == CKR_OK);
    module->C_FindObjectsFinal(session);
    out.found = count;
    if (count == 1) {
      unsigned char value[256];
      CK_ATTRIBUTE query{CKA_VALUE, value, sizeof value};
      out.value_rv = module->C_GetAttributeValue(session, objects[0], &query, 1);
      CK_ATTRIBUTE flags[] = {{CKA_SENSITIVE, &out.sensitive, sizeof out.sensitive},
                              {CKA_EXTRACTABLE, &out.extractable, sizeof out.extractable},
                              {CKA_TOKEN, &out.persistent, sizeof out.persistent}};
      REQUIRE(module->C_GetAttributeValue(session, objects[0], flags, 3) == CKR_OK);
    }
    module->C_CloseSession(session);
  }
  p11_kit_module_finalize(module);
  p11_kit_module_release(module);
  return out;
}

}  // namespace

TEST_CASE("a throwaway SoftHSM token lives in its own directory and goes away with it") {
  std::filesystem::path directory;
  {
    ThrowawayToken token("dauth-throwaway");
    directory = token.directory();
    token.add_token("dauth-second");
    const auto slots = token.run({"softhsm2-util", "--show-slots"});
    CHECK(contains(slots.output, "dauth-throwaway"));
    CHECK(contains(slots.output, "dauth-second"));
    CHECK(!std::filesystem::is_empty(token.token_directory()));
    CHECK(token.uri("my key") == "pkcs11:token=dauth-throwaway;object=my%20key");
  }
  CHECK(!std::filesystem::exists(directory));
}

TEST_CASE("a throwaway SoftHSM token imports a PEM private key that p11tool then lists") {
  ThrowawayToken token("dauth-import");
  const auto pem = token.directory() / "key.pem";
  token.run({"openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", pem.string()});
  const std::string uri = token.import_private_key(pem, "imported", "0a");
  CHECK(uri == "pkcs11:token=dauth-import;object=imported;type=private");
  const auto listed =
      token.run({"p11tool", "--list-all-privkeys", "--login", "--set-pin=" + token.pin(), "pkcs11:token=dauth-import"});
  CHECK(contains(listed.output, "object=imported;type=private"));
  CHECK(contains(listed.output, "ID: 0a"));
}

TEST_CASE("token: a key generated in the token is sensitive and not extractable and outlives the process's handle",
          "[token]") {
  ThrowawayToken softhsm("dauth-generate");
  const std::string uri = softhsm.uri("enrolee-key") + ";id=%42";
  std::string public_key_id;
  {
    const crypto::Token token = open_softhsm(softhsm);
    const crypto::PrivateKey key = must(token.generate_p256(uri));
    CHECK(key.in_token());
    CHECK(key.token_uri() == uri);
    public_key_id = key.public_key_id();
    // Neither the PEM nor the DER of the private value: it is not in this process.
    auto pem = key.to_pem();
    REQUIRE(!pem);
    CHECK(pem.error().code == Errc::unsupported);
    CHECK(contains(pem.error().message, "stays in its PKCS#11 token"));
    auto again = token.generate_p256(uri);
    REQUIRE(!again);
    CHECK(again.error().code == Errc::exists);
  }
  const PrivateKeyAttributes attributes = ask_the_token(softhsm, "enrolee-key");
  REQUIRE(attributes.found == 1);
  CHECK(attributes.value_rv == CKR_ATTRIBUTE_SENSITIVE);
  CHECK(attributes.sensitive == CK_TRUE);
  CHECK(attributes.extractable == CK_FALSE);
  CHECK(attributes.persistent == CK_TRUE);
  // A new handle on the token finds the same key, by label and by id.
  const crypto::Token reopened = open_softhsm(softhsm);
  CHECK(must(reopened.private_key(softhsm.uri("enrolee-key"))).public_key_id() == public_key_id);
  CHECK(must(reopened.private_key("pkcs11:token=dauth-generate;id=%42;type=private")).public_key_id() ==
        public_key_id);
  CHECK(must(reopened.private_key_or_generate(uri)).public_key_id() == public_key_id);
}

TEST_CASE("token: a CSR signed in the token verifies with mbedTLS and with openssl", "[token]") {
  ThrowawayToken softhsm("dauth-csr");
  const crypto::Token token = open_softhsm(softhsm);
  const crypto::PrivateKey key = must(token.private_key_or_generate(softhsm.uri("ae-key")));
  const crypto::CertificateRequest csr = must(crypto::CertificateRequest::create(key, "CAE-meter-1"));
  CHECK(csr.verify_signature().ok());
  CHECK(csr.public_key_der() == key.public_key_der());
  const auto path = softhsm.directory() / "request.pem";
  dauth::test::write_file(path, csr.pem());
  const std::string checked = must_run({"openssl", "req", "-in", path.string(), "-verify", "-noout"});
  CHECK(contains(checked, "verify OK"));
}

TEST_CASE("token: a key imported into the token signs what its in-memory copy's public key verifies", "[token]") {
  ThrowawayToken softhsm("dauth-imported");
  const crypto::PrivateKey in_memory = must(crypto::PrivateKey::generate_p256());
  const auto pem_path = softhsm.directory() / "device.pem";
  const dauth::SecretBuffer pem = must(in_memory.to_pem());
  dauth::test::write_file(pem_path, std::string(reinterpret_cast<const char*>(pem.data()), pem.size()));
  const std::string uri = softhsm.import_private_key(pem_path, "device", "01");
  const crypto::Token token = open_softhsm(softhsm);
  const crypto::PrivateKey in_token = must(token.private_key(uri));
  CHECK(in_token.public_key_id() == in_memory.public_key_id());
  // A certificate for the token key issued by an in-memory CA, and a CSR signed in the token: both verify.
  const std::time_t now = std::time(nullptr);
  auto ca = must(crypto::CertificateAuthority::create_self_signed(must(crypto::PrivateKey::generate_p256()),
                                                                  "CN=Test CA", now - kDay, now + 30 * kDay));
  const crypto::CertificateRequest csr = must(crypto::CertificateRequest::create(in_token, "CAE-imported"));
  REQUIRE(csr.verify_signature().ok());
  crypto::IssueParams params{{0x01, 0x02}, now - 60, now + kDay};
  const crypto::Certificate certificate = must(ca.issue(csr, "CAE-imported", params));
  CHECK(certificate.public_key_id() == in_memory.public_key_id());
}

TEST_CASE("token: a CA whose key is in the token issues certificates that openssl verify accepts", "[token]") {
  ThrowawayToken softhsm("dauth-mef");
  const crypto::Token token = open_softhsm(softhsm);
  const std::time_t now = std::time(nullptr);
  crypto::PrivateKey ca_key = must(token.generate_p256(softhsm.uri("mef-ca")));
  const crypto::CertificateAuthority created = must(
      crypto::CertificateAuthority::create_self_signed(std::move(ca_key), "CN=MEF CA", now - kDay, now + 365 * kDay));
  // As the MEF does at start: the CA certificate from a file, its key from the token.
  const crypto::CertificateAuthority ca = must(crypto::CertificateAuthority::from(
      must(crypto::Certificate::parse(created.certificate().der())), must(token.private_key(softhsm.uri("mef-ca")))));

  const crypto::PrivateKey enrolee_key = must(crypto::PrivateKey::generate_p256());
  const crypto::CertificateRequest csr = must(crypto::CertificateRequest::create(enrolee_key, "CAE-meter-7"));
  crypto::IssueParams params{{0x10, 0x20, 0x30}, now - 60, now + 30 * kDay};
  const crypto::Certificate issued = must(ca.issue(csr, "CAE-meter-7", params));
  CHECK(issued.verify(ca.certificate(), now).ok());
  crypto::IssueParams fqdn_params{{0x11}, now - 60, now + 30 * kDay};
  const crypto::Certificate server = must(ca.issue_for_key(must(token.generate_p256(softhsm.uri("mef-server"))),
                                                           {"mef.example", {}, {"mef.example"}}, fqdn_params));
  CHECK(server.verify(ca.certificate(), now).ok());

  const auto ca_path = softhsm.directory() / "ca.pem";
  const auto leaf_path = softhsm.directory() / "leaf.pem";
  const auto server_path = softhsm.directory() / "server.pem";
  dauth::test::write_file(ca_path, ca.certificate().pem());
  dauth::test::write_file(leaf_path, issued.pem());
  dauth::test::write_file(server_path, server.pem());
  CHECK(contains(must_run({"openssl", "verify", "-x509_strict", "-CAfile", ca_path.string(), leaf_path.string(),
                           server_path.string()}),
                 leaf_path.string() + ": OK"));
  // The Authority Key Identifier of the issued certificate is the CA key's (openssl prints both the same way).
  const std::string ca_text =
      must_run({"openssl", "x509", "-in", ca_path.string(), "-noout", "-ext", "subjectKeyIdentifier"});
  const std::string leaf_text =
      must_run({"openssl", "x509", "-in", leaf_path.string(), "-noout", "-ext", "authorityKeyIdentifier"});
  const std::string ski = ca_text.substr(ca_text.find('\n') + 1);
  REQUIRE(ski.size() > 40);
  CHECK(contains(leaf_text, ski.substr(ski.find_first_not_of(' '), 59)));

  // Another token key is not the CA's key.
  auto mismatched = crypto::CertificateAuthority::from(must(crypto::Certificate::parse(ca.certificate().der())),
                                                       must(token.private_key(softhsm.uri("mef-server"))));
  REQUIRE(!mismatched);
  CHECK(contains(mismatched.error().message, "does not belong to its public key"));
}

TEST_CASE("token: a wrong PIN, a missing token, key or module and bad URIs are clear errors", "[token]") {
  ThrowawayToken softhsm("dauth-errors");
  softhsm.add_token("dauth-other");
  crypto::TokenOptions options;
  options.module_path = ThrowawayToken::module_path();

  SECTION("wrong PIN: refused by the token, the PIN not in the message") {
    const std::string wrong = "9999-wrong-pin";
    const crypto::Token token =
        must(crypto::Token::open(options, dauth::SecretBuffer::copy_of(dauth::ByteView::of(wrong))));
    auto key = token.private_key(softhsm.uri("any"));
    REQUIRE(!key);
    CHECK(key.error().code == Errc::permission);
    CHECK(contains(key.error().message, "token 'dauth-errors'"));
    CHECK(contains(key.error().message, "wrong PIN"));
    CHECK(!contains(key.error().message, wrong));
  }
  SECTION("missing token: the tokens present are listed") {
    const crypto::Token token = open_softhsm(softhsm);
    auto key = token.private_key("pkcs11:token=absent;object=k");
    REQUIRE(!key);
    CHECK(key.error().code == Errc::not_found);
    CHECK(contains(key.error().message, "'pkcs11:token=absent;object=k'"));
    CHECK(contains(key.error().message, "token 'dauth-errors'"));
    CHECK(contains(key.error().message, "token 'dauth-other'"));
  }
  SECTION("missing key, ambiguous token") {
    const crypto::Token token = open_softhsm(softhsm);
    auto key = token.private_key(softhsm.uri("nothing-here"));
    REQUIRE(!key);
    CHECK(key.error().code == Errc::not_found);
    CHECK(contains(key.error().message, "no private key 'nothing-here' in token 'dauth-errors'"));
    auto ambiguous = token.private_key("pkcs11:manufacturer=SoftHSM%20project;object=k");
    REQUIRE(!ambiguous);
    CHECK(ambiguous.error().code == Errc::exists);
    CHECK(contains(ambiguous.error().message, "2 tokens"));
  }
  SECTION("missing module") {
    crypto::TokenOptions missing;
    missing.module_path = (softhsm.directory() / "no-such-module.so").string();
    auto token = crypto::Token::open(missing, softhsm.pin_buffer());
    REQUIRE(!token);
    CHECK(token.error().code == Errc::not_found);
    CHECK(contains(token.error().message, "no-such-module.so"));
  }
  SECTION("bad URIs: a PIN inside, an unknown attribute, no key named, not a URI, not a private key") {
    const crypto::Token token = open_softhsm(softhsm);
    for (const std::string uri :
         {"pkcs11:token=dauth-errors;object=k?pin-value=1234", "pkcs11:token=dauth-errors;objet=k",
          "pkcs11:token=dauth-errors", "/etc/dauth/key.pem", "pkcs11:token=dauth-errors;object=k;type=cert"}) {
      auto key = token.private_key(uri);
      INFO(uri);
      REQUIRE(!key);
      CHECK(key.error().code == Errc::invalid_argument);
      CHECK(!contains(key.error().message, "1234"));
    }
  }
}

TEST_CASE("token: p11-kit's registered modules find the SoftHSM token as GnuTLS would", "[token]") {
  ThrowawayToken softhsm("dauth-registered");
  const crypto::Token token = must(crypto::Token::open(crypto::TokenOptions{}, softhsm.pin_buffer()));
  const crypto::PrivateKey key = must(token.generate_p256(softhsm.uri("registered-key")));
  // p11tool (GnuTLS, the library transport/ uses) sees the key under the same URI.
  const auto listed = softhsm.run({"p11tool", "--list-all-privkeys", "--login", "--set-pin=" + softhsm.pin(),
                                   "pkcs11:token=dauth-registered"});
  CHECK(contains(listed.output, "object=registered-key;type=private"));
  CHECK(contains(listed.output, "CKA_SENSITIVE"));
  CHECK(crypto::is_pkcs11_uri("PKCS11:token=x"));
  CHECK(!crypto::is_pkcs11_uri("/var/lib/dauth/pkcs11:key.pem"));
}

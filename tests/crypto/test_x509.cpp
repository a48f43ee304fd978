// X.509 on mbedTLS 2.28 (PROTOCOL.md §3.6, §4; TS-0003 §10.1): our CA, CSRs and keys checked by our parser and by the
// `openssl` command as an independent consumer; certificates and CSRs made by `openssl` parsed by our code; RFC
// 6920 key names checked against Python's hashlib; hostile input (truncated, garbage, tampered, junk PEM) refused.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <string>
#include <vector>

#include "dauth/crypto/x509.hpp"
#include "support.hpp"

namespace crypto = dauth::crypto;
using dauth::Bytes;
using dauth::ByteView;
using dauth::Errc;
using dauth::SecretBuffer;
using dauth::test::read_binary_file;
using dauth::test::read_text_file;
using dauth::test::run_command;
using dauth::test::TempDir;
using dauth::test::write_file;

namespace {

constexpr std::time_t kDay = 24 * 3600;

// Runs a command that must succeed and returns its output.
std::string must_run(const std::vector<std::string>& argv) {
  const auto result = run_command(argv);
  INFO(argv.front() << " " << (argv.size() > 1 ? argv[1] : "") << " ->\n" << result.output);
  REQUIRE(result.exit_code == 0);
  return result.output;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

template <class T>
T must(dauth::Result<T> result) {
  INFO((result.ok() ? std::string() : result.error().to_string()));
  REQUIRE(result.ok());
  return std::move(result).value();
}

void must(const dauth::Result<void>& result) {
  INFO((result.ok() ? std::string() : result.error().to_string()));
  REQUIRE(result.ok());
}

std::string text_of(const SecretBuffer& secret) {
  return std::string(reinterpret_cast<const char*>(secret.data()), secret.size());
}

crypto::IssueParams params_for(Bytes serial, std::time_t not_before, std::time_t not_after) {
  crypto::IssueParams params;
  params.serial = std::move(serial);
  params.not_before = not_before;
  params.not_after = not_after;
  return params;
}

// Independent RFC 6920 §3 computation: sha-256 digest, base64url without padding (Python's hashlib + base64).
std::string python_ni_name(const std::filesystem::path& der_file) {
  std::string out = must_run({"python3", "-c",
                              "import hashlib,base64,sys\n"
                              "d=hashlib.sha256(open(sys.argv[1],'rb').read()).digest()\n"
                              "print('ni:///sha-256;'+base64.urlsafe_b64encode(d).decode().rstrip('='))",
                              der_file.string()});
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

struct OpensslCa {
  std::filesystem::path cert;
  std::filesystem::path key;
};

// A P-256 CA made entirely by the openssl command.
OpensslCa make_openssl_ca(const TempDir& dir, const std::string& name) {
  OpensslCa ca{dir / (name + ".pem"), dir / (name + ".key")};
  must_run({"openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", ca.key.string()});
  must_run({"openssl", "req", "-x509", "-new", "-key", ca.key.string(), "-sha256", "-subj", "/CN=" + name, "-days",
            "30", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext",
            "keyUsage=critical,keyCertSign,cRLSign", "-out", ca.cert.string()});
  return ca;
}

// A P-256 leaf signed by an openssl CA with the given subjectAltName line ("" = no SAN extension).
std::filesystem::path make_openssl_leaf(const TempDir& dir, const OpensslCa& ca, const std::string& name,
                                        const std::string& san) {
  const auto key = dir / (name + ".key");
  const auto csr = dir / (name + ".csr");
  const auto cert = dir / (name + ".pem");
  const auto ext = dir / (name + ".ext");
  must_run({"openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.string()});
  must_run({"openssl", "req", "-new", "-key", key.string(), "-subj", "/CN=" + name, "-out", csr.string()});
  write_file(ext, std::string("basicConstraints=CA:FALSE\n") + (san.empty() ? "" : "subjectAltName=" + san + "\n"));
  must_run({"openssl", "x509", "-req", "-in", csr.string(), "-CA", ca.cert.string(), "-CAkey", ca.key.string(),
            "-set_serial", "0x7F01", "-sha256", "-days", "10", "-extfile", ext.string(), "-out", cert.string()});
  return cert;
}

struct OurPki {
  crypto::CertificateAuthority ca;
  crypto::PrivateKey device_key;
  crypto::CertificateRequest csr;
};

OurPki make_our_pki(const std::string& ca_subject, const std::string& ae_id, std::time_t now) {
  auto ca = must(crypto::CertificateAuthority::create_self_signed(must(crypto::PrivateKey::generate_p256()),
                                                                  ca_subject, now - kDay, now + 365 * kDay));
  auto device_key = must(crypto::PrivateKey::generate_p256());
  auto csr = must(crypto::CertificateRequest::create(device_key, ae_id));
  return OurPki{std::move(ca), std::move(device_key), std::move(csr)};
}

}  // namespace

TEST_CASE("x509: our CA issues an AE-ID certificate from our CSR, our parser and openssl agree on every field",
          "[x509]") {
  REQUIRE(dauth::test::have_program("openssl"));
  TempDir dir;
  const std::time_t now = std::time(nullptr);
  auto pki = make_our_pki("CN=MEF CA", "CAE-sensor-01", now);
  const crypto::Certificate& ca_cert = pki.ca.certificate();

  // The CA certificate.
  CHECK(ca_cert.is_ca());
  CHECK(ca_cert.subject() == "CN=MEF CA");
  CHECK(ca_cert.issuer() == "CN=MEF CA");
  CHECK(ca_cert.not_before() == now - kDay);
  CHECK(ca_cert.not_after() == now + 365 * kDay);
  write_file(dir / "ca.pem", ca_cert.pem());
  const std::string ca_ext = must_run({"openssl", "x509", "-in", (dir / "ca.pem").string(), "-noout", "-ext",
                                       "basicConstraints,keyUsage,subjectKeyIdentifier"});
  CHECK(contains(ca_ext, "X509v3 Basic Constraints: critical"));
  CHECK(contains(ca_ext, "CA:TRUE, pathlen:0"));
  CHECK(contains(ca_ext, "X509v3 Key Usage: critical"));
  CHECK(contains(ca_ext, "Certificate Sign, CRL Sign"));
  CHECK(contains(ca_ext, "X509v3 Subject Key Identifier"));

  // The CSR: our reading, then openssl's.
  CHECK(pki.csr.subject() == "CN=CAE-sensor-01");
  CHECK(pki.csr.requested_san_uris() == std::vector<std::string>{"CAE-sensor-01"});
  CHECK(pki.csr.public_key_der() == pki.device_key.public_key_der());
  must(pki.csr.verify_signature());
  write_file(dir / "dev.csr", pki.csr.pem());
  const std::string csr_text =
      must_run({"openssl", "req", "-in", (dir / "dev.csr").string(), "-noout", "-verify", "-text"});
  CHECK(contains(csr_text, "verify OK"));
  CHECK(contains(csr_text, "URI:CAE-sensor-01"));
  CHECK(contains(csr_text, "ecdsa-with-SHA256"));
  // The DER form is the same request.
  write_file(dir / "dev.csr.der", pki.csr.der());
  must_run({"openssl", "req", "-inform", "DER", "-in", (dir / "dev.csr.der").string(), "-noout", "-verify"});

  // The issued certificate.
  const auto params = params_for({0x00, 0x8A, 0x02, 0x03}, now - 60, now + 30 * kDay);
  auto cert = must(pki.ca.issue(pki.csr, "CAE-sensor-01", params));
  CHECK(cert.chain_length() == 1);
  CHECK_FALSE(cert.is_ca());
  CHECK(cert.subject() == "CN=CAE-sensor-01");
  CHECK(cert.issuer() == ca_cert.subject());
  CHECK(cert.serial_hex() == "8A0203");
  CHECK(cert.not_before() == now - 60);
  CHECK(cert.not_after() == now + 30 * kDay);
  CHECK(cert.san_uris() == std::vector<std::string>{"CAE-sensor-01"});
  CHECK(cert.san_dns_names().empty());
  CHECK(must(cert.ae_id()) == "CAE-sensor-01");
  CHECK(cert.public_key_der() == pki.device_key.public_key_der());
  CHECK(cert.public_key_id() == pki.device_key.public_key_id());
  must(cert.verify(ca_cert, now));

  write_file(dir / "dev.pem", cert.pem());
  const std::string verified = must_run({"openssl", "verify", "-x509_strict", "-CAfile", (dir / "ca.pem").string(),
                                         (dir / "dev.pem").string()});
  CHECK(contains(verified, "OK"));
  for (const char* purpose : {"sslclient", "sslserver"}) {
    must_run({"openssl", "verify", "-purpose", purpose, "-CAfile", (dir / "ca.pem").string(),
              (dir / "dev.pem").string()});
  }
  const std::string ext = must_run({"openssl", "x509", "-in", (dir / "dev.pem").string(), "-noout", "-ext",
                                    "subjectAltName,keyUsage,extendedKeyUsage,basicConstraints,"
                                    "authorityKeyIdentifier,subjectKeyIdentifier"});
  CHECK(contains(ext, "URI:CAE-sensor-01"));
  CHECK(contains(ext, "X509v3 Key Usage: critical"));
  CHECK(contains(ext, "Digital Signature"));
  CHECK_FALSE(contains(ext, "Key Encipherment"));
  CHECK(contains(ext, "TLS Web Server Authentication, TLS Web Client Authentication"));
  CHECK(contains(ext, "CA:FALSE"));
  CHECK(contains(ext, "X509v3 Authority Key Identifier"));
  CHECK(contains(ext, "X509v3 Subject Key Identifier"));
  const std::string fields = must_run({"openssl", "x509", "-in", (dir / "dev.pem").string(), "-noout", "-serial",
                                       "-subject", "-issuer", "-text"});
  CHECK(contains(fields, "serial=8A0203"));
  CHECK(contains(fields, "subject=CN = CAE-sensor-01"));
  CHECK(contains(fields, "issuer=CN = MEF CA"));
  CHECK(contains(fields, "ecdsa-with-SHA256"));
  CHECK(contains(fields, "prime256v1"));

  // The device key as openssl reads it: valid, and the same public key as in the certificate.
  auto key_pem = must(pki.device_key.to_pem());
  CHECK(contains(text_of(key_pem), "-----BEGIN EC PRIVATE KEY-----"));
  write_file(dir / "dev.key", text_of(key_pem));
  CHECK(contains(must_run({"openssl", "ec", "-in", (dir / "dev.key").string(), "-check", "-noout"}), "valid"));
  must_run({"openssl", "pkey", "-in", (dir / "dev.key").string(), "-pubout", "-outform", "DER", "-out",
            (dir / "dev.spki").string()});
  CHECK(read_binary_file(dir / "dev.spki") == cert.public_key_der());

  // A chain in one PEM, leaf first.
  auto chain = must(crypto::Certificate::parse(ByteView::of(cert.pem() + ca_cert.pem())));
  CHECK(chain.chain_length() == 2);
  CHECK(chain.chain_der() == std::vector<Bytes>{cert.der(), ca_cert.der()});
  CHECK(chain.der() == cert.der());
  CHECK(chain.pem() == cert.pem() + ca_cert.pem());
  must(chain.verify(ca_cert, now));
}

TEST_CASE("x509: keys round-trip through PEM, DER and files, wrong curves and junk are refused", "[x509]") {
  TempDir dir;
  auto key = must(crypto::PrivateKey::generate_p256());
  auto other = must(crypto::PrivateKey::generate_p256());
  CHECK(key.public_key_der() != other.public_key_der());
  CHECK(contains(key.public_key_id(), "ni:///sha-256;"));

  auto from_pem = must(crypto::PrivateKey::parse(must(key.to_pem())));
  CHECK(from_pem.public_key_der() == key.public_key_der());
  auto der = must(key.to_der());
  auto from_der = must(crypto::PrivateKey::parse(der));
  CHECK(from_der.public_key_der() == key.public_key_der());
  CHECK(must(from_der.to_der()).equals(der));

  write_file(dir / "key.pem", text_of(must(key.to_pem())));
  CHECK(must(crypto::PrivateKey::load_file((dir / "key.pem").string())).public_key_der() == key.public_key_der());
  auto missing = crypto::PrivateKey::load_file((dir / "nope.pem").string());
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().code == Errc::not_found);
  CHECK(contains(missing.error().message, "nope.pem"));

  // PKCS#8 "PRIVATE KEY" from openssl is accepted; a P-384 key is not (P-256 pinned, TS-0003 §10.1.1.1).
  must_run({"openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
            (dir / "p8.pem").string()});
  CHECK(contains(read_text_file(dir / "p8.pem"), "-----BEGIN PRIVATE KEY-----"));
  must(crypto::PrivateKey::load_file((dir / "p8.pem").string()));
  must_run({"openssl", "ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", (dir / "p384.pem").string()});
  auto p384 = crypto::PrivateKey::load_file((dir / "p384.pem").string());
  REQUIRE_FALSE(p384.ok());
  CHECK(p384.error().code == Errc::unsupported);
  CHECK(contains(p384.error().message, "P-256"));

  for (const std::string junk : {"", "hello", "-----BEGIN EC PRIVATE KEY-----\n@@@@\n-----END EC PRIVATE KEY-----\n"}) {
    INFO(junk);
    CHECK_FALSE(crypto::PrivateKey::parse(SecretBuffer::copy_of(ByteView::of(junk))).ok());
  }
  Bytes truncated(der.data(), der.data() + der.size() / 2);
  CHECK_FALSE(crypto::PrivateKey::parse(SecretBuffer::copy_of(truncated)).ok());
}

TEST_CASE("x509: a private key file with group or other permission bits is refused, naming the mode", "[x509]") {
  // docs/conventions.md §8: the daemon refuses such key files (the master key loader does the same, through the same
  // helper).
  TempDir dir;
  auto key = must(crypto::PrivateKey::generate_p256());
  const std::string pem = text_of(must(key.to_pem()));
  for (const int mode : {0644, 0640, 0604, 0660, 0602}) {
    char mode_text[8];
    std::snprintf(mode_text, sizeof mode_text, "%04o", mode);
    INFO("mode " << mode_text);
    const auto path = dir / ("key-" + std::string(mode_text) + ".pem");
    write_file(path, pem, mode);
    auto loaded = crypto::PrivateKey::load_file(path.string());
    REQUIRE_FALSE(loaded.ok());
    CHECK(loaded.error().code == Errc::permission);
    CHECK(contains(loaded.error().message, std::string("mode ") + mode_text));
    CHECK(contains(loaded.error().message, path.string()));
    CHECK(contains(loaded.error().message, "chmod 600"));
  }
  for (const int mode : {0600, 0400}) {
    const auto path = dir / ("ok-" + std::to_string(mode) + ".pem");
    write_file(path, pem, mode);
    CHECK(must(crypto::PrivateKey::load_file(path.string())).public_key_der() == key.public_key_der());
  }
  // A certificate is public: its mode does not matter.
  auto ca = must(crypto::CertificateAuthority::create_self_signed(std::move(key), "CN=Mode CA", std::time(nullptr),
                                                                  std::time(nullptr) + kDay));
  write_file(dir / "ca.pem", ca.certificate().pem(), 0644);
  CHECK(must(crypto::Certificate::load_file((dir / "ca.pem").string())).der() == ca.certificate().der());
  // Neither is a directory, a FIFO or an oversized file read.
  ::mkfifo((dir / "fifo").c_str(), 0600);
  auto fifo = crypto::PrivateKey::load_file((dir / "fifo").string());
  REQUIRE_FALSE(fifo.ok());
  CHECK(contains(fifo.error().message, "not a regular file"));
  write_file(dir / "big.pem", std::string((std::size_t{1} << 20) + 1, 'A'), 0644);
  auto big = crypto::Certificate::load_file((dir / "big.pem").string());
  REQUIRE_FALSE(big.ok());
  CHECK(big.error().code == Errc::limit);
}

TEST_CASE("x509: a key file parsed as a certificate or CSR by mistake is not quoted in the error", "[x509]") {
  // Error messages reach logs (docs/conventions.md §9): a hex master key or a private key's PEM body must not appear in
  // them.
  auto key = must(crypto::PrivateKey::generate_p256());
  const std::string key_pem = text_of(must(key.to_pem()));
  const std::string hex_key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
  const std::string key_body = key_pem.substr(key_pem.find('\n') + 1, 64);
  auto ca = must(crypto::CertificateAuthority::create_self_signed(must(crypto::PrivateKey::generate_p256()),
                                                                  "CN=Quote CA", std::time(nullptr),
                                                                  std::time(nullptr) + kDay));
  // ('0' is 0x30, a DER SEQUENCE tag: that one goes to the DER parser, whose errors carry no input bytes either.)
  const std::vector<std::string> inputs = {hex_key, hex_key.substr(2) + "00", "  " + hex_key,
                                           ca.certificate().pem() + hex_key};
  for (const std::string& input : inputs) {
    for (const bool csr : {false, true}) {
      const auto bytes = ByteView::of(input);
      const std::string message = csr ? crypto::CertificateRequest::parse(bytes).error().message
                                      : crypto::Certificate::parse(bytes).error().message;
      INFO(message);
      CHECK_FALSE(message.empty());
      for (std::size_t at = 0; at + 8 <= 64; ++at) CHECK_FALSE(contains(message, hex_key.substr(at, 8)));
    }
  }
  // A PEM block of another kind is named by its label, and nothing of its body is shown.
  const std::string message = crypto::Certificate::parse(ByteView::of(key_pem)).error().message;
  CHECK(contains(message, "'EC PRIVATE KEY' block"));
  for (std::size_t at = 0; at + 8 <= key_body.size(); ++at) CHECK_FALSE(contains(message, key_body.substr(at, 8)));
}

TEST_CASE("x509: PEM of a private key is what openssl writes for the same key, and openssl reads it back", "[x509]") {
  TempDir dir;
  auto key = must(crypto::PrivateKey::generate_p256());
  const SecretBuffer pem = must(key.to_pem());
  const std::string text = text_of(pem);
  CHECK(text.rfind("-----BEGIN EC PRIVATE KEY-----\n", 0) == 0);
  CHECK(text.find('\0') == std::string::npos);
  write_file(dir / "ours.pem", text);
  write_file(dir / "ours.der", [&] {
    const SecretBuffer der = must(key.to_der());
    return Bytes(der.data(), der.data() + der.size());
  }());
  // openssl re-encodes our DER as SEC1 PEM: the bytes must be ours exactly (64-character lines, RFC 7468 §2).
  must_run({"openssl", "ec", "-inform", "DER", "-in", (dir / "ours.der").string(), "-out",
            (dir / "openssl.pem").string()});
  CHECK(read_text_file(dir / "openssl.pem") == text);
  must_run({"openssl", "ec", "-in", (dir / "ours.pem").string(), "-outform", "DER", "-out",
            (dir / "openssl.der").string()});
  const SecretBuffer der = must(key.to_der());
  CHECK(der.equals(read_binary_file(dir / "openssl.der")));
}

TEST_CASE("x509: certificates made by openssl parse: URI SANs, DNS SANs, several URIs, no SAN", "[x509]") {
  REQUIRE(dauth::test::have_program("openssl"));
  TempDir dir;
  const std::time_t now = std::time(nullptr);
  const auto ca = make_openssl_ca(dir, "Ext CA");
  auto ca_cert = must(crypto::Certificate::load_file(ca.cert.string()));
  CHECK(ca_cert.is_ca());
  CHECK(ca_cert.subject() == "CN=Ext CA");

  SECTION("one AE-ID URI") {
    auto cert = must(crypto::Certificate::load_file(make_openssl_leaf(dir, ca, "uri", "URI:CAE-meter-01").string()));
    CHECK(cert.san_uris() == std::vector<std::string>{"CAE-meter-01"});
    CHECK(must(cert.ae_id()) == "CAE-meter-01");
    CHECK(cert.serial_hex() == "7F01");
    CHECK(cert.issuer() == "CN=Ext CA");
    must(cert.verify(ca_cert, std::max(now, cert.not_before())));  // openssl signs after `now`
  }
  SECTION("DNS names only: no AE-ID") {
    auto cert = must(crypto::Certificate::load_file(
        make_openssl_leaf(dir, ca, "dns", "DNS:a.example.net,DNS:b.example.net").string()));
    CHECK(cert.san_dns_names() == std::vector<std::string>{"a.example.net", "b.example.net"});
    CHECK(cert.san_uris().empty());
    auto ae_id = cert.ae_id();
    REQUIRE_FALSE(ae_id.ok());
    CHECK(ae_id.error().code == Errc::not_found);
    CHECK(contains(ae_id.error().message, "no subjectAltName URI"));
  }
  SECTION("several URIs, one of them an AE-ID, mixed with DNS") {
    auto cert = must(crypto::Certificate::load_file(
        make_openssl_leaf(dir, ca, "multi",
                          "URI:urn:x-onem2m:ae:CAE-x,DNS:m.example.net,URI://in-cse.example.net/in-cse/CAE-x")
            .string()));
    CHECK(cert.san_uris() ==
          std::vector<std::string>{"urn:x-onem2m:ae:CAE-x", "//in-cse.example.net/in-cse/CAE-x"});
    CHECK(cert.san_dns_names() == std::vector<std::string>{"m.example.net"});
    CHECK(must(cert.ae_id()) == "//in-cse.example.net/in-cse/CAE-x");
  }
  SECTION("two different AE-IDs are ambiguous") {
    auto cert = must(crypto::Certificate::load_file(
        make_openssl_leaf(dir, ca, "two", "URI:CAE-one,URI:CAE-two").string()));
    auto ae_id = cert.ae_id();
    REQUIRE_FALSE(ae_id.ok());
    CHECK(ae_id.error().code == Errc::invalid_argument);
    CHECK(contains(ae_id.error().message, "ambiguous"));
    CHECK(contains(ae_id.error().message, "'CAE-one'"));
  }
  SECTION("URIs, none an AE-ID") {
    auto cert = must(crypto::Certificate::load_file(
        make_openssl_leaf(dir, ca, "urn", "URI:urn:x-onem2m:ae:CAE-x").string()));
    auto ae_id = cert.ae_id();
    REQUIRE_FALSE(ae_id.ok());
    CHECK(ae_id.error().code == Errc::invalid_argument);
    CHECK(contains(ae_id.error().message, "urn:x-onem2m:ae:CAE-x"));
  }
  SECTION("no subjectAltName at all") {
    auto cert = must(crypto::Certificate::load_file(make_openssl_leaf(dir, ca, "nosan", "").string()));
    CHECK(cert.san_uris().empty());
    CHECK(cert.san_dns_names().empty());
    CHECK(cert.subject() == "CN=nosan");
    CHECK(cert.ae_id().error().code == Errc::not_found);
    must(cert.verify(ca_cert, std::max(now, cert.not_before())));  // openssl signs after `now`
  }
  SECTION("an openssl CA and key drive our CA; openssl verifies what it issues") {
    auto authority = must(crypto::CertificateAuthority::from(std::move(ca_cert),
                                                             must(crypto::PrivateKey::load_file(ca.key.string()))));
    auto device_key = must(crypto::PrivateKey::generate_p256());
    crypto::SubjectNames names;
    names.common_name = "mef.example.net";
    names.dns_names = {"mef.example.net"};
    names.uris = {"//mef.example.net/mef"};
    auto cert = must(authority.issue_for_key(device_key, names, params_for({0x42}, now - 60, now + kDay)));
    CHECK(cert.issuer() == "CN=Ext CA");
    CHECK(cert.san_dns_names() == std::vector<std::string>{"mef.example.net"});
    CHECK(cert.san_uris() == std::vector<std::string>{"//mef.example.net/mef"});
    write_file(dir / "ours.pem", cert.pem());
    must_run({"openssl", "verify", "-x509_strict", "-CAfile", ca.cert.string(), (dir / "ours.pem").string()});
    CHECK(contains(must_run({"openssl", "x509", "-in", (dir / "ours.pem").string(), "-noout", "-ext",
                             "subjectAltName"}),
                   "DNS:mef.example.net"));
  }
}

TEST_CASE("x509: CSRs made by openssl: requested URIs in order, DNS ignored, none requested", "[x509]") {
  REQUIRE(dauth::test::have_program("openssl"));
  TempDir dir;
  const auto key = dir / "k.pem";
  must_run({"openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key.string()});
  must_run({"openssl", "req", "-new", "-key", key.string(), "-subj", "/CN=CAE-a", "-addext",
            "subjectAltName=URI:CAE-a,DNS:a.example.net,URI:urn:example:b", "-addext", "keyUsage=digitalSignature",
            "-out", (dir / "san.csr").string()});
  must_run({"openssl", "req", "-new", "-key", key.string(), "-subj", "/CN=plain", "-out",
            (dir / "plain.csr").string()});
  must_run({"openssl", "req", "-in", (dir / "san.csr").string(), "-outform", "DER", "-out",
            (dir / "san.der").string()});

  auto with_san = must(crypto::CertificateRequest::parse(read_binary_file(dir / "san.csr")));
  CHECK(with_san.subject() == "CN=CAE-a");
  CHECK(with_san.requested_san_uris() == std::vector<std::string>{"CAE-a", "urn:example:b"});
  must(with_san.verify_signature());
  CHECK(with_san.der() == read_binary_file(dir / "san.der"));
  auto from_der = must(crypto::CertificateRequest::parse(read_binary_file(dir / "san.der")));
  CHECK(from_der.requested_san_uris() == with_san.requested_san_uris());

  auto plain = must(crypto::CertificateRequest::parse(read_binary_file(dir / "plain.csr")));
  CHECK(plain.requested_san_uris().empty());
  must(plain.verify_signature());
}

TEST_CASE("x509: verification refuses another CA, expired and not-yet-valid certificates, at the caller's time",
          "[x509]") {
  const std::time_t now = std::time(nullptr);
  auto pki = make_our_pki("CN=MEF CA", "CAE-v", now);
  auto stranger = must(crypto::CertificateAuthority::create_self_signed(must(crypto::PrivateKey::generate_p256()),
                                                                        "CN=MEF CA", now - kDay, now + kDay));
  auto cert = must(pki.ca.issue(pki.csr, "CAE-v", params_for({0x01}, now - 60, now + kDay)));

  SECTION("same name, different CA key") {
    auto result = cert.verify(stranger.certificate(), now);
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().code == Errc::unauthenticated);
    CHECK(contains(result.error().message, "not correctly signed"));
    CHECK(contains(result.error().message, "CN=CAE-v"));
  }
  SECTION("expired at `now`") {
    auto result = cert.verify(pki.ca.certificate(), cert.not_after() + 1);
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().code == Errc::expired);
    CHECK(contains(result.error().message, "expired"));
  }
  SECTION("not yet valid at `now`") {
    auto result = cert.verify(pki.ca.certificate(), cert.not_before() - 1);
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().code == Errc::expired);
    CHECK(contains(result.error().message, "future"));
  }
  SECTION("validity edges are inclusive (RFC 5280 §4.1.2.5)") {
    must(cert.verify(pki.ca.certificate(), cert.not_before()));
    must(cert.verify(pki.ca.certificate(), cert.not_after()));
  }
  SECTION("the caller's clock, not the system clock, decides") {
    // A CA and a certificate valid only in 2001: mbedTLS alone would call them expired today.
    const std::time_t y2001 = 978307200;  // 2001-01-01T00:00:00Z
    auto old_ca = must(crypto::CertificateAuthority::create_self_signed(
        must(crypto::PrivateKey::generate_p256()), "CN=Old CA", y2001, y2001 + 365 * kDay));
    auto old = must(old_ca.issue(pki.csr, "CAE-v", params_for({0x02}, y2001, y2001 + 100 * kDay)));
    must(old.verify(old_ca.certificate(), y2001 + 50 * kDay));
    CHECK(old.verify(old_ca.certificate(), now).error().code == Errc::expired);
    // An expired trust anchor fails even when the leaf is in its validity period.
    CHECK(old.verify(old_ca.certificate(), y2001 + 364 * kDay).error().code == Errc::expired);
    auto ca_expired = old.verify(old_ca.certificate(), y2001 + 366 * kDay);
    REQUIRE_FALSE(ca_expired.ok());
    CHECK(ca_expired.error().code == Errc::expired);
  }
}

TEST_CASE("x509: tampered CSRs fail the self-signature check, here and in openssl", "[x509]") {
  REQUIRE(dauth::test::have_program("openssl"));
  TempDir dir;
  auto key = must(crypto::PrivateKey::generate_p256());
  auto csr = must(crypto::CertificateRequest::create(key, "CAE-tamper"));
  must(csr.verify_signature());

  SECTION("a flipped bit in the signature value") {
    Bytes der = csr.der();
    der.back() ^= 0x01;  // last byte of the ECDSA s integer: structure intact, value wrong
    auto tampered = must(crypto::CertificateRequest::parse(der));
    auto result = tampered.verify_signature();
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().code == Errc::crypto);
    write_file(dir / "bad.der", der);
    // OpenSSL 3.0's `req -verify` exits 0 either way; its verdict is in the text.
    const auto openssl = run_command({"openssl", "req", "-inform", "DER", "-in", (dir / "bad.der").string(), "-noout",
                                      "-verify"});
    CHECK(contains(openssl.output, "verify failure"));
    CHECK_FALSE(contains(openssl.output, "verify OK"));
  }
  SECTION("a changed requested AE-ID") {
    Bytes der = csr.der();
    const std::string needle = "CAE-tamper";
    // The SAN copy comes after the subject copy: change the last occurrence.
    auto it = std::find_end(der.begin(), der.end(), needle.begin(), needle.end());
    REQUIRE(it != der.end());
    *it = 'X';
    auto tampered = must(crypto::CertificateRequest::parse(der));
    CHECK(tampered.requested_san_uris() == std::vector<std::string>{"XAE-tamper"});
    CHECK(tampered.verify_signature().error().code == Errc::crypto);
  }
}

TEST_CASE("x509: garbage, truncated and trailing DER and junk PEM are refused", "[x509]") {
  const std::time_t now = std::time(nullptr);
  auto pki = make_our_pki("CN=MEF CA", "CAE-g", now);
  auto cert = must(pki.ca.issue(pki.csr, "CAE-g", params_for({0x05}, now, now + kDay)));
  const Bytes der = cert.der();
  const std::string pem = cert.pem();

  SECTION("every truncation of a certificate and of a CSR") {
    for (std::size_t n = 0; n < der.size(); ++n) {
      INFO(n);
      REQUIRE_FALSE(crypto::Certificate::parse(ByteView(der.data(), n)).ok());
    }
    const Bytes& csr = pki.csr.der();
    for (std::size_t n = 0; n < csr.size(); ++n) {
      INFO(n);
      REQUIRE_FALSE(crypto::CertificateRequest::parse(ByteView(csr.data(), n)).ok());
    }
  }
  SECTION("trailing bytes") {
    Bytes longer = der;
    longer.push_back(0);
    auto result = crypto::Certificate::parse(longer);
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().code == Errc::parse);
    CHECK(contains(result.error().message, "trailing"));
    Bytes csr = pki.csr.der();
    csr.push_back(0);
    CHECK_FALSE(crypto::CertificateRequest::parse(csr).ok());
  }
  SECTION("garbage") {
    const Bytes garbage{0x30, 0x82, 0xff, 0xff, 0x01, 0x02, 0x03};
    CHECK(crypto::Certificate::parse(garbage).error().code == Errc::parse);
    CHECK_FALSE(crypto::CertificateRequest::parse(garbage).ok());
    CHECK_FALSE(crypto::Certificate::parse(Bytes{}).ok());
    CHECK_FALSE(crypto::public_key_id_from_spki(garbage).ok());
    // A certificate is not a CSR and a CSR is not a certificate.
    CHECK_FALSE(crypto::CertificateRequest::parse(der).ok());
    CHECK_FALSE(crypto::Certificate::parse(pki.csr.der()).ok());
  }
  SECTION("junk PEM") {
    const std::string body_start = "-----BEGIN CERTIFICATE-----\n";
    struct Case {
      std::string text;
      std::string says;
    };
    const std::vector<Case> cases = {
        {"junk before\n" + pem, "unexpected text at byte 0"},
        {pem + "junk after\n", "unexpected text"},
        {body_start + "@@@@AAAA\n-----END CERTIFICATE-----\n", "base64"},
        {pem.substr(0, pem.size() - 10), "no '-----END CERTIFICATE-----' line"},
        {body_start + "-----END CERTIFICATE-----\n", "empty"},
        {"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "unexpected text"},
        {"   \n", "no '-----BEGIN CERTIFICATE-----' block"},
    };
    for (const auto& c : cases) {
      INFO(c.text);
      auto result = crypto::Certificate::parse(ByteView::of(c.text));
      REQUIRE_FALSE(result.ok());
      CHECK(result.error().code == Errc::parse);
      CHECK(contains(result.error().message, c.says));
    }
    // The PEM wraps at 64 columns and round-trips; CRLF line ends and surrounding blank lines are fine.
    std::string crlf;
    for (char c : pem) crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
    CHECK(must(crypto::Certificate::parse(ByteView::of("\n\n" + crlf + "\n"))).der() == der);
    // A CSR PEM carries exactly one request.
    CHECK_FALSE(crypto::CertificateRequest::parse(ByteView::of(pki.csr.pem() + pki.csr.pem())).ok());
    CHECK(must(crypto::CertificateRequest::parse(ByteView::of(pki.csr.pem()))).der() == pki.csr.der());
  }
}

TEST_CASE("x509: raw public keys get their RFC 6920 name, computed independently by Python", "[x509]") {
  REQUIRE(dauth::test::have_program("openssl"));
  TempDir dir;
  must_run({"openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
            (dir / "k.pem").string()});
  must_run({"openssl", "pkey", "-in", (dir / "k.pem").string(), "-pubout", "-outform", "DER", "-out",
            (dir / "spki.der").string()});
  const Bytes spki = read_binary_file(dir / "spki.der");
  const std::string expected = python_ni_name(dir / "spki.der");
  REQUIRE(expected.size() == std::string("ni:///sha-256;").size() + 43);  // 32 bytes -> 43 base64url characters

  CHECK(must(crypto::public_key_id_from_spki(spki)) == expected);
  CHECK(crypto::public_key_id_of_spki(spki) == expected);
  CHECK(must(crypto::PrivateKey::load_file((dir / "k.pem").string())).public_key_id() == expected);

  Bytes longer = spki;
  longer.push_back(0);
  CHECK(crypto::public_key_id_from_spki(longer).error().code == Errc::parse);
  Bytes broken = spki;
  broken.resize(spki.size() - 1);
  CHECK_FALSE(crypto::public_key_id_from_spki(broken).ok());
  // Not a key: a certificate is a SEQUENCE too.
  const std::time_t now = std::time(nullptr);
  auto pki = make_our_pki("CN=MEF CA", "CAE-r", now);
  CHECK_FALSE(crypto::public_key_id_from_spki(pki.ca.certificate().der()).ok());
}

TEST_CASE("x509: issuing refuses bad AE-IDs, serials, validity, names and mismatched CA keys", "[x509]") {
  const std::time_t now = std::time(nullptr);
  auto pki = make_our_pki("CN=MEF CA", "CAE-i", now);
  const auto good = params_for({0x01}, now, now + kDay);

  auto bad_ae = pki.ca.issue(pki.csr, "CAE i!", good);
  REQUIRE_FALSE(bad_ae.ok());
  CHECK(bad_ae.error().code == Errc::invalid_argument);
  CHECK_FALSE(crypto::CertificateRequest::create(pki.device_key, "").ok());
  CHECK_FALSE(crypto::CertificateRequest::create(pki.device_key, "a,CN=evil").ok());

  CHECK(pki.ca.issue(pki.csr, "CAE-i", params_for({}, now, now + kDay)).error().code == Errc::invalid_argument);
  CHECK(pki.ca.issue(pki.csr, "CAE-i", params_for({0, 0}, now, now + kDay)).error().code == Errc::invalid_argument);
  CHECK(pki.ca.issue(pki.csr, "CAE-i", params_for(Bytes(21, 1), now, now + kDay)).error().code ==
        Errc::invalid_argument);
  Bytes top_bit(20, 0x11);
  top_bit[0] = 0x80;
  CHECK_FALSE(pki.ca.issue(pki.csr, "CAE-i", params_for(top_bit, now, now + kDay)).ok());
  top_bit[0] = 0x7f;  // 20 octets, positive: the largest allowed
  CHECK(must(pki.ca.issue(pki.csr, "CAE-i", params_for(top_bit, now, now + kDay))).serial_hex() ==
        dauth::to_hex(top_bit, true));
  auto backwards = pki.ca.issue(pki.csr, "CAE-i", params_for({0x01}, now, now));
  REQUIRE_FALSE(backwards.ok());
  CHECK(contains(backwards.error().message, "not_before"));

  crypto::SubjectNames names;
  names.common_name = "x, O=evil";
  CHECK(pki.ca.issue_for_key(pki.device_key, names, good).error().code == Errc::invalid_argument);
  names.common_name = "ok";
  names.dns_names = {"-bad-.example"};
  CHECK_FALSE(pki.ca.issue_for_key(pki.device_key, names, good).ok());
  names.dns_names = {};
  names.uris = {"has space"};
  CHECK_FALSE(pki.ca.issue_for_key(pki.device_key, names, good).ok());

  // A CA certificate with somebody else's key, and a leaf posing as a CA.
  auto leaf = must(pki.ca.issue(pki.csr, "CAE-i", good));
  auto wrong_key = crypto::CertificateAuthority::from(must(crypto::Certificate::parse(pki.ca.certificate().der())),
                                                      must(crypto::PrivateKey::generate_p256()));
  REQUIRE_FALSE(wrong_key.ok());
  CHECK(contains(wrong_key.error().message, "does not belong"));
  auto not_ca = crypto::CertificateAuthority::from(std::move(leaf), std::move(pki.device_key));
  REQUIRE_FALSE(not_ca.ok());
  CHECK(contains(not_ca.error().message, "is not a CA"));
}

TEST_CASE("x509: a 128-character absolute AE-ID keeps its full SAN URI and a CN within RFC 5280's 64", "[x509]") {
  TempDir dir;
  const std::string ae_id = "//m2m.example.net/in-cse/" + std::string(128 - 25, 'a');
  REQUIRE(ae_id.size() == 128);
  const std::time_t now = std::time(nullptr);
  auto pki = make_our_pki("CN=MEF CA", ae_id, now);
  CHECK(pki.csr.subject() == "CN=" + ae_id.substr(64));
  CHECK(pki.csr.requested_san_uris() == std::vector<std::string>{ae_id});
  const auto device_cert = must(pki.ca.issue(pki.csr, ae_id, params_for(Bytes{0x42}, now - kDay, now + kDay)));
  CHECK(must(device_cert.ae_id()) == ae_id);
  CHECK(device_cert.subject() == "CN=" + ae_id.substr(64));
  write_file(dir / "ca.pem", pki.ca.certificate().pem());
  write_file(dir / "dev.pem", device_cert.pem());
  // openssl's strict mode enforces the DN length limits.
  const std::string verdict = must_run({"openssl", "verify", "-x509_strict", "-CAfile", (dir / "ca.pem").string(),
                                        (dir / "dev.pem").string()});
  CHECK(contains(verdict, "OK"));
  CHECK(contains(must_run({"openssl", "x509", "-in", (dir / "dev.pem").string(), "-noout", "-ext", "subjectAltName"}),
                 "URI:" + ae_id));
}

TEST_CASE("x509: a public key id is accepted in the forms certtool and gnutls-cli print and stored as ni", "[x509]") {
  REQUIRE(dauth::test::have_program("certtool"));
  TempDir dir;
  const auto key = must(crypto::PrivateKey::generate_p256());
  write_file(dir / "k.pem", text_of(must(key.to_pem())));
  const auto info = run_command({"certtool", "--pubkey-info", "--load-privkey", (dir / "k.pem").string()});
  REQUIRE(info.exit_code == 0);
  // certtool's "Public Key ID" and "Public Key PIN" lines, as a gnutls-cli or p11tool user reads them.
  const auto line_with = [&](const std::string& prefix) {
    const auto at = info.output.find("\t" + prefix);
    REQUIRE(at != std::string::npos);
    return info.output.substr(at + 1, info.output.find('\n', at) - at - 1);
  };
  const std::string hex = line_with("sha256:");
  const std::string pin = line_with("pin-sha256:");
  const std::string ni = key.public_key_id();
  CHECK(must(crypto::canonical_public_key_id(ni)) == ni);
  CHECK(must(crypto::canonical_public_key_id(hex)) == ni);
  CHECK(must(crypto::canonical_public_key_id(pin)) == ni);
  const auto forms = crypto::public_key_id_forms(ni);
  CHECK(forms.sha256_hex == hex);
  CHECK(forms.pin_sha256 == pin);

  const std::vector<std::string> malformed = {std::string(""),          ni.substr(0, ni.size() - 1),
                                             ni + "A",                  hex + "00",
                                             "sha1:" + hex.substr(7),   "ni:///sha-512;" + ni.substr(14),
                                             pin.substr(0, pin.size() - 1), "sha256:" + std::string(64, 'g')};
  for (const std::string& bad : malformed) {
    CAPTURE(bad);
    CHECK(crypto::canonical_public_key_id(bad).error().code == Errc::invalid_argument);
  }
  CHECK(crypto::public_key_id_forms("garbage").sha256_hex.empty());
}

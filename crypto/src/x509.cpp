// X.509 on mbedTLS 2.28: certificates, P-256 keys, CSRs and a small CA (PROTOCOL.md §3.6, §4; TS-0003 §10.1).
// The 2.28 quirks worked around here are listed in docs/crypto.md.
#include "dauth/crypto/x509.hpp"

#include <mbedtls/ecp.h>
#include <mbedtls/md.h>
#include <mbedtls/oid.h>
#include <sodium.h>

#include <algorithm>
#include <array>
#include <optional>
#include <cstring>
#include <set>

#include "dauth/crypto/identifiers.hpp"
#include "files.hpp"
#include "x509_internal.hpp"

namespace dauth::crypto {

using detail::mbedtls_error;

namespace {

// TS-0003 §10.1.1.1 pins ECDSA on P-256 with SHA-256 for certificate-based security associations.
constexpr mbedtls_ecp_group_id kCurve = MBEDTLS_ECP_DP_SECP256R1;
constexpr mbedtls_md_type_t kDigest = MBEDTLS_MD_SHA256;

// Path validation accepts exactly that suite on every certificate of the chain; RSA is not in allowed_pks, so the
// RSA minimum size is irrelevant (set high so that a future edit of allowed_pks cannot accept short RSA keys).
const mbedtls_x509_crt_profile kChainProfile = {
    MBEDTLS_X509_ID_FLAG(MBEDTLS_MD_SHA256),
    MBEDTLS_X509_ID_FLAG(MBEDTLS_PK_ECKEY) | MBEDTLS_X509_ID_FLAG(MBEDTLS_PK_ECDSA),
    MBEDTLS_X509_ID_FLAG(MBEDTLS_ECP_DP_SECP256R1),
    3072,
};

// A chain longer than this is hostile or a configuration error (mbedTLS itself stops at
// MBEDTLS_X509_MAX_INTERMEDIATE_CA = 8 intermediates).
constexpr std::size_t kMaxPemCertificates = 10;
// Files we read are certificates and keys: a few KiB. A cap keeps a wrong path (a log, a device) from eating memory.
constexpr std::size_t kMaxFileSize = std::size_t{1} << 20;
// Serial numbers: RFC 5280 §4.1.2.2, positive and at most 20 octets.
constexpr std::size_t kMaxSerialBytes = 20;

std::string name_string(const mbedtls_x509_name& name) {
  char text[1024];
  const int n = mbedtls_x509_dn_gets(text, sizeof text, &name);
  return n < 0 ? std::string() : std::string(text, static_cast<std::size_t>(n));
}

// Writes with an mbedTLS "write backwards into buf" function, growing the buffer while it is too small.
template <class Write>
Result<Bytes> write_backwards(Write write, const std::string& what) {
  for (std::size_t size = 1024; size <= 65536; size *= 2) {
    Bytes buffer(size);
    const int n = write(buffer.data(), buffer.size());
    const bool too_small = n < 0 && (n == MBEDTLS_ERR_X509_BUFFER_TOO_SMALL ||
                                     ((-n) & 0x7F) == -MBEDTLS_ERR_ASN1_BUF_TOO_SMALL);
    if (too_small) continue;
    if (n < 0) return mbedtls_error(n, what);
    return Bytes(buffer.end() - n, buffer.end());
  }
  return make_error(Errc::limit, what + ": DER larger than 64 KiB");
}

Bytes spki_der_of(mbedtls_pk_context* pk) {
  auto der = write_backwards(
      [pk](unsigned char* buf, std::size_t size) { return mbedtls_pk_write_pubkey_der(pk, buf, size); },
      "writing a SubjectPublicKeyInfo");
  return der ? std::move(der).value() : Bytes{};
}

Result<void> require_p256(const mbedtls_pk_context& pk, const std::string& whose) {
  if (mbedtls_pk_get_type(&pk) != MBEDTLS_PK_ECKEY || mbedtls_pk_ec(pk)->grp.id != kCurve) {
    return make_error(Errc::unsupported, whose + " is a " + mbedtls_pk_get_name(&pk) +
                                             " key; only EC P-256 is allowed (TS-0003 §10.1.1.1)");
  }
  return ok_result();
}

// Common names become part of a DN string that mbedtls_x509_string_to_names parses: characters with a meaning
// there (RFC 4514 §3 specials) are refused instead of escaped.
Result<void> validate_common_name(std::string_view cn) {
  constexpr std::size_t kMaxCommonName = 128;  // AE-IDs are up to 128 characters (PROTOCOL.md §1)
  if (cn.empty() || cn.size() > kMaxCommonName) {
    return make_error(Errc::invalid_argument, "common name " + quote_for_error(cn) + " has " +
                                                  std::to_string(cn.size()) + " characters (1-128 allowed)");
  }
  for (char c : cn) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u > 0x7e || std::strchr(",=+\\\"<>;#", c) != nullptr) {
      return make_error(Errc::invalid_argument, "common name " + quote_for_error(cn) +
                                                    ": only printable ASCII without , = + \\ \" < > ; # is allowed");
    }
  }
  return ok_result();
}

Result<void> validate_uri_name(std::string_view uri) {
  // IA5String (RFC 5280 §4.2.1.6); we write printable ASCII only, so that it cannot smuggle control characters.
  if (uri.empty() || uri.size() > 1024) {
    return make_error(Errc::invalid_argument,
                      "SAN URI " + quote_for_error(uri) + " has " + std::to_string(uri.size()) + " characters (1-1024)");
  }
  for (char c : uri) {
    const auto u = static_cast<unsigned char>(c);
    if (u <= 0x20 || u > 0x7e) {
      return make_error(Errc::invalid_argument, "SAN URI " + quote_for_error(uri) +
                                                    ": only printable ASCII without spaces is allowed");
    }
  }
  return ok_result();
}

}  // namespace

// ============================================================================================== public key ids ====

std::string public_key_id_of_spki(ByteView spki_der) {
  // RFC 6920 §3: ni URI with the sha-256 algorithm and base64url without padding of the digest.
  ensure_sodium_initialised();
  unsigned char digest[crypto_hash_sha256_BYTES];
  crypto_hash_sha256(digest, spki_der.data, spki_der.size);
  char encoded[sodium_base64_ENCODED_LEN(crypto_hash_sha256_BYTES, sodium_base64_VARIANT_URLSAFE_NO_PADDING)];
  sodium_bin2base64(encoded, sizeof encoded, digest, sizeof digest, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  return std::string("ni:///sha-256;") + encoded;
}

Result<std::string> public_key_id_from_spki(ByteView spki_der) {
  auto length = detail::der_sequence_length(spki_der);
  if (!length) return make_error(Errc::parse, "raw public key: " + length.error().message);
  if (*length != spki_der.size) {
    return make_error(Errc::parse, "raw public key: SubjectPublicKeyInfo is " + std::to_string(*length) +
                                       " bytes but " + std::to_string(spki_der.size) + " were given");
  }
  detail::PkContext pk;
  if (const int rc = mbedtls_pk_parse_public_key(pk.get(), spki_der.data, spki_der.size); rc != 0) {
    return mbedtls_error(rc, "raw public key: parsing a " + std::to_string(spki_der.size) +
                                 "-byte SubjectPublicKeyInfo");
  }
  return public_key_id_of_spki(spki_der);
}

namespace {
constexpr std::string_view kNiPrefix = "ni:///sha-256;";
constexpr std::string_view kHexPrefix = "sha256:";
constexpr std::string_view kPinPrefix = "pin-sha256:";

// The 32-byte digest in base64 (variant), or nothing when text is not exactly that.
std::optional<std::array<unsigned char, crypto_hash_sha256_BYTES>> digest_from_base64(std::string_view text,
                                                                                     int variant) {
  std::array<unsigned char, crypto_hash_sha256_BYTES> digest{};
  std::size_t length = 0;
  const char* end = nullptr;
  if (sodium_base642bin(digest.data(), digest.size(), text.data(), text.size(), nullptr, &length, &end, variant) !=
          0 ||
      end != text.data() + text.size() || length != digest.size()) {
    return std::nullopt;
  }
  return digest;
}
}  // namespace

Result<std::string> canonical_public_key_id(std::string_view text) {
  ensure_sodium_initialised();
  std::optional<std::array<unsigned char, crypto_hash_sha256_BYTES>> digest;
  if (text.substr(0, kNiPrefix.size()) == kNiPrefix) {
    digest = digest_from_base64(text.substr(kNiPrefix.size()), sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  } else if (text.substr(0, kHexPrefix.size()) == kHexPrefix) {
    const std::string_view hex = text.substr(kHexPrefix.size());
    std::array<unsigned char, crypto_hash_sha256_BYTES> bytes{};
    std::size_t length = 0;
    const char* end = nullptr;
    if (hex.size() == 2 * bytes.size() &&
        sodium_hex2bin(bytes.data(), bytes.size(), hex.data(), hex.size(), nullptr, &length, &end) == 0 &&
        length == bytes.size()) {
      digest = bytes;
    }
  } else if (text.substr(0, kPinPrefix.size()) == kPinPrefix) {
    digest = digest_from_base64(text.substr(kPinPrefix.size()), sodium_base64_VARIANT_ORIGINAL);
  }
  if (!digest) {
    return make_error(Errc::invalid_argument,
                      "public key id " + quote_for_error(text) + ": must be \"ni:///sha-256;<43 base64url>\" "
                      "(RFC 6920), \"sha256:<64 hex>\" or \"pin-sha256:<44 base64>\" (the SHA-256 of the "
                      "SubjectPublicKeyInfo)");
  }
  char encoded[sodium_base64_ENCODED_LEN(crypto_hash_sha256_BYTES, sodium_base64_VARIANT_URLSAFE_NO_PADDING)];
  sodium_bin2base64(encoded, sizeof encoded, digest->data(), digest->size(), sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  return std::string(kNiPrefix) + encoded;
}

PublicKeyIdForms public_key_id_forms(std::string_view canonical_id) {
  ensure_sodium_initialised();
  const auto digest = digest_from_base64(canonical_id.substr(std::min(kNiPrefix.size(), canonical_id.size())),
                                         sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  if (canonical_id.substr(0, kNiPrefix.size()) != kNiPrefix || !digest) return {};
  char hex[2 * crypto_hash_sha256_BYTES + 1];
  sodium_bin2hex(hex, sizeof hex, digest->data(), digest->size());
  char pin[sodium_base64_ENCODED_LEN(crypto_hash_sha256_BYTES, sodium_base64_VARIANT_ORIGINAL)];
  sodium_bin2base64(pin, sizeof pin, digest->data(), digest->size(), sodium_base64_VARIANT_ORIGINAL);
  return {std::string(kHexPrefix) + hex, std::string(kPinPrefix) + pin};
}

// ================================================================================================= Certificate ====

struct Certificate::Impl {
  detail::CrtChain chain;  // leaf first; mbedTLS links the rest through ->next
};

Certificate::Certificate(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Certificate::Certificate(Certificate&&) noexcept = default;
Certificate& Certificate::operator=(Certificate&&) noexcept = default;
Certificate::~Certificate() = default;

namespace {
Result<void> append_certificate_der(mbedtls_x509_crt* chain, ByteView der, std::size_t index) {
  const std::string where = "certificate " + std::to_string(index + 1);
  auto length = detail::der_sequence_length(der);
  if (!length) return make_error(Errc::parse, where + ": " + length.error().message);
  // mbedtls_x509_crt_parse_der ignores bytes after the certificate; we do not.
  if (*length != der.size) {
    return make_error(Errc::parse, where + ": DER is " + std::to_string(*length) + " bytes followed by " +
                                       std::to_string(der.size - *length) + " trailing bytes");
  }
  if (const int rc = mbedtls_x509_crt_parse_der(chain, der.data, der.size); rc != 0) {
    return mbedtls_error(rc, where + " (" + std::to_string(der.size) + " bytes of DER)");
  }
  return ok_result();
}
}  // namespace

Result<Certificate> Certificate::parse(ByteView der_or_pem) {
  auto impl = std::make_unique<Impl>();
  if (detail::looks_like_der(der_or_pem)) {
    if (auto ok = append_certificate_der(impl->chain.get(), der_or_pem, 0); !ok) return std::move(ok).error();
    return Certificate(std::move(impl));
  }
  const std::string_view text(reinterpret_cast<const char*>(der_or_pem.data), der_or_pem.size);
  auto blocks = detail::pem_decode(text, "CERTIFICATE", kMaxPemCertificates);
  if (!blocks) return std::move(blocks).error();
  for (std::size_t i = 0; i < blocks->size(); ++i) {
    if (auto ok = append_certificate_der(impl->chain.get(), (*blocks)[i], i); !ok) return std::move(ok).error();
  }
  return Certificate(std::move(impl));
}

Result<Certificate> Certificate::load_file(const std::string& path) {
  auto bytes = files::read_public_file(path, "certificate file", kMaxFileSize);
  if (!bytes) return std::move(bytes).error();
  auto certificate = parse(*bytes);
  if (!certificate) return make_error(certificate.error().code, "'" + path + "': " + certificate.error().message);
  return certificate;
}

std::size_t Certificate::chain_length() const {
  std::size_t n = 0;
  for (const mbedtls_x509_crt* c = impl_->chain.get(); c != nullptr && c->raw.p != nullptr; c = c->next) ++n;
  return n;
}

Bytes Certificate::der() const {
  const mbedtls_x509_crt* leaf = impl_->chain.get();
  return Bytes(leaf->raw.p, leaf->raw.p + leaf->raw.len);
}

std::vector<Bytes> Certificate::chain_der() const {
  std::vector<Bytes> out;
  for (const mbedtls_x509_crt* c = impl_->chain.get(); c != nullptr && c->raw.p != nullptr; c = c->next) {
    out.emplace_back(c->raw.p, c->raw.p + c->raw.len);
  }
  return out;
}

std::string Certificate::pem() const {
  std::string out;
  for (const Bytes& der : chain_der()) out += detail::pem_encode("CERTIFICATE", der);
  return out;
}

std::string Certificate::subject() const { return name_string(impl_->chain->subject); }
std::string Certificate::issuer() const { return name_string(impl_->chain->issuer); }

std::string Certificate::serial_hex() const {
  // The DER INTEGER may carry a leading 0x00 to stay positive; drop it, as `openssl x509 -serial` does.
  const mbedtls_x509_buf& serial = impl_->chain->serial;
  std::size_t skip = 0;
  while (skip + 1 < serial.len && serial.p[skip] == 0) ++skip;
  return to_hex(ByteView(serial.p + skip, serial.len - skip), true);
}

std::time_t Certificate::not_before() const { return detail::to_time_t(impl_->chain->valid_from); }
std::time_t Certificate::not_after() const { return detail::to_time_t(impl_->chain->valid_to); }
bool Certificate::is_ca() const { return impl_->chain->ca_istrue != 0; }

namespace {
std::vector<std::string> san_entries(const mbedtls_x509_crt& crt, int san_type) {
  // mbedTLS 2.28 lists every SAN entry with its raw tag and value; its parse helper rejects URIs (docs/crypto.md).
  std::vector<std::string> out;
  const int wanted = MBEDTLS_ASN1_CONTEXT_SPECIFIC | san_type;
  for (const mbedtls_x509_sequence* s = &crt.subject_alt_names; s != nullptr; s = s->next) {
    if (s->buf.p != nullptr && s->buf.tag == wanted) {
      out.emplace_back(reinterpret_cast<const char*>(s->buf.p), s->buf.len);
    }
  }
  return out;
}
}  // namespace

std::vector<std::string> Certificate::san_uris() const {
  return san_entries(*impl_->chain, MBEDTLS_X509_SAN_UNIFORM_RESOURCE_IDENTIFIER);
}
std::vector<std::string> Certificate::san_dns_names() const {
  return san_entries(*impl_->chain, MBEDTLS_X509_SAN_DNS_NAME);
}

Result<std::string> Certificate::ae_id() const {
  const std::vector<std::string> uris = san_uris();
  const std::string who = "certificate '" + subject() + "' (serial " + serial_hex() + ")";
  if (uris.empty()) {
    return make_error(Errc::not_found, who + " has no subjectAltName URI, so it names no AE-ID (TS-0003 §8.1.2.5)");
  }
  std::set<std::string> ae_ids;  // the same AE-ID listed twice is not ambiguous
  for (const auto& uri : uris) {
    if (validate_ae_id(uri)) ae_ids.insert(uri);
  }
  if (ae_ids.empty()) {
    return make_error(Errc::invalid_argument, who + ": none of its " + std::to_string(uris.size()) +
                                                  " subjectAltName URIs is a valid AE-ID (first: " +
                                                  quote_for_error(uris.front()) +
                                                  "; allowed: 1-128 characters of [A-Za-z0-9-._~/])");
  }
  if (ae_ids.size() > 1) {
    return make_error(Errc::invalid_argument, who + " names " + std::to_string(ae_ids.size()) + " AE-IDs (" +
                                                  quote_for_error(*ae_ids.begin()) + ", " +
                                                  quote_for_error(*std::next(ae_ids.begin())) +
                                                  "...): ambiguous, exactly one is allowed");
  }
  return *ae_ids.begin();
}

Bytes Certificate::public_key_der() const {
  // The SubjectPublicKeyInfo bytes exactly as they are in the certificate (what a DTLS peer presents).
  const mbedtls_x509_buf& spki = impl_->chain->pk_raw;
  return Bytes(spki.p, spki.p + spki.len);
}

std::string Certificate::public_key_id() const { return public_key_id_of_spki(public_key_der()); }

namespace {
struct VerifyClock {
  std::time_t now;
};

// mbedTLS 2.28 checks validity against the system clock; the caller's `now` decides instead. The callback sees
// every certificate of the built chain (trust anchor included) and its flags are merged after it runs, so
// replacing the two time flags here is the documented way (x509_crt.h, mbedtls_x509_crt_verify f_vrfy).
int apply_verify_clock(void* context, mbedtls_x509_crt* crt, int /*depth*/, std::uint32_t* flags) {
  const std::time_t now = static_cast<const VerifyClock*>(context)->now;
  *flags &= ~static_cast<std::uint32_t>(MBEDTLS_X509_BADCERT_EXPIRED | MBEDTLS_X509_BADCERT_FUTURE);
  if (now > detail::to_time_t(crt->valid_to)) *flags |= MBEDTLS_X509_BADCERT_EXPIRED;
  if (now < detail::to_time_t(crt->valid_from)) *flags |= MBEDTLS_X509_BADCERT_FUTURE;
  return 0;
}

std::string verify_flags_in_words(std::uint32_t flags) {
  char text[1024];
  const int n = mbedtls_x509_crt_verify_info(text, sizeof text, "", flags);
  std::string words = n > 0 ? std::string(text, static_cast<std::size_t>(n)) : std::string();
  std::string out;
  for (char c : words) {
    if (c == '\n') {
      out += "; ";
    } else {
      out.push_back(c);
    }
  }
  while (!out.empty() && (out.back() == ' ' || out.back() == ';')) out.pop_back();
  return out;
}
}  // namespace

Result<void> Certificate::verify(const Certificate& trust_anchors, std::time_t now) const {
  VerifyClock clock{now};
  std::uint32_t flags = 0;
  const int rc = mbedtls_x509_crt_verify_with_profile(impl_->chain.get(), trust_anchors.impl_->chain.get(), nullptr,
                                                      &kChainProfile, nullptr, &flags, apply_verify_clock, &clock);
  if (rc == 0) return ok_result();
  const std::string who = "certificate '" + subject() + "' (serial " + serial_hex() + ")";
  if (rc != MBEDTLS_ERR_X509_CERT_VERIFY_FAILED) return mbedtls_error(rc, "verifying " + who);
  constexpr std::uint32_t kTimeFlags = MBEDTLS_X509_BADCERT_EXPIRED | MBEDTLS_X509_BADCERT_FUTURE;
  const Errc code = (flags & ~kTimeFlags) == 0 ? Errc::expired : Errc::unauthenticated;
  return make_error(code, who + " did not verify against " + std::to_string(trust_anchors.chain_length()) +
                              " trust anchor(s) at time " + std::to_string(now) + ": " +
                              verify_flags_in_words(flags));
}

// ================================================================================================== PrivateKey ====

PrivateKey::PrivateKey(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PrivateKey::PrivateKey(PrivateKey&&) noexcept = default;
PrivateKey& PrivateKey::operator=(PrivateKey&&) noexcept = default;
PrivateKey::~PrivateKey() = default;

Result<PrivateKey> PrivateKey::generate_p256() {
  detail::Drbg drbg;
  if (auto ok = drbg.seed(); !ok) return std::move(ok).error();
  auto impl = std::make_unique<Impl>();
  if (const int rc = mbedtls_pk_setup(impl->pk.get(), mbedtls_pk_info_from_type(MBEDTLS_PK_ECKEY)); rc != 0) {
    return mbedtls_error(rc, "setting up an EC key");
  }
  if (const int rc = mbedtls_ecp_gen_key(kCurve, mbedtls_pk_ec(*impl->pk.get()), detail::Drbg::random, &drbg);
      rc != 0) {
    return mbedtls_error(rc, "generating a P-256 key");
  }
  return PrivateKey(std::move(impl));
}

Result<PrivateKey> PrivateKey::parse(const SecretBuffer& pem_or_der) {
  auto impl = std::make_unique<Impl>();
  int rc = 0;
  if (detail::looks_like_der(pem_or_der.view())) {
    rc = mbedtls_pk_parse_key(impl->pk.get(), pem_or_der.data(), pem_or_der.size(), nullptr, 0);
  } else {
    // mbedTLS parses PEM only from a NUL-terminated buffer whose length includes the NUL (pk.h).
    SecretBuffer terminated(pem_or_der.size() + 1);
    if (!pem_or_der.empty()) std::memcpy(terminated.data(), pem_or_der.data(), pem_or_der.size());
    rc = mbedtls_pk_parse_key(impl->pk.get(), terminated.data(), terminated.size(), nullptr, 0);
  }
  if (rc != 0) {
    return mbedtls_error(rc, "parsing a private key (" + std::to_string(pem_or_der.size()) +
                                 " bytes; PEM 'EC PRIVATE KEY'/'PRIVATE KEY' or DER, unencrypted)");
  }
  if (auto ok = require_p256(*impl->pk.get(), "the private key"); !ok) return std::move(ok).error();
  return PrivateKey(std::move(impl));
}

Result<PrivateKey> PrivateKey::load_file(const std::string& path) {
  // Like the master key: a private key file with group or other permission bits is refused (docs/conventions.md §8).
  auto bytes = files::read_key_file(path, "private key file", kMaxFileSize);
  if (!bytes) return std::move(bytes).error();
  if (bytes->size() > kMaxFileSize) {
    return make_error(Errc::limit, "private key file " + path + " has more than " + std::to_string(kMaxFileSize) +
                                       " bytes (at most " + std::to_string(kMaxFileSize) + " allowed)");
  }
  auto key = parse(*bytes);
  if (!key) return make_error(key.error().code, "'" + path + "': " + key.error().message);
  return key;
}

Result<SecretBuffer> PrivateKey::to_pem() const {
  // Not mbedtls_pk_write_key_pem: in 2.28 it keeps the DER on its stack and base64-encodes into a heap buffer that
  // mbedtls_pem_write_buffer frees without wiping (measured: the key's base64 stays in freed memory). The DER goes
  // to guarded memory instead and libsodium's constant-time encoder writes the PEM (RFC 7468 §2, SEC1 label).
  auto der = to_der();
  if (!der) return std::move(der).error();
  // Split literal: no line of the tree looks like the start of a committed private key (standing check).
  static constexpr std::string_view kBegin = "-----BEGIN EC " "PRIVATE KEY-----\n";
  static constexpr std::string_view kEnd = "-----END EC PRIVATE KEY-----\n";
  constexpr std::size_t kLine = 64;  // RFC 7468 §2: lines of exactly 64 characters but the last
  constexpr int kVariant = sodium_base64_VARIANT_ORIGINAL;
  ensure_sodium_initialised();
  SecretBuffer base64(sodium_base64_encoded_len(der->size(), kVariant));  // includes the NUL
  sodium_bin2base64(reinterpret_cast<char*>(base64.data()), base64.size(), der->data(), der->size(), kVariant);
  const std::size_t base64_size = base64.size() - 1;
  const std::size_t lines = (base64_size + kLine - 1) / kLine;
  SecretBuffer pem(kBegin.size() + base64_size + lines + kEnd.size());
  std::uint8_t* out = pem.data();
  std::memcpy(out, kBegin.data(), kBegin.size());
  out += kBegin.size();
  for (std::size_t at = 0; at < base64_size; at += kLine) {
    const std::size_t n = std::min(kLine, base64_size - at);
    std::memcpy(out, base64.data() + at, n);
    out += n;
    *out++ = '\n';
  }
  std::memcpy(out, kEnd.data(), kEnd.size());
  return pem;
}

Result<SecretBuffer> PrivateKey::to_der() const {
  // mbedTLS would write the token key's empty private value: refuse instead.
  if (in_token()) {
    return make_error(Errc::unsupported, "the private key " + impl_->token_uri +
                                             " stays in its PKCS#11 token: it cannot be exported");
  }
  SecretBuffer buffer(1024);  // a P-256 SEC1 DER is ~121 bytes; written at the end of the buffer
  const int n = mbedtls_pk_write_key_der(impl_->pk.get(), buffer.data(), buffer.size());
  if (n < 0) return mbedtls_error(n, "writing the private key as DER");
  return buffer.slice(buffer.size() - static_cast<std::size_t>(n), static_cast<std::size_t>(n));
}

Bytes PrivateKey::public_key_der() const { return spki_der_of(impl_->pk.get()); }
const std::string& PrivateKey::token_uri() const { return impl_->token_uri; }
std::string PrivateKey::public_key_id() const { return public_key_id_of_spki(public_key_der()); }

// ========================================================================================== CertificateRequest ====

struct CertificateRequest::Impl {
  Bytes der;
  detail::CsrContext csr;
  std::vector<std::string> requested_uris;
};

CertificateRequest::CertificateRequest(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CertificateRequest::CertificateRequest(CertificateRequest&&) noexcept = default;
CertificateRequest& CertificateRequest::operator=(CertificateRequest&&) noexcept = default;
CertificateRequest::~CertificateRequest() = default;

namespace {
// The subject of an AE-ID certificate or CSR. The identity is the SAN URI (TS-0003 §8.1.2.5); the CN is for people,
// and RFC 5280's ub-common-name is 64 characters while an AE-ID may have 128: keep its last 64 (the AE-ID stem).
std::string ae_id_subject(std::string_view ae_id) {
  constexpr std::size_t kMaxCommonName = 64;
  if (ae_id.size() > kMaxCommonName) ae_id.remove_prefix(ae_id.size() - kMaxCommonName);
  return "CN=" + std::string(ae_id);  // AE-ID characters have no meaning in a DN string
}
}  // namespace

Result<CertificateRequest> CertificateRequest::create(const PrivateKey& key, std::string_view ae_id) {
  if (auto ok = validate_ae_id(ae_id); !ok) return std::move(ok).error();
  auto san = detail::encode_subject_alt_names({std::string(ae_id)}, {});
  if (!san) return std::move(san).error();
  detail::CsrWriter writer;
  mbedtls_x509write_csr_set_key(writer.get(), key.impl_->pk.get());
  mbedtls_x509write_csr_set_md_alg(writer.get(), kDigest);
  const std::string subject = ae_id_subject(ae_id);
  if (const int rc = mbedtls_x509write_csr_set_subject_name(writer.get(), subject.c_str()); rc != 0) {
    return mbedtls_error(rc, "CSR subject " + quote_for_error(subject));
  }
  // 2.28 has no `critical` argument here (docs/crypto.md); a requested SAN is never critical anyway.
  if (const int rc = mbedtls_x509write_csr_set_extension(writer.get(), MBEDTLS_OID_SUBJECT_ALT_NAME,
                                                         MBEDTLS_OID_SIZE(MBEDTLS_OID_SUBJECT_ALT_NAME),
                                                         san->data(), san->size());
      rc != 0) {
    return mbedtls_error(rc, "CSR subjectAltName extension");
  }
  detail::Drbg drbg;
  if (auto ok = drbg.seed(); !ok) return std::move(ok).error();
  auto der = write_backwards(
      [&](unsigned char* buf, std::size_t size) {
        return mbedtls_x509write_csr_der(writer.get(), buf, size, detail::Drbg::random, &drbg);
      },
      "writing the CSR for " + quote_for_error(ae_id));
  if (!der) return std::move(der).error();
  return parse(*der);
}

Result<CertificateRequest> CertificateRequest::parse(ByteView der_or_pem) {
  auto impl = std::make_unique<Impl>();
  if (detail::looks_like_der(der_or_pem)) {
    impl->der.assign(der_or_pem.data, der_or_pem.data + der_or_pem.size);
  } else {
    const std::string_view text(reinterpret_cast<const char*>(der_or_pem.data), der_or_pem.size);
    auto blocks = detail::pem_decode(text, "CERTIFICATE REQUEST", 1);
    if (!blocks) return std::move(blocks).error();
    impl->der = std::move(blocks->front());
  }
  // mbedtls_x509_csr_parse_der rejects trailing bytes itself (LENGTH_MISMATCH).
  if (const int rc = mbedtls_x509_csr_parse_der(impl->csr.get(), impl->der.data(), impl->der.size()); rc != 0) {
    return mbedtls_error(rc, "CSR (" + std::to_string(impl->der.size()) + " bytes of DER)");
  }
  auto uris = detail::csr_requested_san_uris(ByteView(impl->csr->cri.p, impl->csr->cri.len));
  if (!uris) return std::move(uris).error();
  impl->requested_uris = std::move(uris).value();
  return CertificateRequest(std::move(impl));
}

const Bytes& CertificateRequest::der() const { return impl_->der; }
std::string CertificateRequest::pem() const { return detail::pem_encode("CERTIFICATE REQUEST", impl_->der); }
std::string CertificateRequest::subject() const { return name_string(impl_->csr->subject); }
std::vector<std::string> CertificateRequest::requested_san_uris() const { return impl_->requested_uris; }
Bytes CertificateRequest::public_key_der() const { return spki_der_of(&impl_->csr->pk); }

Result<void> CertificateRequest::verify_signature() const {
  // mbedTLS 2.28 has no mbedtls_x509_csr_verify (docs/crypto.md): hash the CertificationRequestInfo with the
  // signature's digest and check the signature with the request's own key (RFC 2986 §3 proof of possession).
  mbedtls_x509_csr& csr = *impl_->csr.get();
  const mbedtls_md_info_t* md = mbedtls_md_info_from_type(csr.sig_md);
  if (md == nullptr) {
    return make_error(Errc::unsupported, "CSR '" + subject() + "': signature digest not available in mbedTLS");
  }
  unsigned char hash[MBEDTLS_MD_MAX_SIZE];
  if (const int rc = mbedtls_md(md, csr.cri.p, csr.cri.len, hash); rc != 0) {
    return mbedtls_error(rc, "CSR '" + subject() + "': hashing CertificationRequestInfo");
  }
  if (const int rc = mbedtls_pk_verify_ext(csr.sig_pk, csr.sig_opts, &csr.pk, csr.sig_md, hash,
                                           mbedtls_md_get_size(md), csr.sig.p, csr.sig.len);
      rc != 0) {
    Error error = mbedtls_error(rc, "CSR '" + subject() + "': self-signature does not verify with its own key");
    error.code = Errc::crypto;  // whatever mbedTLS says, a CSR whose signature fails is a failed proof
    return error;
  }
  return ok_result();
}

// ======================================================================================== CertificateAuthority ====

struct CertificateAuthority::Impl {
  Certificate certificate;
  PrivateKey key;
  std::string issuer_name;  // the CA subject as mbedtls_x509write_crt_set_issuer_name needs it
};

CertificateAuthority::CertificateAuthority(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CertificateAuthority::CertificateAuthority(CertificateAuthority&&) noexcept = default;
CertificateAuthority& CertificateAuthority::operator=(CertificateAuthority&&) noexcept = default;
CertificateAuthority::~CertificateAuthority() = default;

const Certificate& CertificateAuthority::certificate() const { return impl_->certificate; }
const PrivateKey& CertificateAuthority::key() const { return impl_->key; }

namespace {

struct Extensions {
  bool is_ca = false;
  std::vector<std::string> uris;
  std::vector<std::string> dns_names;
};

Result<void> check_params(const IssueParams& params) {
  if (params.serial.empty() || params.serial.size() > kMaxSerialBytes) {
    return make_error(Errc::invalid_argument, "serial of " + std::to_string(params.serial.size()) +
                                                  " bytes (1-20 allowed, RFC 5280 §4.1.2.2)");
  }
  bool all_zero = true;
  for (auto b : params.serial) all_zero = all_zero && b == 0;
  if (all_zero) return make_error(Errc::invalid_argument, "serial is zero (must be positive, RFC 5280 §4.1.2.2)");
  if (params.serial.size() == kMaxSerialBytes && (params.serial[0] & 0x80) != 0) {
    return make_error(Errc::invalid_argument, "serial " + to_hex(params.serial, true) +
                                                  " needs 21 octets in DER (top bit set; at most 20 allowed)");
  }
  if (params.not_before >= params.not_after) {
    return make_error(Errc::invalid_argument, "validity: not_before " + std::to_string(params.not_before) +
                                                  " is not before not_after " + std::to_string(params.not_after));
  }
  return ok_result();
}

// Writes and signs one certificate: issuer_key signs, subject_key is certified. Every parameter is pinned by the
// profile in x509.hpp; the extension DER is built by hand where 2.28 has no setter (docs/crypto.md).
Result<Certificate> sign_certificate(mbedtls_pk_context* issuer_key, const std::string& issuer_name,
                                     mbedtls_pk_context* subject_key, const std::string& subject_name,
                                     const IssueParams& params, const Extensions& extensions) {
  if (auto ok = check_params(params); !ok) return std::move(ok).error();
  auto not_before = detail::to_validity_string(params.not_before);
  if (!not_before) return std::move(not_before).error();
  auto not_after = detail::to_validity_string(params.not_after);
  if (!not_after) return std::move(not_after).error();

  detail::CrtWriter writer;
  mbedtls_x509write_cert* w = writer.get();
  mbedtls_x509write_crt_set_version(w, MBEDTLS_X509_CRT_VERSION_3);
  mbedtls_x509write_crt_set_md_alg(w, kDigest);
  mbedtls_x509write_crt_set_subject_key(w, subject_key);
  mbedtls_x509write_crt_set_issuer_key(w, issuer_key);
  const std::string where = "certificate for '" + subject_name + "'";
  detail::Mpi serial;
  if (const int rc = mbedtls_mpi_read_binary(serial.get(), params.serial.data(), params.serial.size()); rc != 0) {
    return mbedtls_error(rc, where + ": serial");
  }
  int rc = mbedtls_x509write_crt_set_serial(w, serial.get());
  if (rc == 0) rc = mbedtls_x509write_crt_set_validity(w, not_before->c_str(), not_after->c_str());
  if (rc != 0) return mbedtls_error(rc, where + ": serial/validity");
  if ((rc = mbedtls_x509write_crt_set_subject_name(w, subject_name.c_str())) != 0) {
    return mbedtls_error(rc, where + ": subject " + quote_for_error(subject_name));
  }
  if ((rc = mbedtls_x509write_crt_set_issuer_name(w, issuer_name.c_str())) != 0) {
    return mbedtls_error(rc, where + ": issuer " + quote_for_error(issuer_name));
  }
  if (extensions.is_ca) {
    // pathlen 0: this CA signs end entities only (PROTOCOL.md §3.6); RFC 5280 §4.2.1.9 makes it critical.
    rc = mbedtls_x509write_crt_set_basic_constraints(w, 1, 0);
    if (rc == 0) rc = mbedtls_x509write_crt_set_key_usage(w, MBEDTLS_X509_KU_KEY_CERT_SIGN | MBEDTLS_X509_KU_CRL_SIGN);
    if (rc == 0) rc = mbedtls_x509write_crt_set_subject_key_identifier(w);
    if (rc != 0) return mbedtls_error(rc, where + ": CA extensions");
  } else {
    // 2.28 writes keyUsage critical (RFC 5280 §4.2.1.3 SHOULD) and an empty basicConstraints (= CA:FALSE).
    rc = mbedtls_x509write_crt_set_basic_constraints(w, 0, -1);
    if (rc == 0) rc = mbedtls_x509write_crt_set_key_usage(w, MBEDTLS_X509_KU_DIGITAL_SIGNATURE);
    if (rc == 0) rc = mbedtls_x509write_crt_set_subject_key_identifier(w);
    if (rc == 0) rc = mbedtls_x509write_crt_set_authority_key_identifier(w);
    if (rc != 0) return mbedtls_error(rc, where + ": end-entity extensions");
    auto eku = detail::encode_eku_server_client();
    if (!eku) return std::move(eku).error();
    if ((rc = mbedtls_x509write_crt_set_extension(w, MBEDTLS_OID_EXTENDED_KEY_USAGE,
                                                  MBEDTLS_OID_SIZE(MBEDTLS_OID_EXTENDED_KEY_USAGE), 0, eku->data(),
                                                  eku->size())) != 0) {
      return mbedtls_error(rc, where + ": extendedKeyUsage");
    }
    if (!extensions.uris.empty() || !extensions.dns_names.empty()) {
      auto san = detail::encode_subject_alt_names(extensions.uris, extensions.dns_names);
      if (!san) return std::move(san).error();
      if ((rc = mbedtls_x509write_crt_set_extension(w, MBEDTLS_OID_SUBJECT_ALT_NAME,
                                                    MBEDTLS_OID_SIZE(MBEDTLS_OID_SUBJECT_ALT_NAME), 0, san->data(),
                                                    san->size())) != 0) {
        return mbedtls_error(rc, where + ": subjectAltName");
      }
    }
  }
  detail::Drbg drbg;
  if (auto ok = drbg.seed(); !ok) return std::move(ok).error();
  auto der = write_backwards(
      [&](unsigned char* buf, std::size_t size) {
        return mbedtls_x509write_crt_der(w, buf, size, detail::Drbg::random, &drbg);
      },
      "writing the " + where);
  if (!der) return std::move(der).error();
  return Certificate::parse(*der);
}

// The issuer name is given to mbedTLS 2.28 as a string (docs/crypto.md), so the CA subject must survive
// dn_gets -> string_to_names -> DER unchanged, or issued certificates would not chain to the CA.
Result<std::string> issuer_name_of(const mbedtls_x509_crt& ca) {
  const std::string name = name_string(ca.subject);
  // Owns the list mbedtls_x509_string_to_names builds (also after a partial failure).
  struct NamedDataList {
    mbedtls_asn1_named_data* head = nullptr;
    NamedDataList() = default;
    NamedDataList(const NamedDataList&) = delete;
    NamedDataList& operator=(const NamedDataList&) = delete;
    ~NamedDataList() { mbedtls_asn1_free_named_data_list(&head); }
  } parsed;
  const int rc = mbedtls_x509_string_to_names(&parsed.head, name.c_str());
  Bytes buffer(ca.subject_raw.len + 256);
  unsigned char* p = buffer.data() + buffer.size();
  const int written = rc == 0 ? mbedtls_x509_write_names(&p, buffer.data(), parsed.head) : rc;
  if (written < 0 || static_cast<std::size_t>(written) != ca.subject_raw.len ||
      std::memcmp(p, ca.subject_raw.p, ca.subject_raw.len) != 0) {
    return make_error(Errc::unsupported, "CA subject " + quote_for_error(name) +
                                             " cannot be reproduced byte-exact by mbedTLS 2.28 as an issuer name "
                                             "(use plain attributes, UTF8String values, no escapes)");
  }
  return name;
}

}  // namespace

Result<CertificateAuthority> CertificateAuthority::create_self_signed(PrivateKey key, std::string_view subject,
                                                                       std::time_t not_before, std::time_t not_after) {
  if (subject.empty()) return make_error(Errc::invalid_argument, "CA subject is empty (e.g. \"CN=MEF CA\")");
  if (auto ok = require_p256(*key.impl_->pk.get(), "the CA key"); !ok) return std::move(ok).error();
  IssueParams params;
  params.serial.resize(16);  // random 128-bit serial: unique without a registry (CA/B BR §7.1 asks for 64+ bits)
  random_bytes(params.serial.data(), params.serial.size());
  params.serial[0] = static_cast<std::uint8_t>((params.serial[0] & 0x7f) | 0x01);  // positive, non-zero, 16 octets
  params.not_before = not_before;
  params.not_after = not_after;
  Extensions extensions;
  extensions.is_ca = true;
  const std::string name(subject);
  auto certificate = sign_certificate(key.impl_->pk.get(), name, key.impl_->pk.get(), name, params, extensions);
  if (!certificate) return std::move(certificate).error();
  return from(std::move(certificate).value(), std::move(key));
}

Result<CertificateAuthority> CertificateAuthority::from(Certificate certificate, PrivateKey key) {
  mbedtls_x509_crt& crt = *certificate.impl_->chain.get();
  const std::string who = "CA certificate '" + name_string(crt.subject) + "'";
  if (crt.ca_istrue == 0) return make_error(Errc::invalid_argument, who + " is not a CA (basicConstraints CA:FALSE)");
  if ((crt.ext_types & MBEDTLS_X509_EXT_KEY_USAGE) != 0 && (crt.key_usage & MBEDTLS_X509_KU_KEY_CERT_SIGN) == 0) {
    return make_error(Errc::invalid_argument, who + " lacks keyUsage keyCertSign");
  }
  if (auto ok = require_p256(crt.pk, who + "'s key"); !ok) return std::move(ok).error();
  if (key.in_token()) {
    // mbedtls_pk_check_pair needs both halves in memory; a token key is checked by its public half, and the token
    // proves the private half with each signature.
    if (spki_der_of(&crt.pk) != key.public_key_der()) {
      return make_error(Errc::invalid_argument, who + ": the private key " + key.token_uri() +
                                                    " does not belong to its public key");
    }
  } else if (const int rc = mbedtls_pk_check_pair(&crt.pk, key.impl_->pk.get()); rc != 0) {
    return mbedtls_error(rc, who + ": the private key does not belong to its public key");
  }
  auto issuer_name = issuer_name_of(crt);
  if (!issuer_name) return std::move(issuer_name).error();
  auto impl = std::unique_ptr<Impl>(new Impl{std::move(certificate), std::move(key), std::move(*issuer_name)});
  return CertificateAuthority(std::move(impl));
}

Result<Certificate> CertificateAuthority::issue(const CertificateRequest& request, std::string_view ae_id,
                                                const IssueParams& params) const {
  if (auto ok = validate_ae_id(ae_id); !ok) return std::move(ok).error();
  mbedtls_pk_context* subject_key = &request.impl_->csr->pk;
  if (auto ok = require_p256(*subject_key, "the CSR's key"); !ok) return std::move(ok).error();
  Extensions extensions;
  extensions.uris.emplace_back(ae_id);
  return sign_certificate(impl_->key.impl_->pk.get(), impl_->issuer_name, subject_key, ae_id_subject(ae_id),
                          params, extensions);
}

Result<Certificate> CertificateAuthority::issue_for_key(const PrivateKey& subject_key, const SubjectNames& names,
                                                        const IssueParams& params) const {
  if (auto ok = validate_common_name(names.common_name); !ok) return std::move(ok).error();
  for (const auto& uri : names.uris) {
    if (auto ok = validate_uri_name(uri); !ok) return std::move(ok).error();
  }
  for (const auto& dns : names.dns_names) {
    if (auto ok = validate_fqdn(dns); !ok) return std::move(ok).error();
  }
  Extensions extensions;
  extensions.uris = names.uris;
  extensions.dns_names = names.dns_names;
  return sign_certificate(impl_->key.impl_->pk.get(), impl_->issuer_name, subject_key.impl_->pk.get(),
                          "CN=" + names.common_name, params, extensions);
}

}  // namespace dauth::crypto

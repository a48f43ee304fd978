// The DRBG, and the DER/PEM walkers and writers of the X.509 module. Everything that reads
// bytes from outside checks every length against the end of its enclosing element before it moves.
#include <mbedtls/asn1.h>
#include <mbedtls/asn1write.h>
#include <mbedtls/base64.h>
#include <mbedtls/ecp.h>
#include <mbedtls/md.h>
#include <mbedtls/oid.h>
#include <mbedtls/pem.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "dauth/crypto/identifiers.hpp"
#include "x509_internal.hpp"

namespace dauth::crypto::detail {

namespace {

// mbedtls_asn1_get_* take `unsigned char**` but only read through it (mbedTLS 2.28 API); our inputs stay const.
unsigned char* reader_start(ByteView bytes) { return const_cast<unsigned char*>(bytes.data); }

bool is_pem_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

// Names what stands where a PEM block should start without quoting it: the text may be a key file given by mistake
// (a hex master key, a private key's base64), and error messages end up in logs (docs/conventions.md §9). Only the
// label of another PEM block is shown: the BEGIN line of an EC private key says what the file is and is not secret.
std::string describe_unexpected_text(std::string_view text) {
  constexpr std::string_view kBegin = "-----BEGIN ";
  constexpr std::size_t kMaxLabel = 64;
  if (text.compare(0, kBegin.size(), kBegin) == 0) {
    const std::size_t close = text.find("-----", kBegin.size());
    if (close != std::string_view::npos && close - kBegin.size() <= kMaxLabel) {
      const std::string_view label = text.substr(kBegin.size(), close - kBegin.size());
      const bool printable = std::all_of(label.begin(), label.end(), [](char c) { return c >= 0x20 && c < 0x7f; });
      if (printable) return "a '" + std::string(label) + "' block";
    }
  }
  return "not shown, it may be key material";
}

}  // namespace

// ---- DRBG ------------------------------------------------------------------------------------------------------

namespace {
int sodium_entropy(void*, unsigned char* out, std::size_t size) {
  random_bytes(out, size);  // libsodium randombytes_buf: getrandom(2); aborts rather than return weak bytes
  return 0;
}
}  // namespace

Drbg::Drbg() { mbedtls_ctr_drbg_init(&ctx_); }
Drbg::~Drbg() { mbedtls_ctr_drbg_free(&ctx_); }

Result<void> Drbg::seed() {
  static constexpr char kPersonalisation[] = "dauth x509";  // domain separation only (NIST SP 800-90A §8.7.1)
  const int rc = mbedtls_ctr_drbg_seed(&ctx_, sodium_entropy, nullptr,
                                       reinterpret_cast<const unsigned char*>(kPersonalisation),
                                       sizeof kPersonalisation - 1);
  if (rc != 0) return mbedtls_error(rc, "seeding the CTR-DRBG from libsodium");
  return ok_result();
}

int Drbg::random(void* self, unsigned char* out, std::size_t size) {
  return mbedtls_ctr_drbg_random(static_cast<Drbg*>(self)->context(), out, size);
}

// ---- DER / PEM -------------------------------------------------------------------------------------------------

Result<std::size_t> der_sequence_length(ByteView der) {
  unsigned char* p = reader_start(der);
  const unsigned char* end = der.data + der.size;
  std::size_t length = 0;
  if (der.size == 0) return make_error(Errc::parse, "DER: empty input (expected a SEQUENCE)");
  const int rc = mbedtls_asn1_get_tag(&p, end, &length, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE);
  if (rc != 0) return mbedtls_error(rc, "DER: outer SEQUENCE of " + std::to_string(der.size) + " bytes");
  return static_cast<std::size_t>(p - der.data) + length;
}

Result<std::vector<Bytes>> pem_decode(std::string_view text, std::string_view label, std::size_t max_blocks) {
  const std::string begin = "-----BEGIN " + std::string(label) + "-----";
  const std::string end = "-----END " + std::string(label) + "-----";
  std::vector<Bytes> blocks;
  std::size_t pos = 0;
  while (true) {
    while (pos < text.size() && is_pem_space(text[pos])) ++pos;
    if (pos == text.size()) break;
    if (text.compare(pos, begin.size(), begin) != 0) {
      return make_error(Errc::parse, "PEM: unexpected text at byte " + std::to_string(pos) + ": " +
                                         describe_unexpected_text(text.substr(pos)) + " (only whitespace and '" +
                                         begin + "' blocks are allowed)");
    }
    if (blocks.size() == max_blocks) {
      return make_error(Errc::limit, "PEM: more than " + std::to_string(max_blocks) + " '" + std::string(label) +
                                         "' blocks (at most " + std::to_string(max_blocks) + " allowed)");
    }
    pos += begin.size();
    const std::size_t stop = text.find(end, pos);
    if (stop == std::string_view::npos) {
      return make_error(Errc::parse, "PEM: '" + begin + "' block at byte " + std::to_string(pos - begin.size()) +
                                         " has no '" + end + "' line");
    }
    std::string base64;
    base64.reserve(stop - pos);
    for (std::size_t i = pos; i < stop; ++i) {
      if (!is_pem_space(text[i])) base64.push_back(text[i]);
    }
    std::size_t decoded_size = 0;
    Bytes decoded(base64.size() / 4 * 3 + 3);
    const int rc = mbedtls_base64_decode(decoded.data(), decoded.size(), &decoded_size,
                                         reinterpret_cast<const unsigned char*>(base64.data()), base64.size());
    if (rc != 0) {
      return mbedtls_error(rc, "PEM: base64 body of block " + std::to_string(blocks.size() + 1) + " ('" +
                                   std::string(label) + "')");
    }
    if (decoded_size == 0) {
      return make_error(Errc::parse, "PEM: block " + std::to_string(blocks.size() + 1) + " ('" +
                                         std::string(label) + "') is empty");
    }
    decoded.resize(decoded_size);
    blocks.push_back(std::move(decoded));
    pos = stop + end.size();
  }
  if (blocks.empty()) {
    return make_error(Errc::parse, "PEM: no '" + begin + "' block found in " + std::to_string(text.size()) +
                                       " bytes of text");
  }
  return blocks;
}

std::string pem_encode(std::string_view label, ByteView der) {
  std::size_t needed = 0;
  (void)mbedtls_base64_encode(nullptr, 0, &needed, der.data, der.size);  // reports the size (with NUL)
  std::string base64(needed, '\0');
  std::size_t written = 0;
  if (mbedtls_base64_encode(reinterpret_cast<unsigned char*>(base64.data()), base64.size(), &written, der.data,
                            der.size) != 0) {
    return {};  // cannot happen: the buffer has the size mbedTLS asked for
  }
  base64.resize(written);
  std::string out = "-----BEGIN " + std::string(label) + "-----\n";
  for (std::size_t i = 0; i < base64.size(); i += 64) {  // RFC 7468 §2: lines of 64 characters
    out.append(base64, i, 64);
    out.push_back('\n');
  }
  out += "-----END " + std::string(label) + "-----\n";
  return out;
}

// ---- CSR requested extensions ----------------------------------------------------------------------------------

namespace {

// Enters the element at *p with the expected tag; *element_end is its end. Bounds are checked by mbedTLS.
Result<void> enter(unsigned char** p, const unsigned char* end, int tag, const unsigned char** element_end,
                   const char* what) {
  std::size_t length = 0;
  const int rc = mbedtls_asn1_get_tag(p, end, &length, tag);
  if (rc != 0) return mbedtls_error(rc, std::string("CSR: ") + what);
  *element_end = *p + length;
  return ok_result();
}

Error csr_error(const std::string& what) { return make_error(Errc::parse, "CSR: " + what); }

// GeneralNames (RFC 5280 §4.2.1.6) in [p, end): collects tag [6] (uniformResourceIdentifier) entries.
Result<void> collect_uri_names(unsigned char* p, const unsigned char* end, std::vector<std::string>& uris) {
  const unsigned char* names_end = nullptr;
  if (auto ok = enter(&p, end, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE, &names_end,
                      "subjectAltName GeneralNames");
      !ok) {
    return ok;
  }
  if (names_end != end) return csr_error("trailing bytes after the subjectAltName GeneralNames");
  while (p < names_end) {
    const unsigned char tag = *p++;
    std::size_t length = 0;
    if (const int rc = mbedtls_asn1_get_len(&p, names_end, &length); rc != 0) {
      return mbedtls_error(rc, "CSR: length of a subjectAltName entry");
    }
    if (tag == (MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_UNIFORM_RESOURCE_IDENTIFIER)) {
      uris.emplace_back(reinterpret_cast<const char*>(p), length);
    }
    p += length;
  }
  return ok_result();
}

bool oid_is(const unsigned char* p, std::size_t length, const char* oid, std::size_t oid_length) {
  return length == oid_length && std::memcmp(p, oid, oid_length) == 0;
}

// Extensions ::= SEQUENCE OF Extension, the value of the extensionRequest attribute (PKCS#9, RFC 2985 §5.4.2).
Result<void> walk_extensions(unsigned char* p, const unsigned char* end, std::vector<std::string>& uris) {
  const unsigned char* extensions_end = nullptr;
  if (auto ok = enter(&p, end, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE, &extensions_end,
                      "extensionRequest Extensions");
      !ok) {
    return ok;
  }
  if (extensions_end != end) return csr_error("extensionRequest carries more than one value (RFC 2985 §5.4.2: one)");
  bool seen_san = false;
  while (p < extensions_end) {
    const unsigned char* extension_end = nullptr;
    if (auto ok = enter(&p, extensions_end, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE, &extension_end,
                        "Extension");
        !ok) {
      return ok;
    }
    const unsigned char* oid_end = nullptr;
    if (auto ok = enter(&p, extension_end, MBEDTLS_ASN1_OID, &oid_end, "Extension extnID"); !ok) return ok;
    const unsigned char* oid = p;
    const std::size_t oid_length = static_cast<std::size_t>(oid_end - p);
    p += oid_length;
    if (p < extension_end && *p == MBEDTLS_ASN1_BOOLEAN) {
      int critical = 0;
      if (const int rc = mbedtls_asn1_get_bool(&p, extension_end, &critical); rc != 0) {
        return mbedtls_error(rc, "CSR: Extension critical flag");
      }
    }
    const unsigned char* value_end = nullptr;
    if (auto ok = enter(&p, extension_end, MBEDTLS_ASN1_OCTET_STRING, &value_end, "Extension extnValue"); !ok) {
      return ok;
    }
    if (value_end != extension_end) return csr_error("trailing bytes after an Extension's extnValue");
    if (oid_is(oid, oid_length, MBEDTLS_OID_SUBJECT_ALT_NAME, MBEDTLS_OID_SIZE(MBEDTLS_OID_SUBJECT_ALT_NAME))) {
      // RFC 5280 §4.2: an extension appears at most once.
      if (seen_san) return csr_error("subjectAltName requested twice (RFC 5280 §4.2 allows it once)");
      seen_san = true;
      if (auto ok = collect_uri_names(p, value_end, uris); !ok) return ok;
    }
    p = const_cast<unsigned char*>(extension_end);
  }
  return ok_result();
}

}  // namespace

Result<std::vector<std::string>> csr_requested_san_uris(ByteView certification_request_info) {
  // CertificationRequestInfo ::= SEQUENCE { version INTEGER, subject Name, subjectPKInfo SubjectPublicKeyInfo,
  //                                         attributes [0] IMPLICIT SET OF Attribute }   (RFC 2986 §4.1)
  unsigned char* p = reader_start(certification_request_info);
  const unsigned char* end = certification_request_info.data + certification_request_info.size;
  const unsigned char* info_end = nullptr;
  if (auto ok = enter(&p, end, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE, &info_end,
                      "CertificationRequestInfo");
      !ok) {
    return std::move(ok).error();
  }
  const unsigned char* element_end = nullptr;
  if (auto ok = enter(&p, info_end, MBEDTLS_ASN1_INTEGER, &element_end, "version"); !ok) return std::move(ok).error();
  p = const_cast<unsigned char*>(element_end);
  for (const char* what : {"subject", "subjectPKInfo"}) {
    if (auto ok = enter(&p, info_end, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE, &element_end, what); !ok) {
      return std::move(ok).error();
    }
    p = const_cast<unsigned char*>(element_end);
  }
  std::vector<std::string> uris;
  if (p == info_end) return uris;  // no attributes at all (RFC 2986 requires the field; tolerate its absence)
  const unsigned char* attributes_end = nullptr;
  if (auto ok = enter(&p, info_end, MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_ASN1_CONSTRUCTED | 0, &attributes_end,
                      "attributes [0]");
      !ok) {
    return std::move(ok).error();
  }
  if (attributes_end != info_end) return csr_error("trailing bytes after the attributes");
  bool seen_extension_request = false;
  while (p < attributes_end) {
    // Attribute ::= SEQUENCE { type OBJECT IDENTIFIER, values SET OF AttributeValue }
    const unsigned char* attribute_end = nullptr;
    if (auto ok = enter(&p, attributes_end, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE, &attribute_end,
                        "Attribute");
        !ok) {
      return std::move(ok).error();
    }
    const unsigned char* oid_end = nullptr;
    if (auto ok = enter(&p, attribute_end, MBEDTLS_ASN1_OID, &oid_end, "Attribute type"); !ok) {
      return std::move(ok).error();
    }
    const bool is_extension_request =
        oid_is(p, static_cast<std::size_t>(oid_end - p), MBEDTLS_OID_PKCS9_CSR_EXT_REQ,
               MBEDTLS_OID_SIZE(MBEDTLS_OID_PKCS9_CSR_EXT_REQ));
    p = const_cast<unsigned char*>(oid_end);
    const unsigned char* values_end = nullptr;
    if (auto ok = enter(&p, attribute_end, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SET, &values_end,
                        "Attribute values");
        !ok) {
      return std::move(ok).error();
    }
    if (values_end != attribute_end) return csr_error("trailing bytes after an Attribute's values");
    if (is_extension_request) {
      if (seen_extension_request) return csr_error("extensionRequest attribute appears twice");
      seen_extension_request = true;
      if (auto ok = walk_extensions(p, values_end, uris); !ok) return std::move(ok).error();
    }
    p = const_cast<unsigned char*>(attribute_end);
  }
  return uris;
}

// ---- writers ---------------------------------------------------------------------------------------------------

namespace {
// mbedtls_asn1_write_* write backwards from the end of a buffer; this collects the result.
class BackwardWriter {
 public:
  explicit BackwardWriter(std::size_t capacity) : buffer_(capacity), p_(buffer_.data() + buffer_.size()) {}
  unsigned char** cursor() { return &p_; }
  unsigned char* start() { return buffer_.data(); }  // 2.28 writers take a non-const start
  std::size_t written() const { return static_cast<std::size_t>(buffer_.data() + buffer_.size() - p_); }
  Bytes result() const { return Bytes(static_cast<const unsigned char*>(p_), buffer_.data() + buffer_.size()); }

 private:
  Bytes buffer_;
  unsigned char* p_;
};

int write_tagged(BackwardWriter& w, unsigned char tag, const std::string& value) {
  int total = 0;
  int rc = mbedtls_asn1_write_raw_buffer(w.cursor(), w.start(), reinterpret_cast<const unsigned char*>(value.data()),
                                         value.size());
  if (rc < 0) return rc;
  total += rc;
  if ((rc = mbedtls_asn1_write_len(w.cursor(), w.start(), value.size())) < 0) return rc;
  total += rc;
  if ((rc = mbedtls_asn1_write_tag(w.cursor(), w.start(), tag)) < 0) return rc;
  return total + rc;
}
}  // namespace

Result<Bytes> encode_subject_alt_names(const std::vector<std::string>& uris, const std::vector<std::string>& dns) {
  std::size_t capacity = 16;
  for (const auto& v : uris) capacity += v.size() + 8;
  for (const auto& v : dns) capacity += v.size() + 8;
  BackwardWriter w(capacity);
  // Written backwards, so iterate in reverse to keep the caller's order: DNS names after URIs.
  for (auto it = dns.rbegin(); it != dns.rend(); ++it) {
    if (const int rc = write_tagged(w, MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_DNS_NAME, *it); rc < 0) {
      return mbedtls_error(rc, "encoding subjectAltName dNSName");
    }
  }
  for (auto it = uris.rbegin(); it != uris.rend(); ++it) {
    if (const int rc = write_tagged(w, MBEDTLS_ASN1_CONTEXT_SPECIFIC | MBEDTLS_X509_SAN_UNIFORM_RESOURCE_IDENTIFIER,
                                    *it);
        rc < 0) {
      return mbedtls_error(rc, "encoding subjectAltName URI");
    }
  }
  const std::size_t content = w.written();
  int rc = mbedtls_asn1_write_len(w.cursor(), w.start(), content);
  if (rc >= 0) rc = mbedtls_asn1_write_tag(w.cursor(), w.start(), MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE);
  if (rc < 0) return mbedtls_error(rc, "encoding subjectAltName GeneralNames");
  return w.result();
}

Result<Bytes> encode_eku_server_client() {
  // ExtKeyUsageSyntax ::= SEQUENCE SIZE (1..MAX) OF KeyPurposeId (RFC 5280 §4.2.1.12): DTLS server and client.
  BackwardWriter w(64);
  int rc = mbedtls_asn1_write_oid(w.cursor(), w.start(), MBEDTLS_OID_CLIENT_AUTH,
                                  MBEDTLS_OID_SIZE(MBEDTLS_OID_CLIENT_AUTH));
  if (rc >= 0) {
    rc = mbedtls_asn1_write_oid(w.cursor(), w.start(), MBEDTLS_OID_SERVER_AUTH,
                                MBEDTLS_OID_SIZE(MBEDTLS_OID_SERVER_AUTH));
  }
  if (rc >= 0) rc = mbedtls_asn1_write_len(w.cursor(), w.start(), w.written());
  if (rc >= 0) rc = mbedtls_asn1_write_tag(w.cursor(), w.start(), MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE);
  if (rc < 0) return mbedtls_error(rc, "encoding extendedKeyUsage");
  return w.result();
}

// ---- time ------------------------------------------------------------------------------------------------------

std::time_t to_time_t(const mbedtls_x509_time& time) {
  std::tm tm{};
  tm.tm_year = time.year - 1900;
  tm.tm_mon = time.mon - 1;
  tm.tm_mday = time.day;
  tm.tm_hour = time.hour;
  tm.tm_min = time.min;
  tm.tm_sec = time.sec;
  return timegm(&tm);
}

Result<std::string> to_validity_string(std::time_t time) {
  std::tm tm{};
  if (gmtime_r(&time, &tm) == nullptr || tm.tm_year + 1900 < 1950 || tm.tm_year + 1900 > 9999) {
    return make_error(Errc::invalid_argument, "validity time " + std::to_string(time) +
                                                  " is outside what X.509 can encode (years 1950-9999, RFC 5280 "
                                                  "§4.1.2.5)");
  }
  char text[32];
  std::snprintf(text, sizeof text, "%04d%02d%02d%02d%02d%02d", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                tm.tm_hour, tm.tm_min, tm.tm_sec);
  return std::string(text);
}

}  // namespace dauth::crypto::detail

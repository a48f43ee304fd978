// X.509 on mbedTLS 2.28: certificates, EC P-256 keys, CSRs, and a small CA (PROTOCOL.md §3.6, §4; TS-0003 §10.1).
//
// Every type owns its mbedTLS context (RAII); none is copyable, all are movable. Private keys live in mbedTLS
// contexts while in use and are serialised only into SecretBuffer.
#pragma once

#include <ctime>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto {

class PrivateKey;

// A certificate chain (leaf first) or a set of trust anchors.
class Certificate {
 public:
  // Accepts one DER certificate, or PEM text with one or more certificates (leaf first).
  static Result<Certificate> parse(ByteView der_or_pem);
  static Result<Certificate> load_file(const std::string& path);

  Certificate(Certificate&&) noexcept;
  Certificate& operator=(Certificate&&) noexcept;
  ~Certificate();

  std::size_t chain_length() const;
  Bytes der() const;                        // the leaf
  std::vector<Bytes> chain_der() const;     // every certificate, leaf first
  std::string pem() const;                  // the whole chain
  std::string subject() const;              // RFC 4514-ish string from mbedTLS, e.g. "CN=MEF CA"
  std::string issuer() const;
  std::string serial_hex() const;           // upper-case hex, no separators
  std::time_t not_before() const;
  std::time_t not_after() const;
  bool is_ca() const;

  // subjectAltName entries of the leaf, walking the SAN sequence ourselves: mbedTLS 2.28's SAN helper rejects
  // URI names (docs/crypto.md). Values are returned byte-exact; entries with other tags are skipped.
  std::vector<std::string> san_uris() const;       // tag 0x86
  std::vector<std::string> san_dns_names() const;  // tag 0x82

  // The oneM2M identity the leaf authenticates (TS-0003 §8.1.2.5): the one subjectAltName URI that is a valid
  // AE-ID. Errors: no URI SAN at all, none of them a valid AE-ID, or more than one (ambiguous).
  Result<std::string> ae_id() const;

  // DER SubjectPublicKeyInfo of the leaf, and its RFC 6920 name "ni:///sha-256;<base64url, no padding>".
  Bytes public_key_der() const;
  std::string public_key_id() const;

  // RFC 5280 basic path validation of the leaf against trust anchors (time checked against `now`); the
  // intermediate certificates are the rest of this chain. Errors name the mbedTLS verify flags in words.
  Result<void> verify(const Certificate& trust_anchors, std::time_t now) const;

 private:
  struct Impl;
  explicit Certificate(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class CertificateAuthority;
};

// RFC 6920 "ni:///sha-256;..." name of a DER SubjectPublicKeyInfo (raw public keys, PROTOCOL.md §4).
std::string public_key_id_of_spki(ByteView spki_der);
// Parses a DER SubjectPublicKeyInfo (raw public key, RFC 7250) and returns its identifier; error if not a key.
Result<std::string> public_key_id_from_spki(ByteView spki_der);
// A public key id as an operator may copy it, in its one stored form "ni:///sha-256;<base64url>". Accepted: that
// form, GnuTLS's "sha256:<64 hex>" (gnutls-cli, certtool --pubkey-info and p11tool print it as the "Public Key
// ID") and "pin-sha256:<base64>" (the same digest, RFC 7469's pin). All three are SHA-256 of the DER
// SubjectPublicKeyInfo. Errors: invalid_argument, naming the forms.
Result<std::string> canonical_public_key_id(std::string_view text);
// The other two forms of a canonical id, for printing next to it.
struct PublicKeyIdForms {
  std::string sha256_hex;  // "sha256:<64 lower-case hex>"
  std::string pin_sha256;  // "pin-sha256:<base64>"
};
PublicKeyIdForms public_key_id_forms(std::string_view canonical_id);

class PrivateKey {
 public:
  static Result<PrivateKey> generate_p256();
  // PEM ("EC PRIVATE KEY" or "PRIVATE KEY") or DER.
  static Result<PrivateKey> parse(const SecretBuffer& pem_or_der);
  static Result<PrivateKey> load_file(const std::string& path);

  PrivateKey(PrivateKey&&) noexcept;
  PrivateKey& operator=(PrivateKey&&) noexcept;
  ~PrivateKey();

  // Errc::unsupported for a key in a token: its private value never leaves the token.
  Result<SecretBuffer> to_pem() const;  // SEC1 "EC PRIVATE KEY", NUL not included
  Result<SecretBuffer> to_der() const;
  Bytes public_key_der() const;         // SubjectPublicKeyInfo
  std::string public_key_id() const;    // RFC 6920 of the SPKI
  // The pkcs11: URI of a key that signs in a PKCS#11 token (dauth/crypto/token.hpp); empty for a key in memory.
  const std::string& token_uri() const;
  bool in_token() const { return !token_uri().empty(); }

  struct Impl;  // x509_internal.hpp

 private:
  explicit PrivateKey(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class CertificateRequest;
  friend class CertificateAuthority;
  friend class Token;
};

// A PKCS#10 certificate signing request (RFC 2986), as EST-coaps carries it (application/pkcs10, DER).
class CertificateRequest {
 public:
  // Makes a CSR signed with key: subject "CN=<ae_id>" (its last 64 characters if longer: RFC 5280
  // ub-common-name), extensionRequest with subjectAltName URI = ae_id
  // (TS-0003 §10.1.4). ae_id must be a valid AE-ID.
  static Result<CertificateRequest> create(const PrivateKey& key, std::string_view ae_id);
  static Result<CertificateRequest> parse(ByteView der_or_pem);

  CertificateRequest(CertificateRequest&&) noexcept;
  CertificateRequest& operator=(CertificateRequest&&) noexcept;
  ~CertificateRequest();

  const Bytes& der() const;
  std::string pem() const;
  std::string subject() const;
  // The subjectAltName URIs requested in the extensionRequest attribute (walked by hand: mbedTLS 2.28 does not
  // expose requested extensions).
  std::vector<std::string> requested_san_uris() const;
  Bytes public_key_der() const;
  // Checks the self-signature (mbedTLS 2.28 has no csr_verify): proves possession of the private key.
  Result<void> verify_signature() const;

 private:
  struct Impl;
  explicit CertificateRequest(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class CertificateAuthority;
};

// Serial and validity of a certificate to issue. The serial is 1–20 bytes, big-endian, positive, and unique per CA.
struct IssueParams {
  Bytes serial;
  std::time_t not_before = 0;
  std::time_t not_after = 0;
};

// Names of a certificate issued for a bare key (MEF FQDN certificates, peers, tests).
struct SubjectNames {
  std::string common_name;
  std::vector<std::string> uris;       // SAN URI entries (an AE-ID certificate carries the AE-ID here)
  std::vector<std::string> dns_names;  // SAN dNSName entries (an FQDN certificate)
};

// A CA certificate with its private key: issues AE-ID certificates from CSRs (P-256, ECDSA-SHA256, keyUsage
// digitalSignature (critical), EKU serverAuth + clientAuth, basicConstraints CA:FALSE, SKI/AKI).
class CertificateAuthority {
 public:
  // A new self-signed CA (basicConstraints CA:TRUE pathlen:0, keyUsage keyCertSign|cRLSign), e.g. "CN=MEF CA".
  static Result<CertificateAuthority> create_self_signed(PrivateKey key, std::string_view subject,
                                                          std::time_t not_before, std::time_t not_after);
  static Result<CertificateAuthority> from(Certificate certificate, PrivateKey key);

  CertificateAuthority(CertificateAuthority&&) noexcept;
  CertificateAuthority& operator=(CertificateAuthority&&) noexcept;
  ~CertificateAuthority();

  const Certificate& certificate() const;
  const PrivateKey& key() const;

  // An AE-ID certificate for the CSR's public key: SAN URI = ae_id (a valid AE-ID), subject CN as for a CSR. Checks neither
  // the CSR's signature nor whether the requester may hold ae_id: the caller (the MEF) decides that first.
  Result<Certificate> issue(const CertificateRequest& request, std::string_view ae_id,
                            const IssueParams& params) const;
  // A certificate for a bare public key of ours, with the same end-entity profile.
  Result<Certificate> issue_for_key(const PrivateKey& subject_key, const SubjectNames& names,
                                    const IssueParams& params) const;

 private:
  struct Impl;
  explicit CertificateAuthority(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dauth::crypto

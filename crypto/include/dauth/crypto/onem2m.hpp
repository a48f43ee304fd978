// The oneM2M TS-0003 key derivations that dauth implements (PROTOCOL.md §3–4), byte-exact where TS-0003 is normative.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto {

// RFC 5705 keying material exporter of an established (D)TLS session, with no context value. transport/
// implements it per TLS backend; the derivations below only need this interface.
class KeyingMaterialExporter {
 public:
  virtual ~KeyingMaterialExporter() = default;
  virtual Result<SecretBuffer> export_keying_material(std::string_view label, std::size_t length) const = 0;
};

// TS-0003 §10.3.1: label and length of the enrolment key export.
inline constexpr std::string_view kBootstrapExporterLabel = "EXPORTER-oneM2M-Bootstrap";
inline constexpr std::size_t kBootstrapExportSize = 48;
inline constexpr std::size_t kRelativeKeIdSize = 16;
inline constexpr std::size_t kEnrolmentKeySize = 32;

// TS-0004 m2m:suid values that dauth uses (PROTOCOL.md §1).
enum class Suid : int {
  preprovisioned_with_mef = 10,
  rspf_key_for_saef = 22,
  rspf_key_for_esprim = 23,  // the pairwiseESPrimKey (PROTOCOL.md §7)
  certificate_with_mef = 40,
  certificate_for_saef = 42,
};
Result<Suid> parse_suid(std::string_view decimal);

struct EnrolmentKey {
  KeId ke_id;        // HEX(RelativeKeID) "@" MEF-FQDN
  SecretBuffer ke;   // 32 bytes; never travels
};

// Splits the 48-byte bootstrap export: RelativeKeID = out[0..16), Ke = out[16..48) (PROTOCOL.md §3.3; TS-0003's
// "most significant" bytes read big-endian).
Result<EnrolmentKey> split_bootstrap_export(const SecretBuffer& exported, std::string_view mef_fqdn);

// Exports kBootstrapExportSize bytes with kBootstrapExporterLabel and splits them.
Result<EnrolmentKey> derive_enrolment_key(const KeyingMaterialExporter& session, std::string_view mef_fqdn);

// Ker = HMAC-SHA-256(Ke, "dauth Enrolment Re-authentication Key derivation") — dauth's own recipe (PROTOCOL.md §3.5).
inline constexpr std::string_view kReauthenticationLabel = "dauth Enrolment Re-authentication Key derivation";
SecretBuffer derive_reauthentication_key(const SecretBuffer& ke);

// TS-0003 §10.3.7: HMAC-SHA-256(Ke, label || decimal(SUID) || target_id), target_id UTF-8 as configured.
inline constexpr std::string_view kUsageConstrainedLabel =
    "oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation";
Result<SecretBuffer> derive_usage_constrained_key(const SecretBuffer& ke, Suid suid, std::string_view target_id);

}  // namespace dauth::crypto

#include "dauth/crypto/onem2m.hpp"

#include <algorithm>
#include <string>

#include "dauth/crypto/kdf.hpp"

namespace dauth::crypto {

Result<Suid> parse_suid(std::string_view decimal) {
  for (const Suid suid : {Suid::preprovisioned_with_mef, Suid::rspf_key_for_saef, Suid::rspf_key_for_esprim,
                          Suid::certificate_with_mef,
                          Suid::certificate_for_saef}) {
    if (decimal == std::to_string(static_cast<int>(suid))) return suid;
  }
  return make_error(Errc::invalid_argument, "SUID " + quote_for_error(decimal) +
                                                ": not one dauth serves (10, 22, 23, 40 or 42; TS-0004 m2m:suid)");
}

Result<EnrolmentKey> split_bootstrap_export(const SecretBuffer& exported, std::string_view mef_fqdn) {
  if (exported.size() != kBootstrapExportSize) {
    return make_error(Errc::invalid_argument, "bootstrap export has " + std::to_string(exported.size()) +
                                                  " bytes, must be " + std::to_string(kBootstrapExportSize));
  }
  if (auto ok = validate_fqdn(mef_fqdn); !ok) {
    return make_error(Errc::invalid_argument, "MEF " + ok.error().message);
  }
  // TS-0003 §10.3.1: RelativeKeID = the 16 most significant bytes, Ke = the 32 least significant (big-endian).
  EnrolmentKey key;
  std::copy(exported.data(), exported.data() + kRelativeKeIdSize, key.ke_id.relative.begin());
  key.ke_id.mef_fqdn = canonical_fqdn(mef_fqdn);
  key.ke = exported.slice(kRelativeKeIdSize, kEnrolmentKeySize);
  return key;
}

Result<EnrolmentKey> derive_enrolment_key(const KeyingMaterialExporter& session, std::string_view mef_fqdn) {
  auto exported = session.export_keying_material(kBootstrapExporterLabel, kBootstrapExportSize);
  if (!exported) return std::move(exported).error();
  return split_bootstrap_export(*exported, mef_fqdn);
}

SecretBuffer derive_reauthentication_key(const SecretBuffer& ke) {
  return hmac_sha256(ke, ByteView::of(kReauthenticationLabel));
}

Result<SecretBuffer> derive_usage_constrained_key(const SecretBuffer& ke, Suid suid, std::string_view target_id) {
  if (ke.size() != kEnrolmentKeySize) {
    return make_error(Errc::invalid_argument,
                      "Ke has " + std::to_string(ke.size()) + " bytes, must be " + std::to_string(kEnrolmentKeySize));
  }
  if (auto ok = validate_ae_id(target_id); !ok) {
    return make_error(Errc::invalid_argument, "Enrolment Target " + ok.error().message);
  }
  // TS-0003 §10.3.7: label || SUID || target ID. SUID as decimal ASCII (PROTOCOL.md §4), no separators.
  std::string message(kUsageConstrainedLabel);
  message += std::to_string(static_cast<int>(suid));
  message += target_id;
  return hmac_sha256(ke, ByteView::of(message));
}

}  // namespace dauth::crypto

#include "dauth/rspf/credential_rules.hpp"

#include <set>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/x509.hpp"

namespace dauth::rspf {


Result<void> check_kpm_id_names_mef(std::string_view kpm_id, std::string_view mef_fqdn) {
  if (auto valid = crypto::validate_kpm_id(kpm_id); !valid) return std::move(valid).error();
  if (crypto::key_id_names_mef(kpm_id, mef_fqdn)) return ok_result();
  return make_error(Errc::invalid_argument, "KpmID " + crypto::quote_for_error(kpm_id) + " names MEF " +
                                                crypto::issuer_fqdn_of(kpm_id).value() + ", not " +
                                                std::string(mef_fqdn));
}

std::vector<RowProblem> check_enrolee_row(const EnroleeRow& row, const MefOffer& mef) {
  std::vector<RowProblem> problems;
  const auto problem = [&](const char* field, std::string message) {
    problems.push_back({field, std::move(message)});
  };
  const bool psk = !row.kpm_id.empty() || row.has_key;
  const bool certificate = !row.certificate_ae_id.empty();
  const bool rpk = !row.rpk.empty();
  if (int(psk) + int(certificate) + int(rpk) != 1) {
    problem(rpk ? "rpk" : "kpm_id",
            "needs exactly one bootstrap identity: a KpmID with its key, a certificate AE-ID or a raw public key id");
  } else if (rpk) {
    if (auto valid = crypto::canonical_public_key_id(row.rpk); !valid) {
      problem("rpk", valid.error().message);
    } else if (!mef.serves_rpk) {
      problem("rpk", "needs mef.raw_key (the MEF's own raw public key, RFC 7250)");
    }
  } else if (psk) {
    if (row.kpm_id.empty() || !row.has_key) {
      problem("kpm_id", "a KpmID and its key (kpm_file, or the key sent with the request) go together: give both");
    } else if (auto named = check_kpm_id_names_mef(row.kpm_id, mef.fqdn); !named) {
      problem("kpm_id", named.error().message);
    }
  } else {
    if (auto valid = crypto::validate_ae_id(row.certificate_ae_id); !valid) {
      problem("certificate_ae_id", valid.error().message);
    } else if (!mef.serves_x509) {
      problem("certificate_ae_id",
              "needs mef.certificate_file, mef.private_key_file and mef.device_ca (the MEF serves X.509)");
    }
  }
  if (auto valid = crypto::validate_ae_id(row.enrolee_id); !valid) problem("enrolee_id", valid.error().message);
  if (row.targets.size() > kMaxEnroleeTargets) {
    problem("targets", std::to_string(row.targets.size()) + " targets: at most " +
                           std::to_string(kMaxEnroleeTargets));
  }
  std::set<std::string_view> seen;
  for (const auto& target : row.targets) {
    if (auto valid = crypto::validate_ae_id(target); !valid) {
      problem("targets", "target: " + valid.error().message);
    } else if (!seen.insert(target).second) {
      problem("targets", "target " + crypto::quote_for_error(target) + " listed twice");
    }
  }
  if (row.lifetime < 0 || row.lifetime > kMaxEnroleeLifetimeS) {
    problem("lifetime", "lifetime " + std::to_string(row.lifetime) + ": must be 1–" +
                            std::to_string(kMaxEnroleeLifetimeS) + " seconds, or 0 for mef.enrolment_lifetime");
  }
  if (row.certificate_enrolment && rpk) {
    problem("certificate_enrolment", "is not offered to raw-key enrolees");
  } else if (row.certificate_enrolment && !mef.issues_certificates) {
    problem("certificate_enrolment", "certificate enrolment needs mef.issuing_ca_certificate and mef.issuing_ca_key");
  }
  return problems;
}

}  // namespace dauth::rspf

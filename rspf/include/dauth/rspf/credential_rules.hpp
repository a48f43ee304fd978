// The rules of the RSPF's configured credentials, in one place for every path that takes one: the
// configuration file (dauthd.toml [[enrolee.ae]] and [[mef.enrolee]]), the control verbs (credentials.add,
// enrolees.add) and the Enrolee itself (Enrolee::use_bootstrap_key). Messages say what, which value, and what is
// allowed; callers prefix where (file:line, or the verb).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dauth/error.hpp"

namespace dauth::rspf {

// A KpmID ("<relative>@<MEF-FQDN>", crypto::validate_kpm_id) that names the MEF mef_fqdn; the FQDNs compare
// case-insensitively (DNS names, RFC 4343). Errors: invalid_argument.
Result<void> check_kpm_id_names_mef(std::string_view kpm_id, std::string_view mef_fqdn);

// A MEF enrolee table row (PROTOCOL.md §3.1) before it is stored: configured ([[mef.enrolee]]) or added at run time
// (enrolees.add). Which rows already exist (ids listed twice) is the caller's to check.
struct EnroleeRow {
  std::string kpm_id;             // PSK row: with its key
  bool has_key = false;
  std::string certificate_ae_id;  // certificate row: no KpmID, no key
  std::string rpk;                // raw-public-key row: the key's id (crypto::canonical_public_key_id forms)
  std::string enrolee_id;
  std::vector<std::string> targets;
  std::int64_t lifetime = 0;      // seconds; 0: the MEF's default
  bool certificate_enrolment = false;
};
// What the MEF serves, as the row rules need it.
struct MefOffer {
  std::string fqdn;
  bool serves_x509 = false;          // certificate_file, private_key_file and device_ca
  bool issues_certificates = false;  // issuing_ca_certificate and issuing_ca_key
  bool serves_rpk = false;           // its own raw public key (RFC 7250)
};
inline constexpr std::size_t kMaxEnroleeTargets = 1024;
inline constexpr std::int64_t kMaxEnroleeLifetimeS = 365LL * 86400;

struct RowProblem {
  std::string field;  // the row's key it is about: kpm_id, certificate_ae_id, enrolee_id, targets, ...
  std::string message;
};
// Every rule the row breaks, in field order; empty when it is acceptable.
std::vector<RowProblem> check_enrolee_row(const EnroleeRow& row, const MefOffer& mef);

}  // namespace dauth::rspf

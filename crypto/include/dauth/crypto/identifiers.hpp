// Validation of the identifiers of PROTOCOL.md §1 and §3: AE-ID, KpmID, KeID, FQDN. Every error names the value
// (quoted, truncated to 64 characters), the rule it broke, and what is allowed.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "dauth/error.hpp"

namespace dauth::crypto {

// AE-ID: 1–128 characters from [A-Za-z0-9-._~/]; plain (CAE-meter-01), SP-relative (/in-cse/CAE-meter-01) or
// absolute (//m2m.example.net/in-cse/CAE-meter-01). Compared byte-exact (ASCII, so NFKC is the identity).
Result<void> validate_ae_id(std::string_view ae_id);

// DNS name (RFC 1123): 1–253 characters, labels 1–63 of [A-Za-z0-9-] not starting or ending with '-'. No trailing
// dot: "mef.example.net." is refused, not stripped.
Result<void> validate_fqdn(std::string_view fqdn);

// The one form of a DNS name (MEF FQDN, and the FQDN part of KpmIDs and KeIDs) that dauth stores, uses as a map key
// and compares: ASCII letters lower-cased, nothing else changed (RFC 4343 §3: DNS names compare case-insensitively).
// Never fails and does not validate: call validate_fqdn first on untrusted input.
std::string canonical_fqdn(std::string_view fqdn);

// Whether two DNS names are the same name: canonical_fqdn(a) == canonical_fqdn(b).
bool same_fqdn(std::string_view a, std::string_view b);

// The TLS server name (SNI, RFC 6066 HostName) that names an AE (PROTOCOL.md §2). An AE-ID that
// is a valid DNS name (validate_fqdn) is sent as it is, so stock clients (coaps://CAE-valve/...) keep working; any
// other AE-ID (/in-cse/CAE-x, //sp/in-cse/CAE-x, C_meter) as "ae-" + lower-case base32 (RFC 4648 §6, no padding)
// of the first 20 bytes of SHA-256(AE-ID bytes): 35 characters, one DNS label. A server compares a received SNI
// byte-exact with this name of each AE it serves: AE-IDs are case-sensitive (CAE-Valve and CAE-valve are two
// AEs), so a client that changes the case gets the unknown-SNI behaviour. Deterministic; never fails.
std::string server_name_for_ae_id(std::string_view ae_id);

// KpmID: "<relative>@<MEF-FQDN>", relative part [A-Za-z0-9._-]{1,64} (KpsaID form, TS-0003 §10.5). The relative
// part is compared byte-exact, the FQDN as a DNS name (same_fqdn).
Result<void> validate_kpm_id(std::string_view kpm_id);

// A valid KpmID in the form dauth stores, looks up and offers as PSK identity: the relative part as given, '@', the
// canonical_fqdn of the MEF. Two KpmIDs name the same credential iff their canonical forms are equal.
Result<std::string> canonical_kpm_id(std::string_view kpm_id);

// The FQDN after the '@' of a KpmID or KeID (validated), as written (not canonicalised, for messages).
Result<std::string> issuer_fqdn_of(std::string_view key_id);

// Whether a KpmID or KeID names the MEF with this FQDN (same_fqdn on its issuer); false when key_id is malformed.
bool key_id_names_mef(std::string_view key_id, std::string_view mef_fqdn);

// KeID (TS-0003 §10.3.4): HEX(RelativeKeID) "@" MEF-FQDN, 32 hex characters. Parsing accepts either case;
// text() is canonical (upper-case hex, lower-case FQDN), so two KeIDs are the same iff their text() is equal.
struct KeId {
  std::array<std::uint8_t, 16> relative{};
  std::string mef_fqdn;

  std::string text() const;
};
Result<KeId> parse_ke_id(std::string_view ke_id);

// A certificate serial number (RFC 5280 §4.1.2.2: a positive INTEGER of at most 20 octets) in the one form dauth
// stores, lists at GET /mef/revoked and compares: upper-case hex of whole octets without leading zero octets,
// exactly what Certificate::serial_hex() prints (and `openssl x509 -serial`). Accepts 1–40 hex digits in either
// case, with or without leading zeros or an odd digit count: "0x" is not a hex digit; "00A1b" -> "0A1B".
Result<std::string> canonical_serial(std::string_view serial_hex);

// Quotes a value for an error message: printable ASCII kept, anything else as \xNN, cut at 64 characters with
// "...". Never use it on secrets.
std::string quote_for_error(std::string_view value);

}  // namespace dauth::crypto

#include "dauth/crypto/identifiers.hpp"

#include <algorithm>
#include <cstdio>

#include "dauth/crypto/kdf.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto {

namespace {

constexpr std::size_t kMaxAeIdLength = 128;       // PROTOCOL.md §1
constexpr std::size_t kMaxFqdnLength = 253;       // RFC 1035 §2.3.4, without the trailing dot
constexpr std::size_t kMaxLabelLength = 63;
constexpr std::size_t kMaxRelativeKpmIdLength = 64;
constexpr std::size_t kRelativeKeIdHexLength = 32;

bool is_alnum(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

Error invalid(std::string_view what, std::string_view value, const std::string& rule) {
  return make_error(Errc::invalid_argument, std::string(what) + " " + quote_for_error(value) + ": " + rule);
}

}  // namespace

std::string quote_for_error(std::string_view value) {
  constexpr std::size_t kMaxShown = 64;
  std::string out = "'";
  for (std::size_t i = 0; i < value.size() && i < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(value[i]);
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      char escaped[5];
      std::snprintf(escaped, sizeof escaped, "\\x%02x", c);
      out += escaped;
    }
  }
  if (value.size() > kMaxShown) out += "...";
  out += "'";
  return out;
}

Result<void> validate_ae_id(std::string_view ae_id) {
  if (ae_id.empty() || ae_id.size() > kMaxAeIdLength) {
    return invalid("AE-ID", ae_id,
                   "length " + std::to_string(ae_id.size()) + ", must be 1–" + std::to_string(kMaxAeIdLength));
  }
  for (std::size_t i = 0; i < ae_id.size(); ++i) {
    const char c = ae_id[i];
    if (!is_alnum(c) && c != '-' && c != '.' && c != '_' && c != '~' && c != '/') {
      return invalid("AE-ID", ae_id,
                     "character " + quote_for_error(ae_id.substr(i, 1)) + " at position " + std::to_string(i + 1) +
                         " is not allowed (letters, digits and - . _ ~ / only)");
    }
  }
  // Plain "CAE-x", SP-relative "/cse/CAE-x" or absolute "//sp/cse/CAE-x" (TS-0001 §7.2): no empty segment beyond
  // the leading slashes of those two forms, and no trailing slash.
  std::size_t leading = 0;
  while (leading < ae_id.size() && ae_id[leading] == '/') ++leading;
  if (leading > 2) return invalid("AE-ID", ae_id, "more than two leading '/' (plain, /SP-relative or //absolute)");
  if (leading == ae_id.size()) return invalid("AE-ID", ae_id, "has no name after the leading '/'");
  if (ae_id.back() == '/') return invalid("AE-ID", ae_id, "ends with '/'");
  if (ae_id.find("//", leading) != std::string_view::npos) return invalid("AE-ID", ae_id, "has an empty segment");
  return ok_result();
}

std::string server_name_for_ae_id(std::string_view ae_id) {
  if (validate_fqdn(ae_id)) return std::string(ae_id);
  // 160 bits of the hash: collision-free in practice, and one DNS label with the prefix (3 + 32 characters).
  constexpr std::size_t kHashedBytes = 20;
  constexpr std::string_view kBase32Alphabet = "abcdefghijklmnopqrstuvwxyz234567";
  const Bytes digest = sha256(ByteView::of(ae_id));
  std::string name = "ae-";
  std::uint32_t bits = 0;
  int bit_count = 0;
  for (std::size_t i = 0; i < kHashedBytes; ++i) {  // 20 bytes = 160 bits = 32 base32 digits, no padding
    bits = (bits << 8) | digest[i];
    bit_count += 8;
    while (bit_count >= 5) {
      bit_count -= 5;
      name.push_back(kBase32Alphabet[(bits >> bit_count) & 0x1f]);
    }
  }
  return name;
}

Result<void> validate_fqdn(std::string_view fqdn) {
  if (fqdn.empty() || fqdn.size() > kMaxFqdnLength) {
    return invalid("FQDN", fqdn,
                   "length " + std::to_string(fqdn.size()) + ", must be 1–" + std::to_string(kMaxFqdnLength));
  }
  std::size_t label_start = 0;
  for (std::size_t i = 0; i <= fqdn.size(); ++i) {
    if (i < fqdn.size() && fqdn[i] != '.') {
      const char c = fqdn[i];
      if (!is_alnum(c) && c != '-') {
        return invalid("FQDN", fqdn,
                       "character " + quote_for_error(fqdn.substr(i, 1)) + " at position " + std::to_string(i + 1) +
                           " is not allowed (letters, digits, '-' and '.' between labels)");
      }
      continue;
    }
    const std::string_view label = fqdn.substr(label_start, i - label_start);
    if (label.empty()) return invalid("FQDN", fqdn, "has an empty label");
    if (label.size() > kMaxLabelLength) {
      return invalid("FQDN", fqdn, "label longer than " + std::to_string(kMaxLabelLength) + " characters");
    }
    if (label.front() == '-' || label.back() == '-') {
      return invalid("FQDN", fqdn, "a label starts or ends with '-'");
    }
    label_start = i + 1;
  }
  return ok_result();
}

std::string canonical_fqdn(std::string_view fqdn) {
  std::string out(fqdn);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');  // ASCII only: not the locale's tolower
  }
  return out;
}

bool same_fqdn(std::string_view a, std::string_view b) { return canonical_fqdn(a) == canonical_fqdn(b); }

Result<std::string> issuer_fqdn_of(std::string_view key_id) {
  const std::size_t at = key_id.find('@');
  if (at == std::string_view::npos) {
    return invalid("key identifier", key_id, "has no '@' (expected <relative>@<issuer FQDN>)");
  }
  if (key_id.find('@', at + 1) != std::string_view::npos) {
    return invalid("key identifier", key_id, "has more than one '@'");
  }
  const std::string_view fqdn = key_id.substr(at + 1);
  if (auto ok = validate_fqdn(fqdn); !ok) {
    return invalid("key identifier", key_id, "issuer after '@' is not a valid FQDN: " + ok.error().message);
  }
  return std::string(fqdn);
}

Result<void> validate_kpm_id(std::string_view kpm_id) {
  auto issuer = issuer_fqdn_of(kpm_id);
  if (!issuer) return std::move(issuer).error();
  const std::string_view relative = kpm_id.substr(0, kpm_id.find('@'));
  if (relative.empty() || relative.size() > kMaxRelativeKpmIdLength) {
    return invalid("KpmID", kpm_id,
                   "relative part before '@' has length " + std::to_string(relative.size()) + ", must be 1–" +
                       std::to_string(kMaxRelativeKpmIdLength));
  }
  for (const char c : relative) {
    if (!is_alnum(c) && c != '.' && c != '_' && c != '-') {
      return invalid("KpmID", kpm_id, "relative part before '@' allows only letters, digits and . _ -");
    }
  }
  return ok_result();
}

Result<std::string> canonical_kpm_id(std::string_view kpm_id) {
  if (auto valid = validate_kpm_id(kpm_id); !valid) return std::move(valid).error();
  const std::size_t at = kpm_id.find('@');
  return std::string(kpm_id.substr(0, at + 1)) + canonical_fqdn(kpm_id.substr(at + 1));
}

bool key_id_names_mef(std::string_view key_id, std::string_view mef_fqdn) {
  auto issuer = issuer_fqdn_of(key_id);
  return issuer.ok() && same_fqdn(*issuer, mef_fqdn);
}

Result<std::string> canonical_serial(std::string_view serial_hex) {
  constexpr std::size_t kMaxSerialHexDigits = 40;  // RFC 5280 §4.1.2.2: 20 octets
  if (serial_hex.empty() || serial_hex.size() > kMaxSerialHexDigits) {
    return invalid("certificate serial", serial_hex,
                   "length " + std::to_string(serial_hex.size()) + ", must be 1–" +
                       std::to_string(kMaxSerialHexDigits) + " hex digits");
  }
  std::string digits;
  for (const char c : serial_hex) {
    if (c >= 'a' && c <= 'f') {
      digits.push_back(static_cast<char>(c - 'a' + 'A'));
    } else if ((c >= 'A' && c <= 'F') || (c >= '0' && c <= '9')) {
      digits.push_back(c);
    } else {
      return invalid("certificate serial", serial_hex, "is not hexadecimal (0-9, A-F, either case)");
    }
  }
  // The same integer has one spelling: leading zeros go (a DER sign octet included), then whole octets again.
  const std::size_t first = digits.find_first_not_of('0');
  digits.erase(0, first == std::string::npos ? digits.size() : first);
  if (digits.size() % 2 != 0 || digits.empty()) digits.insert(0, digits.empty() ? "00" : "0");
  return digits;
}

std::string KeId::text() const {
  return to_hex(ByteView(relative.data(), relative.size()), /*upper_case=*/true) + "@" + mef_fqdn;
}

Result<KeId> parse_ke_id(std::string_view ke_id) {
  auto issuer = issuer_fqdn_of(ke_id);
  if (!issuer) return std::move(issuer).error();
  const std::string_view hex = ke_id.substr(0, ke_id.find('@'));
  if (hex.size() != kRelativeKeIdHexLength) {
    return invalid("KeID", ke_id,
                   "part before '@' has " + std::to_string(hex.size()) + " characters, must be " +
                       std::to_string(kRelativeKeIdHexLength) + " hex digits (TS-0003 §10.3.4)");
  }
  auto bytes = from_hex(hex);
  if (!bytes) return invalid("KeID", ke_id, "part before '@' is not hexadecimal (0-9, A-F)");
  KeId parsed;
  std::copy(bytes->begin(), bytes->end(), parsed.relative.begin());
  parsed.mef_fqdn = canonical_fqdn(*issuer);
  return parsed;
}

}  // namespace dauth::crypto

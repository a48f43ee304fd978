// PKCS#11 keys through p11-kit (PKCS#11 v2.40, RFC 7512 URIs): finding a token and a key, logging in, signing with
// CKM_ECDSA and generating EC P-256 key pairs. A token key becomes a crypto::PrivateKey by an mbedTLS 2.28 key type
// of our own (pk_internal.h's mbedtls_pk_info_t, the structure 2.28 keeps for its own "alt" keys): mbedTLS sees an
// EC key whose public point it can write and whose signing goes to the token, so CSRs and certificates are written
// by mbedTLS and signed by the token without a second code path (docs/crypto.md §PKCS#11).
#include "dauth/crypto/token.hpp"

#include <mbedtls/asn1write.h>
#include <mbedtls/ecdsa.h>
#include <mbedtls/pk_internal.h>
#include <p11-kit/p11-kit.h>
#include <p11-kit/pkcs11.h>
#include <p11-kit/uri.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <vector>

#include "dauth/crypto/identifiers.hpp"
#include "x509_internal.hpp"

namespace dauth::crypto {

namespace {

// DER of the P-256 curve OID 1.2.840.10045.3.1.7 as CKA_EC_PARAMS carries it (PKCS#11 v2.40 §2.3.3).
constexpr std::uint8_t kP256Params[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
constexpr std::size_t kP256FieldBytes = 32;
constexpr std::size_t kGeneratedIdBytes = 16;  // CKA_ID of a key generated from a URI without id=

// The one place where a PKCS#11 return value becomes a dauth::Error.
Error pkcs11_error(CK_RV rv, const std::string& what) {
  Errc code = Errc::crypto;
  switch (rv) {
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LOCKED:
    case CKR_USER_PIN_NOT_INITIALIZED:
    case CKR_USER_NOT_LOGGED_IN:
      code = Errc::permission;
      break;
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SLOT_ID_INVALID:
    case CKR_DEVICE_REMOVED:
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID:
      code = Errc::not_found;
      break;
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_HOST_MEMORY:
    case CKR_GENERAL_ERROR:
    case CKR_FUNCTION_FAILED:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
      code = Errc::io;
      break;
    case CKR_MECHANISM_INVALID:
    case CKR_KEY_TYPE_INCONSISTENT:
    case CKR_FUNCTION_NOT_SUPPORTED:
    case CKR_TEMPLATE_INCONSISTENT:
      code = Errc::unsupported;
      break;
    default:
      break;
  }
  char hex[24];
  std::snprintf(hex, sizeof hex, "0x%lx", static_cast<unsigned long>(rv));
  return make_error(code, what + ": " + p11_kit_strerror(rv) + " (PKCS#11 " + hex + ")");
}

std::string padded_text(const unsigned char* text, std::size_t size) {
  return std::string(reinterpret_cast<const char*>(text), p11_kit_space_strlen(text, size));
}

// A parsed RFC 7512 URI (p11-kit's parser), freed with it.
struct ParsedUri {
  P11KitUri* uri = p11_kit_uri_new();
  ParsedUri() = default;
  ParsedUri(const ParsedUri&) = delete;
  ParsedUri& operator=(const ParsedUri&) = delete;
  ~ParsedUri() { p11_kit_uri_free(uri); }
};

Result<void> parse_uri(std::string_view text, ParsedUri& parsed) {
  // The PIN comes from a credential, never from configuration text (docs/crypto.md §PKCS#11). Checked on the text
  // first, case-insensitively, so that no message below quotes a URI holding one (even one p11-kit cannot parse).
  std::string lower(text);
  for (char& c : lower) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  if (lower.find("pin-value") != std::string::npos || lower.find("pin-source") != std::string::npos) {
    return make_error(Errc::invalid_argument,
                      "a pkcs11: URI with pin-value or pin-source is refused: the PIN comes from its credential");
  }
  if (!is_pkcs11_uri(text)) {
    return make_error(Errc::invalid_argument, quote_for_error(text) + " is not a pkcs11: URI (RFC 7512)");
  }
  const std::string uri(text);
  if (const int rc = p11_kit_uri_parse(uri.c_str(), P11_KIT_URI_FOR_ANY, parsed.uri); rc != P11_KIT_URI_OK) {
    return make_error(Errc::invalid_argument, quote_for_error(text) + ": " + p11_kit_uri_message(rc) + " (RFC 7512)");
  }
  if (p11_kit_uri_any_unrecognized(parsed.uri) != 0) {
    return make_error(Errc::invalid_argument,
                      quote_for_error(text) + " has an attribute dauth does not know (allowed: token, manufacturer, "
                                              "serial, model, library-*, slot-*, object, id, type)");
  }
  // The PIN comes from a credential, never from configuration text (docs/crypto.md §PKCS#11). The URI is not
  // quoted here: it holds the PIN.
  if (p11_kit_uri_get_pin_value(parsed.uri) != nullptr || p11_kit_uri_get_pin_source(parsed.uri) != nullptr) {
    return make_error(Errc::invalid_argument,
                      "a pkcs11: URI with pin-value or pin-source is refused: the PIN comes from its credential");
  }
  if (p11_kit_uri_get_module_path(parsed.uri) != nullptr || p11_kit_uri_get_module_name(parsed.uri) != nullptr) {
    return make_error(Errc::invalid_argument, quote_for_error(text) +
                                                  ": module-path and module-name are not used; the module is "
                                                  "configured once for every key (daemon.pkcs11_module)");
  }
  return ok_result();
}

const CK_ATTRIBUTE* find_attribute(const std::vector<CK_ATTRIBUTE>& attributes, CK_ATTRIBUTE_TYPE type) {
  for (const auto& attribute : attributes) {
    if (attribute.type == type) return &attribute;
  }
  return nullptr;
}

// The loaded modules: either p11-kit's registered list (released as a list) or one module by path, and the PIN
// that logs in to their tokens. Finalised when the Token and every key taken from it are gone.
struct Modules {
  CK_FUNCTION_LIST** registered = nullptr;
  CK_FUNCTION_LIST* single = nullptr;
  std::vector<CK_FUNCTION_LIST*> list;
  SecretBuffer pin;
  Modules() = default;
  Modules(const Modules&) = delete;
  Modules& operator=(const Modules&) = delete;
  ~Modules() {
    if (registered != nullptr) p11_kit_modules_finalize_and_release(registered);
    if (single != nullptr) {
      p11_kit_module_finalize(single);
      p11_kit_module_release(single);
    }
  }
};

// One logged-in session on one token. PKCS#11 sessions are not for concurrent use: every call holds `lock`.
struct TokenSession {
  CK_FUNCTION_LIST* module = nullptr;
  CK_SLOT_ID slot = 0;
  CK_SESSION_HANDLE handle = CK_INVALID_HANDLE;
  std::string name;  // "token 'label' (serial ...)" for messages
  std::mutex lock;
  std::shared_ptr<Modules> modules;  // initialised while the session lives

  TokenSession() = default;
  TokenSession(const TokenSession&) = delete;
  TokenSession& operator=(const TokenSession&) = delete;
  ~TokenSession() {
    if (handle != CK_INVALID_HANDLE) module->C_CloseSession(handle);
  }

  // Logs in with the PIN. Login state is per token and application: another session of this process (GnuTLS's)
  // may have logged in already.
  Result<void> log_in() {
    // C_Login takes a non-const pointer; the PIN is not written.
    const CK_RV rv = module->C_Login(handle, CKU_USER, const_cast<CK_UTF8CHAR*>(modules->pin.data()),
                                     static_cast<CK_ULONG>(modules->pin.size()));
    if (rv == CKR_OK || rv == CKR_USER_ALREADY_LOGGED_IN) return ok_result();
    if (rv == CKR_PIN_INCORRECT) {
      return make_error(Errc::permission, name + " refused the PIN (wrong PIN; the PIN is not logged)");
    }
    return pkcs11_error(rv, "logging in to " + name);
  }

  // Reads one variable-length attribute; Errc::not_found if the object does not have it.
  Result<Bytes> attribute(CK_OBJECT_HANDLE object, CK_ATTRIBUTE_TYPE type, const std::string& what) {
    CK_ATTRIBUTE query{type, nullptr, 0};
    CK_RV rv = module->C_GetAttributeValue(handle, object, &query, 1);
    if (rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_ATTRIBUTE_SENSITIVE ||
        query.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
      return make_error(Errc::not_found, what + ": the token gives no such attribute");
    }
    if (rv != CKR_OK) return pkcs11_error(rv, what);
    Bytes value(query.ulValueLen);
    query.pValue = value.data();
    if ((rv = module->C_GetAttributeValue(handle, object, &query, 1)) != CKR_OK) return pkcs11_error(rv, what);
    value.resize(query.ulValueLen);
    return value;
  }

  Result<std::vector<CK_OBJECT_HANDLE>> find(std::vector<CK_ATTRIBUTE> search, const std::string& what) {
    CK_RV rv = module->C_FindObjectsInit(handle, search.data(), static_cast<CK_ULONG>(search.size()));
    if (rv != CKR_OK) return pkcs11_error(rv, what);
    std::vector<CK_OBJECT_HANDLE> found;
    CK_OBJECT_HANDLE batch[16];
    CK_ULONG count = 0;
    while ((rv = module->C_FindObjects(handle, batch, 16, &count)) == CKR_OK && count > 0) {
      found.insert(found.end(), batch, batch + count);
    }
    module->C_FindObjectsFinal(handle);
    if (rv != CKR_OK) return pkcs11_error(rv, what);
    return found;
  }
};

}  // namespace

// ========================================================================================== modules and tokens ====

// What a key asks of the token it names.
enum class KeyWanted {
  existing,           // the key must be there
  new_key,            // the key must not be there yet: generate it
  existing_or_new,    // generate it when it is not there
};

struct Token::State {
  std::shared_ptr<Modules> modules;
  std::string description;  // "PKCS#11 module /usr/lib/...so" or "p11-kit's registered PKCS#11 modules"
  std::mutex lock;          // guards sessions
  std::vector<std::shared_ptr<TokenSession>> sessions;

  // The session of the one token the URI names, opened and logged in when first asked for.
  Result<std::shared_ptr<TokenSession>> session_for(ParsedUri& parsed, std::string_view uri);
  Result<PrivateKey> key(std::string_view uri, KeyWanted wanted);
};

bool is_pkcs11_uri(std::string_view text) {
  constexpr std::string_view kScheme = "pkcs11:";
  if (text.size() < kScheme.size()) return false;
  for (std::size_t i = 0; i < kScheme.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(text[i])) != kScheme[i]) return false;
  }
  return true;
}

Token::Token(std::shared_ptr<State> state) : state_(std::move(state)) {}
Token::Token(Token&&) noexcept = default;
Token& Token::operator=(Token&&) noexcept = default;
Token::~Token() = default;

Result<Token> Token::open(const TokenOptions& options, SecretBuffer pin) {
  auto state = std::make_shared<State>();
  state->modules = std::make_shared<Modules>();
  Modules& modules = *state->modules;
  modules.pin = std::move(pin);
  if (options.module_path.empty()) {
    state->description = "p11-kit's registered PKCS#11 modules";
    // Managed by p11-kit (flags 0): GnuTLS in the same process initialises its own instances independently.
    modules.registered = p11_kit_modules_load_and_initialize(0);
    if (modules.registered == nullptr) {
      const char* message = p11_kit_message();
      return make_error(Errc::io, "loading " + state->description + ": " + (message ? message : "failed"));
    }
    for (CK_FUNCTION_LIST** m = modules.registered; *m != nullptr; ++m) modules.list.push_back(*m);
  } else {
    state->description = "PKCS#11 module " + options.module_path;
    std::error_code error;
    if (!std::filesystem::exists(options.module_path, error)) {
      return make_error(Errc::not_found, state->description + ": no such file");
    }
    modules.single = p11_kit_module_load(options.module_path.c_str(), 0);
    if (modules.single == nullptr) {
      const char* message = p11_kit_message();
      return make_error(Errc::io, "loading " + state->description + ": " + (message ? message : "failed"));
    }
    if (const CK_RV rv = p11_kit_module_initialize(modules.single); rv != CKR_OK) {
      p11_kit_module_release(modules.single);
      modules.single = nullptr;
      return pkcs11_error(rv, "initialising " + state->description);
    }
    modules.list.push_back(modules.single);
  }
  return Token(std::move(state));
}

Result<std::shared_ptr<TokenSession>> Token::State::session_for(ParsedUri& parsed, std::string_view uri) {
  std::lock_guard<std::mutex> guard(lock);
  struct Candidate {
    CK_FUNCTION_LIST* module;
    CK_SLOT_ID slot;
    std::string name;
  };
  std::vector<Candidate> matching;
  std::vector<std::string> present;
  for (CK_FUNCTION_LIST* module : modules->list) {
    CK_INFO module_info;
    if (module->C_GetInfo(&module_info) != CKR_OK) continue;
    if (p11_kit_uri_match_module_info(parsed.uri, &module_info) == 0) continue;
    CK_ULONG count = 0;
    if (module->C_GetSlotList(CK_TRUE, nullptr, &count) != CKR_OK || count == 0) continue;
    std::vector<CK_SLOT_ID> slots(count);
    if (module->C_GetSlotList(CK_TRUE, slots.data(), &count) != CKR_OK) continue;
    slots.resize(count);
    for (CK_SLOT_ID slot : slots) {
      CK_TOKEN_INFO info;
      if (module->C_GetTokenInfo(slot, &info) != CKR_OK) continue;
      if ((info.flags & CKF_TOKEN_INITIALIZED) == 0) continue;
      const std::string name = "token '" + padded_text(info.label, sizeof info.label) + "' (serial " +
                               padded_text(info.serialNumber, sizeof info.serialNumber) + ")";
      present.push_back(name);
      CK_SLOT_INFO slot_info;
      if (module->C_GetSlotInfo(slot, &slot_info) == CKR_OK &&
          p11_kit_uri_match_slot_info(parsed.uri, &slot_info) == 0) {
        continue;
      }
      if (p11_kit_uri_match_token_info(parsed.uri, &info) != 0) matching.push_back({module, slot, name});
    }
  }
  if (matching.empty()) {
    std::string listed;
    for (const auto& name : present) listed += (listed.empty() ? "" : ", ") + name;
    return make_error(Errc::not_found, "no token of " + description + " matches " + quote_for_error(uri) +
                                           " (tokens present: " + (listed.empty() ? "none" : listed) + ")");
  }
  if (matching.size() > 1) {
    return make_error(Errc::exists, quote_for_error(uri) + " matches " + std::to_string(matching.size()) +
                                        " tokens (" + matching[0].name + ", " + matching[1].name +
                                        "): ambiguous, add serial= to the URI");
  }
  const Candidate& chosen = matching.front();
  for (const auto& session : sessions) {
    if (session->module == chosen.module && session->slot == chosen.slot) return session;
  }
  auto session = std::make_shared<TokenSession>();
  session->module = chosen.module;
  session->slot = chosen.slot;
  session->name = chosen.name;
  session->modules = modules;
  if (const CK_RV rv = chosen.module->C_OpenSession(chosen.slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr,
                                                    nullptr, &session->handle);
      rv != CKR_OK) {
    session->handle = CK_INVALID_HANDLE;
    return pkcs11_error(rv, "opening a session on " + chosen.name);
  }
  if (auto ok = session->log_in(); !ok) return std::move(ok).error();
  sessions.push_back(session);
  return session;
}

// ======================================================================================== the token key type ====

namespace {

// The context of an mbedTLS key whose private half is in a token. The key pair comes first, so that mbedTLS's
// mbedtls_pk_ec() (a cast of the context) finds the curve and public point there; its private value stays zero.
struct TokenKeyContext {
  mbedtls_ecp_keypair keypair;
  std::shared_ptr<TokenSession> session;
  CK_OBJECT_HANDLE object = CK_INVALID_HANDLE;
};

// The token's raw r|s (PKCS#11 v2.40 §2.3.1: two integers of the order's size) as the DER Ecdsa-Sig-Value X.509
// carries (RFC 3279 §2.2.3): SEQUENCE { INTEGER r, INTEGER s }.
int raw_signature_to_der(const std::uint8_t* raw, std::size_t raw_size, unsigned char* out, std::size_t* out_size) {
  if (raw_size != 2 * kP256FieldBytes) return MBEDTLS_ERR_PK_BAD_INPUT_DATA;
  detail::Mpi r;
  detail::Mpi s;
  int rc = mbedtls_mpi_read_binary(r.get(), raw, kP256FieldBytes);
  if (rc == 0) rc = mbedtls_mpi_read_binary(s.get(), raw + kP256FieldBytes, kP256FieldBytes);
  if (rc != 0) return rc;
  unsigned char buffer[MBEDTLS_ECDSA_MAX_LEN];
  unsigned char* p = buffer + sizeof buffer;
  std::size_t length = 0;
  int n = mbedtls_asn1_write_mpi(&p, buffer, s.get());
  if (n < 0) return n;
  length += static_cast<std::size_t>(n);
  if ((n = mbedtls_asn1_write_mpi(&p, buffer, r.get())) < 0) return n;
  length += static_cast<std::size_t>(n);
  if ((n = mbedtls_asn1_write_len(&p, buffer, length)) < 0) return n;
  length += static_cast<std::size_t>(n);
  if ((n = mbedtls_asn1_write_tag(&p, buffer, MBEDTLS_ASN1_CONSTRUCTED | MBEDTLS_ASN1_SEQUENCE)) < 0) return n;
  length += static_cast<std::size_t>(n);
  std::memcpy(out, p, length);
  *out_size = length;
  return 0;
}

std::size_t token_key_bitlen(const void* context) {
  return static_cast<const TokenKeyContext*>(context)->keypair.grp.pbits;
}

int token_key_can_do(mbedtls_pk_type_t type) {
  return type == MBEDTLS_PK_ECKEY || type == MBEDTLS_PK_ECDSA ? 1 : 0;
}

int token_key_verify(void* context, mbedtls_md_type_t /*md*/, const unsigned char* hash, std::size_t hash_size,
                     const unsigned char* signature, std::size_t signature_size) {
  auto* key = static_cast<TokenKeyContext*>(context);
  const int rc = mbedtls_ecdsa_read_signature(&key->keypair, hash, hash_size, signature, signature_size);
  return rc == MBEDTLS_ERR_ECP_SIG_LEN_MISMATCH ? MBEDTLS_ERR_PK_SIG_LEN_MISMATCH : rc;
}

// mbedTLS hashed what it signs (a TBSCertificate, a CertificationRequestInfo); the token signs the digest with
// CKM_ECDSA. mbedTLS 2.28's sign callback returns an int only, so the token's reason is lost here; the caller's
// error says which key failed, and a token refusal shows as MBEDTLS_ERR_PK_HW_ACCEL_FAILED.
int token_key_sign(void* context, mbedtls_md_type_t /*md*/, const unsigned char* hash, std::size_t hash_size,
                   unsigned char* signature, std::size_t* signature_size,
                   int (* /*f_rng*/)(void*, unsigned char*, std::size_t), void* /*p_rng*/) {
  auto* key = static_cast<TokenKeyContext*>(context);
  TokenSession& session = *key->session;
  std::lock_guard<std::mutex> guard(session.lock);
  std::uint8_t raw[2 * kP256FieldBytes];
  CK_MECHANISM mechanism{CKM_ECDSA, nullptr, 0};
  CK_RV rv = CKR_OK;
  // Once more after logging in again: the token forgets a login when every session of the application closed.
  for (int attempt = 0; attempt < 2; ++attempt) {
    CK_ULONG raw_size = sizeof raw;
    rv = session.module->C_SignInit(session.handle, &mechanism, key->object);
    if (rv == CKR_OK) {
      rv = session.module->C_Sign(session.handle, const_cast<CK_BYTE*>(hash), static_cast<CK_ULONG>(hash_size), raw,
                                  &raw_size);
    }
    if (rv == CKR_OK) return raw_signature_to_der(raw, raw_size, signature, signature_size);
    if (rv != CKR_USER_NOT_LOGGED_IN || !session.log_in()) break;
  }
  return MBEDTLS_ERR_PK_HW_ACCEL_FAILED;
}

void* token_key_alloc() {
  auto* key = new (std::nothrow) TokenKeyContext();
  if (key != nullptr) mbedtls_ecp_keypair_init(&key->keypair);
  return key;
}

void token_key_free(void* context) {
  auto* key = static_cast<TokenKeyContext*>(context);
  mbedtls_ecp_keypair_free(&key->keypair);
  delete key;
}

const mbedtls_pk_info_t& token_key_info() {
  static const mbedtls_pk_info_t info = [] {
    mbedtls_pk_info_t i{};
    i.type = MBEDTLS_PK_ECKEY;  // mbedTLS's writers then treat the context as mbedtls_ecp_keypair
    i.name = "EC (PKCS#11 token)";
    i.get_bitlen = token_key_bitlen;
    i.can_do = token_key_can_do;
    i.verify_func = token_key_verify;
    i.sign_func = token_key_sign;
    i.ctx_alloc_func = token_key_alloc;
    i.ctx_free_func = token_key_free;
    return i;
  }();
  return info;
}

// The public point from CKA_EC_POINT: DER OCTET STRING around the uncompressed point (PKCS#11 v2.40 §2.3.3),
// or the bare point, which some modules return.
Result<void> read_public_point(const Bytes& ec_point, mbedtls_ecp_keypair& keypair, const std::string& what) {
  ByteView point(ec_point);
  if (ec_point.size() == 2 + 1 + 2 * kP256FieldBytes && ec_point[0] == 0x04 && ec_point[1] == ec_point.size() - 2) {
    point = ByteView(ec_point.data() + 2, ec_point.size() - 2);
  }
  int rc = mbedtls_ecp_group_load(&keypair.grp, MBEDTLS_ECP_DP_SECP256R1);
  if (rc == 0) rc = mbedtls_ecp_point_read_binary(&keypair.grp, &keypair.Q, point.data, point.size);
  if (rc == 0) rc = mbedtls_ecp_check_pubkey(&keypair.grp, &keypair.Q);
  if (rc != 0) return detail::mbedtls_error(rc, what + ": CKA_EC_POINT is not a P-256 point");
  return ok_result();
}

std::string label_or_id(const std::vector<CK_ATTRIBUTE>& attributes) {
  if (const CK_ATTRIBUTE* label = find_attribute(attributes, CKA_LABEL)) {
    return "'" + std::string(static_cast<const char*>(label->pValue), label->ulValueLen) + "'";
  }
  if (const CK_ATTRIBUTE* id = find_attribute(attributes, CKA_ID)) {
    return "id " + to_hex(ByteView(static_cast<const std::uint8_t*>(id->pValue), id->ulValueLen));
  }
  return "(any)";
}

}  // namespace

// ===================================================================================================== keys ====

namespace {

// The URI's object attributes as a search for objects of one class; error when the URI names another class or
// names no object at all (a URI with token attributes only would match every key of the token).
Result<void> object_search(ParsedUri& parsed, std::string_view uri, CK_OBJECT_CLASS& klass,
                           std::vector<CK_ATTRIBUTE>& search) {
  search.assign(1, CK_ATTRIBUTE{CKA_CLASS, &klass, sizeof klass});
  bool named = false;
  CK_ULONG count = 0;
  const CK_ATTRIBUTE* attributes = p11_kit_uri_get_attributes(parsed.uri, &count);
  for (CK_ULONG i = 0; i < count; ++i) {
    const CK_ATTRIBUTE& attribute = attributes[i];
    if (attribute.type == CKA_CLASS) {
      CK_OBJECT_CLASS wanted = 0;
      std::memcpy(&wanted, attribute.pValue, std::min<std::size_t>(attribute.ulValueLen, sizeof wanted));
      if (wanted != CKO_PRIVATE_KEY) {
        return make_error(Errc::invalid_argument, quote_for_error(uri) + ": type= must be 'private' for a key");
      }
      continue;
    }
    named = named || attribute.type == CKA_LABEL || attribute.type == CKA_ID;
    search.push_back(attribute);
  }
  if (!named) {
    return make_error(Errc::invalid_argument, quote_for_error(uri) + " names no key: add object=<label> or id=<id>");
  }
  return ok_result();
}

}  // namespace

namespace {

// Generates an EC P-256 key pair with the search's label and id (a random id when the URI has none).
Result<void> generate_pair(TokenSession& session, const std::vector<CK_ATTRIBUTE>& search, const std::string& where) {
  const CK_ATTRIBUTE* label = find_attribute(search, CKA_LABEL);
  const CK_ATTRIBUTE* id = find_attribute(search, CKA_ID);
  Bytes generated_id;
  if (id == nullptr) {
    generated_id.resize(kGeneratedIdBytes);
    random_bytes(generated_id.data(), generated_id.size());
  }
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_KEY_TYPE ec = CKK_EC;
  std::vector<CK_ATTRIBUTE> public_template{
      {CKA_CLASS, &public_class, sizeof public_class},
      {CKA_KEY_TYPE, &ec, sizeof ec},
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_VERIFY, &yes, sizeof yes},
      {CKA_EC_PARAMS, const_cast<std::uint8_t*>(kP256Params), sizeof kP256Params},
  };
  // PKCS#11 v2.40 §4.9: sensitive and not extractable, so that no call returns the private value, wrapped or not;
  // persistent (CKA_TOKEN) so that it survives this process.
  std::vector<CK_ATTRIBUTE> private_template{
      {CKA_CLASS, &private_class, sizeof private_class},
      {CKA_KEY_TYPE, &ec, sizeof ec},
      {CKA_TOKEN, &yes, sizeof yes},
      {CKA_PRIVATE, &yes, sizeof yes},
      {CKA_SENSITIVE, &yes, sizeof yes},
      {CKA_EXTRACTABLE, &no, sizeof no},
      {CKA_SIGN, &yes, sizeof yes},
  };
  for (auto* object_template : {&public_template, &private_template}) {
    if (label != nullptr) object_template->push_back(*label);
    object_template->push_back(id != nullptr ? *id : CK_ATTRIBUTE{CKA_ID, generated_id.data(), generated_id.size()});
  }
  CK_MECHANISM mechanism{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE public_key = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
  if (const CK_RV rv = session.module->C_GenerateKeyPair(
          session.handle, &mechanism, public_template.data(), static_cast<CK_ULONG>(public_template.size()),
          private_template.data(), static_cast<CK_ULONG>(private_template.size()), &public_key, &private_key);
      rv != CKR_OK) {
    return pkcs11_error(rv, "generating the P-256 " + where);
  }
  return ok_result();
}

// The public point of a private key object, which has none itself (PKCS#11 v2.40 §2.3.4): from its public key
// object, found by CKA_ID as RFC 7512 tools pair them, or by label when the key has no id.
Result<Bytes> public_point_of(TokenSession& session, CK_OBJECT_HANDLE object, const std::string& where) {
  auto id = session.attribute(object, CKA_ID, "reading the id of " + where);
  auto label = session.attribute(object, CKA_LABEL, "reading the label of " + where);
  CK_OBJECT_CLASS public_class = CKO_PUBLIC_KEY;
  std::vector<CK_ATTRIBUTE> pair{{CKA_CLASS, &public_class, sizeof public_class}};
  const bool by_id = id && !id->empty();
  if (by_id) {
    pair.push_back({CKA_ID, id->data(), id->size()});
  } else if (label && !label->empty()) {
    pair.push_back({CKA_LABEL, label->data(), label->size()});
  } else {
    return make_error(Errc::not_found, where + " has neither id nor label: its public key cannot be found");
  }
  auto publics = session.find(pair, "looking up the public key of " + where);
  if (!publics) return std::move(publics).error();
  if (publics->empty()) {
    return make_error(Errc::not_found, where + " has no public key object with the same " +
                                           (by_id ? "id" : "label") + " in the token");
  }
  return session.attribute(publics->front(), CKA_EC_POINT, "reading the public point of " + where);
}

}  // namespace

Result<PrivateKey> Token::State::key(std::string_view uri, KeyWanted wanted) {
  ParsedUri parsed;
  if (auto ok = parse_uri(uri, parsed); !ok) return std::move(ok).error();
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  std::vector<CK_ATTRIBUTE> search;
  if (auto ok = object_search(parsed, uri, private_class, search); !ok) return std::move(ok).error();
  auto session_or = session_for(parsed, uri);
  if (!session_or) return std::move(session_or).error();
  std::shared_ptr<TokenSession> session = std::move(session_or).value();

  std::lock_guard<std::mutex> guard(session->lock);
  const std::string where = "key " + quote_for_error(uri) + " in " + session->name;
  auto found = session->find(search, "looking up " + where);
  if (!found) return std::move(found).error();
  if (found->size() > 1) {
    return make_error(Errc::exists, quote_for_error(uri) + " matches " + std::to_string(found->size()) +
                                        " private keys in " + session->name + ": ambiguous, add id= to the URI");
  }
  if (!found->empty() && wanted == KeyWanted::new_key) {
    return make_error(Errc::exists, where + " exists already: not generated again");
  }
  if (found->empty()) {
    if (wanted == KeyWanted::existing) {
      return make_error(Errc::not_found, "no private key " + label_or_id(search) + " in " + session->name);
    }
    if (auto ok = generate_pair(*session, search, where); !ok) return std::move(ok).error();
    found = session->find(search, "looking up the generated " + where);
    if (!found) return std::move(found).error();
    if (found->size() != 1) return make_error(Errc::internal, where + ": generated, but not found");
  }
  const CK_OBJECT_HANDLE object = found->front();

  CK_KEY_TYPE key_type = 0;
  CK_ATTRIBUTE type_query{CKA_KEY_TYPE, &key_type, sizeof key_type};
  if (const CK_RV rv = session->module->C_GetAttributeValue(session->handle, object, &type_query, 1); rv != CKR_OK) {
    return pkcs11_error(rv, "reading the type of " + where);
  }
  auto params = session->attribute(object, CKA_EC_PARAMS, "reading the curve of " + where);
  if (key_type != CKK_EC || !params ||
      !std::equal(params->begin(), params->end(), std::begin(kP256Params), std::end(kP256Params))) {
    return make_error(Errc::unsupported, where + " is not an EC P-256 key (TS-0003 §10.1.1.1 allows only P-256)");
  }
  auto ec_point = public_point_of(*session, object, where);
  if (!ec_point) return std::move(ec_point).error();

  auto impl = std::make_unique<PrivateKey::Impl>();
  if (const int rc = mbedtls_pk_setup(impl->pk.get(), &token_key_info()); rc != 0) {
    return detail::mbedtls_error(rc, "setting up " + where);
  }
  auto* context = static_cast<TokenKeyContext*>(impl->pk->pk_ctx);
  if (auto ok = read_public_point(*ec_point, context->keypair, where); !ok) return std::move(ok).error();
  context->session = std::move(session);
  context->object = object;
  impl->token_uri = std::string(uri);
  return PrivateKey(std::move(impl));
}

Result<PrivateKey> Token::private_key(std::string_view uri) const { return state_->key(uri, KeyWanted::existing); }
Result<PrivateKey> Token::generate_p256(std::string_view uri) const { return state_->key(uri, KeyWanted::new_key); }
Result<PrivateKey> Token::private_key_or_generate(std::string_view uri) const {
  return state_->key(uri, KeyWanted::existing_or_new);
}

}  // namespace dauth::crypto

// Private keys in a PKCS#11 token, through p11-kit (Debian's mbedTLS 2.28 has no PKCS#11): docs/crypto.md §PKCS#11.
//
// A Token is the process's handle on the PKCS#11 modules (p11-kit's registered modules, as GnuTLS uses them, or one
// module by path) and on the user PIN they are logged in with. Keys are named by RFC 7512 `pkcs11:` URIs: the
// URI's token attributes (token, manufacturer, serial, model) choose the token, its object attributes (object,
// id, type) choose the key. A key taken from a Token is an ordinary crypto::PrivateKey that signs inside the token
// (CKM_ECDSA over the SHA-256 digest mbedTLS computes): CSRs, certificates and CAs work with it unchanged, and
// its private half never enters this process.
//
// Opened once (at start or reload) and shared; keys keep what they need alive, so a key outlives the Token it came
// from. Thread-safe: each token's session is used under its own lock.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "dauth/crypto/x509.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto {

// True when text is meant as a PKCS#11 URI (starts with "pkcs11:", case-insensitively as RFC 3986 schemes are):
// the one test of "is this key setting a path or a token key" for every module.
bool is_pkcs11_uri(std::string_view text);

struct TokenOptions {
  // A PKCS#11 module to load (e.g. /usr/lib/softhsm/libsofthsm2.so); empty: every module p11-kit has registered.
  std::string module_path;
};

class Token {
 public:
  // Loads and initialises the module(s). The PIN is kept (guarded memory) to log in to each token a URI names,
  // when it is first used. Errors: Errc::not_found (module path missing), Errc::io (the module does not load or
  // initialise), with p11-kit's message.
  static Result<Token> open(const TokenOptions& options, SecretBuffer pin);

  Token(Token&&) noexcept;
  Token& operator=(Token&&) noexcept;
  ~Token();

  // The EC P-256 private key the URI names, which must match exactly one private key object of exactly one token;
  // its public key is read from the public key object (or certificate) with the same CKA_ID, else the same label.
  // Errors name the URI and the token, never the PIN:
  //   Errc::invalid_argument  not a pkcs11: URI, an attribute dauth does not know, a PIN inside the URI (the PIN
  //                           comes from the credential), no object or id attribute;
  //   Errc::not_found         no token matches (the message lists the tokens present), or no such key in it;
  //   Errc::permission        the token refused the PIN (wrong, locked or expired);
  //   Errc::unsupported       the key is not EC P-256;
  //   Errc::exists            the URI matches more than one token or key (ambiguous: add serial= or id=).
  Result<PrivateKey> private_key(std::string_view uri) const;

  // Generates an EC P-256 key pair in the token the URI names: label = the URI's object, CKA_ID = its id (16 random
  // bytes when the URI has none), CKA_TOKEN (persistent), CKA_PRIVATE, CKA_SENSITIVE and not CKA_EXTRACTABLE: the
  // private value can never be read out of the token. Errc::exists when the URI already names a private key.
  // Other errors as private_key().
  Result<PrivateKey> generate_p256(std::string_view uri) const;

  // private_key(uri) when the token holds that key, else generate_p256(uri): a key generated on first use.
  Result<PrivateKey> private_key_or_generate(std::string_view uri) const;

  struct State;  // the modules, the PIN and one logged-in session per token (token.cpp)

 private:
  explicit Token(std::shared_ptr<State> state);
  std::shared_ptr<State> state_;
};

}  // namespace dauth::crypto

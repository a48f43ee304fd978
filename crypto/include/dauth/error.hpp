// dauth::Error and dauth::Result<T>: the one error type at every module edge (docs/conventions.md §15).
//
// Third-party error codes (mbedTLS, libsodium, libcoap, GnuTLS, OpenSSL) are mapped into an Errc in exactly one
// function per module; the message says what failed, where, with which value, and what is allowed.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace dauth {

enum class Errc : std::uint8_t {
  invalid_argument,   // a value outside what is allowed (identifier syntax, length, range)
  parse,              // malformed input: DER, PEM, CBOR, TOML, a key-store file
  crypto,             // a cryptographic primitive failed or a signature/MAC did not verify
  io,                 // a file or socket operation failed
  corrupt,            // stored data is torn, truncated or tampered with
  permission,         // a file mode or owner is too open, or an operation is not allowed
  not_found,          // no such record, identity, file or peer
  exists,             // the record or resource already exists
  expired,            // a credential or certificate is outside its validity
  unauthenticated,    // the peer could not be authenticated
  denied,             // authenticated, but the policy refuses
  unsupported,        // the backend or build cannot do this
  limit,              // a configured cap (sessions, handshakes, size) was reached
  timeout,            // no answer in time
  internal,           // a bug or an impossible state; always worth a report
};
inline constexpr std::size_t kErrcCount = 15;

// Stable lower-case word for logs, the control protocol and --json output; "unknown" for a value outside Errc.
constexpr std::string_view to_string(Errc code) noexcept {
  switch (code) {
    case Errc::invalid_argument: return "invalid_argument";
    case Errc::parse: return "parse";
    case Errc::crypto: return "crypto";
    case Errc::io: return "io";
    case Errc::corrupt: return "corrupt";
    case Errc::permission: return "permission";
    case Errc::not_found: return "not_found";
    case Errc::exists: return "exists";
    case Errc::expired: return "expired";
    case Errc::unauthenticated: return "unauthenticated";
    case Errc::denied: return "denied";
    case Errc::unsupported: return "unsupported";
    case Errc::limit: return "limit";
    case Errc::timeout: return "timeout";
    case Errc::internal: return "internal";
  }
  return "unknown";
}

struct Error {
  Errc code;
  std::string message;

  // "<code word>: <message>"
  std::string to_string() const;
};

inline Error make_error(Errc code, std::string message) { return Error{code, std::move(message)}; }

// Either a value or an Error. [[nodiscard]] so that an ignored failure is a compiler warning.
template <class T>
class [[nodiscard]] Result {
  static_assert(!std::is_same_v<std::decay_t<T>, Error>, "Result<Error> is ambiguous");

 public:
  Result(T value) : state_(std::in_place_index<0>, std::move(value)) {}         // NOLINT: implicit by design
  Result(Error error) : state_(std::in_place_index<1>, std::move(error)) {}     // NOLINT: implicit by design

  bool ok() const noexcept { return state_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { return std::get<0>(state_); }
  const T& value() const& { return std::get<0>(state_); }
  T&& value() && { return std::get<0>(std::move(state_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& { return std::get<1>(state_); }
  Error&& error() && { return std::get<1>(std::move(state_)); }

 private:
  std::variant<T, Error> state_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), failed_(true) {}  // NOLINT: implicit by design

  bool ok() const noexcept { return !failed_; }
  explicit operator bool() const noexcept { return ok(); }
  const Error& error() const& { return error_; }
  Error&& error() && { return std::move(error_); }

 private:
  Error error_{Errc::internal, {}};
  bool failed_ = false;
};

inline Result<void> ok_result() { return {}; }

}  // namespace dauth

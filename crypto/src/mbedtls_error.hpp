// The one place where an mbedTLS return code becomes a dauth::Error (docs/conventions.md §15). Internal to
// dauth_crypto: no other module sees mbedTLS codes.
#pragma once

#include <string_view>

#include "dauth/error.hpp"

namespace dauth::crypto::detail {

// `what` says which operation failed on which value; the mbedTLS text (mbedtls_strerror) and the code are appended.
// The message never contains the operation's input bytes.
Error mbedtls_error(int code, std::string_view what);

}  // namespace dauth::crypto::detail

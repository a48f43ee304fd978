// Reading hex key files into guarded memory (internal to the daemon module; dauthctl uses it too).
//
// Kpm files (16–64 bytes): the file checks are crypto::read_key_file's (regular file, no group/world bits); this
// adds the content rule (hex with one optional trailing newline). read_hex_key_fd() applies the same rules to a
// descriptor received over the control socket (docs/control-protocol.md "Passing keys").
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::daemon::detail {

// Kpm sizes: at least 128 bits (TS-0003 pre-provisioned keys), at most what a PSK identity's key may be.
inline constexpr std::size_t kMinKpmBytes = 16;
inline constexpr std::size_t kMaxKpmBytes = 64;

// The content rule: text[0, length) must be hex of min_bytes..max_bytes with at most one trailing newline. `what`
// names the source in errors, never the content.
Result<SecretBuffer> parse_hex_key(const SecretBuffer& text, std::size_t length, const std::string& what,
                                   std::size_t min_bytes, std::size_t max_bytes);

// A key file holding min_bytes..max_bytes of key as hex. Errors name the file and the reason, never the content.
Result<SecretBuffer> read_hex_key_file(const std::filesystem::path& path, std::size_t min_bytes,
                                       std::size_t max_bytes);

// The same content rule for an open descriptor received over the control socket, named `what` in errors
// ("credentials.add: key_fd 0"); which descriptors may be read, and how, is crypto::read_key_fd's (key_file.hpp).
Result<SecretBuffer> read_hex_key_fd(int fd, const std::string& what, std::size_t min_bytes, std::size_t max_bytes);

}  // namespace dauth::daemon::detail

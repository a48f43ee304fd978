// Reading hex key files into guarded memory (internal to the daemon module).
//
// Kpm files (16–64 bytes): the file checks are crypto::read_key_file's (regular file, no group/world bits); this
// adds the content rule (hex with one optional trailing newline).
#pragma once

#include <cstddef>
#include <filesystem>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::daemon::detail {

// A key file holding min_bytes..max_bytes of key as hex. Errors name the file and the reason, never the content.
Result<SecretBuffer> read_hex_key_file(const std::filesystem::path& path, std::size_t min_bytes,
                                       std::size_t max_bytes);

}  // namespace dauth::daemon::detail

// Reading hex key files into guarded memory (internal to the daemon module).
//
// Kpm files (16–64 bytes): the same rules as crypto::load_master_key_file() (regular file, no group/world bits,
// hex with one optional trailing newline), which reads the master key (config.cpp load_secrets()).
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

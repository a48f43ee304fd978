// Reading hex key files into guarded memory (internal to the daemon module).
//
// Stop-gap: crypto::load_master_key_file() is declared in keystore.hpp but not implemented yet; this reader
// applies the same rules (regular file, no group/world bits, hex with one optional trailing newline) to the
// master key and to Kpm files. Once crypto implements its loader, master keys should go through it.
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

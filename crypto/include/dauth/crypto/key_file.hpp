// Reading a key file into guarded memory: the one place that decides whether a key file is private enough to use
// (docs/conventions.md §8). The master key loader and PrivateKey::load_file use it; other modules reading key files
// should too.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string_view>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto {

// Reads at most max_size + 1 bytes of path, so that a longer file shows as longer (size() > max_size) without being
// read whole; the caller decides what a valid content is. Refuses, naming the path, and never the content:
//   Errc::not_found   no such file;
//   Errc::permission  not a regular file (directory, FIFO, device), or any group/other permission bit set (the
//                     message names the mode, e.g. "mode 0644", and says "chmod 600"), or open() was denied;
//   Errc::io          any other open/stat/read failure.
// `what` names the file in messages ("master key file", "private key file").
Result<SecretBuffer> read_key_file(const std::filesystem::path& path, std::string_view what, std::size_t max_size);

// The same for a descriptor someone else opened (a key passed over dauthd's control socket), named `what`:
//   regular file  the same mode rule (the policy does not depend on who opened it), read from offset 0 (pread);
//   pipe / FIFO   content only (a pipe has no meaningful mode), read without blocking: its writer must have
//                 written the whole key and closed its end, else Errc::invalid_argument;
//   anything else (socket, terminal, device, directory) Errc::permission, unread.
// Never blocks; the descriptor stays open (its owner closes it).
Result<SecretBuffer> read_key_fd(int fd, std::string_view what, std::size_t max_size);

}  // namespace dauth::crypto

// Reading a key file into guarded memory: the one place that decides whether a key file is private enough to use
// (docs/conventions.md §8). The master key loader and PrivateKey::load_file use it; other modules reading key files
// should too.
// Writing one: the one way a key file (master key, key-store snapshot and journal, dauthctl genpsk) reaches disk.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"
#include "dauth/unique_fd.hpp"

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

// What writing a key file does when its name already exists.
enum class IfExists {
  replace,  // the new file takes the name (the key store's snapshot and journal)
  refuse,   // Errc::exists, the old file untouched, even if it appeared while the new one was written
};

// Writes content as the file `name` in the directory open as dir_fd (`dir` names it in messages) so that a crash
// leaves the old file or the whole new one, never a part of it: a temporary "<name>.tmp" in the same directory,
// created 0600 whatever the umask (O_EXCL, O_NOFOLLOW), written, fsync'ed, then renamed over name (replace) or
// linked to it (refuse), then the directory fsync'ed so that the name is durable. Returns the new file, open
// read-write. The temporary is removed on every failure. One writer per name at a time: with replace, a leftover
// temporary (an earlier crash) is removed first, which is the key store's (it holds its directory's lock); with
// refuse, a leftover is an Errc::exists naming it, since it may be someone's file. Other failures: Errc::io naming
// the step and the path (after a failed directory fsync the new name may or may not be durable).
Result<UniqueFd> write_key_file_at(int dir_fd, const std::filesystem::path& dir, const std::string& name,
                                   ByteView content, IfExists if_exists);
// The same for path, in the directory that holds it.
Result<void> write_key_file(const std::filesystem::path& path, ByteView content, IfExists if_exists);

}  // namespace dauth::crypto

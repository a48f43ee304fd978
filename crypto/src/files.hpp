// Small POSIX file helpers shared by the key store, the master key loader and the X.509 key/certificate loaders:
// mode text, io errors, the one way to read a key file, and write loops. (The owning descriptor is
// dauth/unique_fd.hpp, the one way to write a key file dauth/crypto/key_file.hpp.)
// Internal to dauth_crypto.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>

#include "dauth/crypto/key_file.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"
#include "dauth/unique_fd.hpp"

namespace dauth::crypto::files {

using dauth::UniqueFd;

// "0644": the permission bits as chmod(1) writes them.
std::string mode_text(mode_t mode);

// Errc::io: "<what> <path>: <strerror(err)>".
Error io_error(const std::string& what, const std::filesystem::path& path, int err);

// Writes all of [data, data + size) to fd (retrying short writes and EINTR); 0 on success, else the errno.
int write_all(int fd, const std::uint8_t* data, std::size_t size);
// The same with pwrite(2) at offset (the file position is left alone).
int pwrite_all(int fd, const std::uint8_t* data, std::size_t size, off_t offset);

// read_key_file() is public: dauth/crypto/key_file.hpp.
using crypto::read_key_file;

// Reads a whole public file (certificates) of at most max_size bytes; Errc::limit when it is larger.
Result<Bytes> read_public_file(const std::filesystem::path& path, std::string_view what, std::size_t max_size);

}  // namespace dauth::crypto::files

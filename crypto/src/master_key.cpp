// The master key of the sealed key store: a key file or a systemd credential (docs/keystore-format.md,
// docs/conventions.md §8).
#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/keystore.hpp"
#include "files.hpp"

namespace dauth::crypto {

namespace {


constexpr std::size_t kHexSize = 2 * kMasterKeySize;

}  // namespace

Result<SecretBuffer> load_master_key_file(const std::filesystem::path& path) {
  // At most one newline after the hex digits: files::read_key_file reads one byte more, so longer files show.
  auto content = files::read_key_file(path, "master key file", kHexSize + 1);
  if (!content) return std::move(content).error();
  const std::size_t length = content->size();
  const std::string_view text(reinterpret_cast<const char*>(content->data()), length);
  const bool newline_ok = length == kHexSize || (length == kHexSize + 1 && text.back() == '\n');
  if (!newline_ok) {
    // Never quote the content: it is (almost) key material.
    const std::string size_text = length > kHexSize + 1 ? "more than " + std::to_string(kHexSize + 1) + " bytes"
                                                        : std::to_string(length) + " bytes";
    return make_error(Errc::parse, "master key file " + path.string() + ": " + size_text + "; expected exactly " +
                                       std::to_string(kHexSize) +
                                       " hexadecimal characters, optionally followed by one newline");
  }
  auto key = secret_from_hex(text.substr(0, kHexSize));
  if (!key) {
    return make_error(Errc::parse, "master key file " + path.string() + ": not " + std::to_string(kHexSize) +
                                       " hexadecimal characters (0-9, a-f, A-F; no spaces)");
  }
  return std::move(key).value();
}

Result<SecretBuffer> load_master_key_credential(std::string_view name) {
  const char* directory = std::getenv("CREDENTIALS_DIRECTORY");
  if (directory == nullptr || *directory == '\0') {
    return make_error(Errc::not_found, "credential " + quote_for_error(name) +
                                           ": $CREDENTIALS_DIRECTORY is not set (no systemd LoadCredential=)");
  }
  // systemd credential names are single path components (systemd.exec(5), "Credentials").
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string_view::npos ||
      name.find('\0') != std::string_view::npos) {
    return make_error(Errc::invalid_argument,
                      "credential name " + quote_for_error(name) + ": must be one path component (no '/')");
  }
  return load_master_key_file(std::filesystem::path(directory) / std::string(name));
}

Result<void> write_new_master_key_file(const std::filesystem::path& path) {
  const SecretBuffer key = SecretBuffer::random(kMasterKeySize);
  SecretBuffer text(kHexSize + 1);  // sodium_bin2hex writes a terminating NUL, replaced by the newline
  sodium_bin2hex(reinterpret_cast<char*>(text.data()), text.size(), key.data(), key.size());
  text.data()[kHexSize] = '\n';
  // IfExists::refuse: never replace a key that may still seal a store.
  auto written = write_key_file(path, ByteView(text.data(), text.size()), IfExists::refuse);
  if (!written && written.error().code == Errc::exists) {
    return make_error(Errc::exists, "master key file: " + written.error().message);
  }
  return written;
}

}  // namespace dauth::crypto

#include "secret_file.hpp"

#include <string>
#include <string_view>

#include "dauth/crypto/key_file.hpp"

namespace dauth::daemon::detail {

Result<SecretBuffer> parse_hex_key(const SecretBuffer& text, std::size_t length, const std::string& what,
                                   std::size_t min_bytes, std::size_t max_bytes) {
  const std::size_t max_text = max_bytes * 2 + 1;
  if (length > max_text) {
    return make_error(Errc::invalid_argument, what + ": longer than " + std::to_string(max_text) +
                                                  " bytes; must hold " + std::to_string(min_bytes) + "–" +
                                                  std::to_string(max_bytes) + " key bytes as hex");
  }
  if (length > 0 && text.data()[length - 1] == '\n') --length;
  const std::size_t key_bytes = length / 2;
  if (length % 2 != 0 || key_bytes < min_bytes || key_bytes > max_bytes) {
    return make_error(Errc::invalid_argument, what + ": " + std::to_string(length) + " hex characters; must be " +
                                                  std::to_string(min_bytes * 2) + "–" +
                                                  std::to_string(max_bytes * 2) +
                                                  " hex characters and at most one trailing newline");
  }
  auto key = secret_from_hex(std::string_view(reinterpret_cast<const char*>(text.data()), length));
  if (!key) return make_error(Errc::invalid_argument, what + ": not hexadecimal (0-9, a-f, A-F only)");
  return std::move(key).value();
}

Result<SecretBuffer> read_hex_key_file(const std::filesystem::path& path, std::size_t min_bytes,
                                       std::size_t max_bytes) {
  // Whether the file is private enough is decided in one place, crypto::read_key_file (docs/conventions.md §8: refuse,
  // do not warn); here only what a Kpm file holds: hex, with at most one trailing newline.
  const std::size_t max_text = max_bytes * 2 + 1;
  auto text = crypto::read_key_file(path, "key file", max_text);
  if (!text) return std::move(text).error();
  return parse_hex_key(*text, text->size(), "key file " + path.string(), min_bytes, max_bytes);
}

Result<SecretBuffer> read_hex_key_fd(int fd, const std::string& what, std::size_t min_bytes, std::size_t max_bytes) {
  // What may be read, and how, is crypto::read_key_fd's (the key-file rule in one place); here only the content.
  auto text = crypto::read_key_fd(fd, what, max_bytes * 2 + 1);
  if (!text) return std::move(text).error();
  return parse_hex_key(*text, text->size(), what, min_bytes, max_bytes);
}

}  // namespace dauth::daemon::detail

#include "secret_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

namespace dauth::daemon::detail {

namespace {

// Closes the descriptor on every path.
class FileDescriptor {
 public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  ~FileDescriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

std::string mode_text(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof text, "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

}  // namespace

Result<SecretBuffer> read_hex_key_file(const std::filesystem::path& path, std::size_t min_bytes,
                                       std::size_t max_bytes) {
  const std::string name = path.string();
  // O_NOFOLLOW: the mode we check must be the mode of the file we read.
  FileDescriptor fd(::open(name.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
  if (fd.get() < 0) {
    const int err = errno;
    return make_error(err == ENOENT ? Errc::not_found : (err == EACCES ? Errc::permission : Errc::io),
                      "key file " + name + ": cannot open: " + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    return make_error(Errc::io, "key file " + name + ": fstat: " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    return make_error(Errc::invalid_argument, "key file " + name + ": not a regular file");
  }
  // STYLE.md §8: refuse, do not warn (chrony only warns).
  if ((st.st_mode & 077) != 0) {
    return make_error(Errc::permission, "key file " + name + ": mode " + mode_text(st.st_mode) +
                                            " gives group/world access; must be 0600 or 0400 (chmod 600 " +
                                            name + ")");
  }
  const std::size_t max_text = max_bytes * 2 + 1;  // hex plus one newline
  if (st.st_size < 0 || static_cast<std::size_t>(st.st_size) > max_text) {
    return make_error(Errc::invalid_argument, "key file " + name + ": " + std::to_string(st.st_size) +
                                                  " bytes; must hold " + std::to_string(min_bytes) + "–" +
                                                  std::to_string(max_bytes) + " key bytes as hex");
  }
  // Read straight into guarded memory: the hex text is as secret as the key.
  SecretBuffer text(max_text + 1);
  std::size_t length = 0;
  for (;;) {
    const ssize_t n = ::read(fd.get(), text.data() + length, text.size() - length);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return make_error(Errc::io, "key file " + name + ": read: " + std::strerror(errno));
    if (n == 0) break;
    length += static_cast<std::size_t>(n);
    if (length == text.size()) break;
  }
  if (length > 0 && text.data()[length - 1] == '\n') --length;
  const std::size_t key_bytes = length / 2;
  if (length % 2 != 0 || key_bytes < min_bytes || key_bytes > max_bytes) {
    return make_error(Errc::invalid_argument, "key file " + name + ": " + std::to_string(length) +
                                                  " hex characters; must be " + std::to_string(min_bytes * 2) +
                                                  "–" + std::to_string(max_bytes * 2) +
                                                  " hex characters and at most one trailing newline");
  }
  auto key = secret_from_hex(std::string_view(reinterpret_cast<const char*>(text.data()), length));
  if (!key) {
    return make_error(Errc::invalid_argument, "key file " + name + ": not hexadecimal (0-9, a-f, A-F only)");
  }
  return std::move(key).value();
}

}  // namespace dauth::daemon::detail

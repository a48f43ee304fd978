#include "key_source.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>

#include "dauth/daemon/exit_codes.hpp"
#include "dauth/secret.hpp"
#include "dauth/unique_fd.hpp"
#include "secret_file.hpp"

namespace dauthctl {

namespace {

using dauth::daemon::ExitCode;
using dauth::daemon::as_int;
namespace detail = dauth::daemon::detail;

int usage(const char* option, const std::string& why) {
  std::cerr << "dauthctl: " << option << ": " << why << "\n";
  return as_int(ExitCode::usage);
}

// Standard input that is not a regular file: read to the end into guarded memory, check, copy into a new pipe.
int pipe_from_stdin(const char* option, int& out_fd, std::size_t min_bytes, std::size_t max_bytes) {
  const std::size_t max_text = max_bytes * 2 + 1;  // hex and a newline
  dauth::SecretBuffer text(max_text + 1);
  std::size_t length = 0;
  while (length < text.size()) {
    const ssize_t n = ::read(STDIN_FILENO, text.data() + length, text.size() - length);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return usage(option, std::string("reading standard input: ") + std::strerror(errno));
    if (n == 0) break;
    length += static_cast<std::size_t>(n);
  }
  if (auto key = detail::parse_hex_key(text, length, "standard input", min_bytes, max_bytes); !key) {
    return usage(option, key.error().message);
  }
  int ends[2];
  if (::pipe2(ends, O_CLOEXEC) != 0) return usage(option, std::string("pipe: ") + std::strerror(errno));
  dauth::UniqueFd read_end(ends[0]);
  dauth::UniqueFd write_end(ends[1]);
  // At most 129 bytes (a 64-byte key) into an empty pipe: never blocks (PIPE_BUF).
  const ssize_t written = ::write(write_end.get(), text.data(), length);
  const int err = errno;
  write_end.reset();  // the daemon reads to the end: the write end must be closed before the request goes
  if (written != static_cast<ssize_t>(length)) return usage(option, std::string("pipe: ") + std::strerror(err));
  out_fd = read_end.release();
  return 0;
}

}  // namespace

int open_key_source(const std::string& source, const char* option, dauth::UniqueFd& out) {
  return open_key_source(source, option, out, detail::kMinKpmBytes, detail::kMaxKpmBytes);
}

int open_key_source(const std::string& source, const char* option, dauth::UniqueFd& out, std::size_t min_bytes,
                    std::size_t max_bytes) {
  if (source != "-") {
    if (auto key = detail::read_hex_key_file(source, min_bytes, max_bytes); !key) {
      return usage(option, key.error().message);
    }
    const int fd = ::open(source.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return usage(option, source + ": " + std::strerror(errno));
    out.reset(fd);
    return 0;
  }
  struct stat st {};
  if (::fstat(STDIN_FILENO, &st) != 0) return usage(option, std::string("standard input: ") + std::strerror(errno));
  if (S_ISREG(st.st_mode)) {
    // dauthd's rules on the descriptor itself (pread: the offset stays for dauthd's read).
    auto key = detail::read_hex_key_fd(STDIN_FILENO, std::string(option) + " - (standard input)", min_bytes,
                                       max_bytes);
    if (!key) return usage(option, key.error().message);
    const int fd = ::fcntl(STDIN_FILENO, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) return usage(option, std::string("standard input: ") + std::strerror(errno));
    out.reset(fd);
    return 0;
  }
  if (::isatty(STDIN_FILENO)) {
    return usage(option, "standard input is a terminal; pipe the key in (dauthctl genpsk | dauthctl ...) or give "
                         "a key file");
  }
  int fd = -1;
  const int rc = pipe_from_stdin(option, fd, min_bytes, max_bytes);
  out.reset(fd);
  return rc;
}

}  // namespace dauthctl

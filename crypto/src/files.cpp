#include "files.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace dauth::crypto::files {

std::string mode_text(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof text, "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

Error io_error(const std::string& what, const std::filesystem::path& path, int err) {
  return make_error(Errc::io, what + " " + path.string() + ": " + std::strerror(err));
}

int write_all(int fd, const std::uint8_t* data, std::size_t size) {
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return EIO;
    done += static_cast<std::size_t>(n);
  }
  return 0;
}

int pwrite_all(int fd, const std::uint8_t* data, std::size_t size, off_t offset) {
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pwrite(fd, data + done, size - done, offset + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return EIO;
    done += static_cast<std::size_t>(n);
  }
  return 0;
}

namespace {

// Opens path for reading and checks that it is a regular file; the stat result is left in st.
Result<UniqueFd> open_regular_file(const std::filesystem::path& path, std::string_view what, struct stat& st) {
  // O_NONBLOCK: a FIFO planted at the path must not block the daemon before the S_ISREG check refuses it.
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK));
  const std::string name(what);
  if (!fd.valid()) {
    const int err = errno;
    if (err == ENOENT) return make_error(Errc::not_found, name + " " + path.string() + " does not exist");
    if (err == EACCES) return make_error(Errc::permission, name + " " + path.string() + ": " + std::strerror(err));
    return io_error("cannot open " + name, path, err);
  }
  if (::fstat(fd.get(), &st) != 0) return io_error("cannot stat " + name, path, errno);
  if (!S_ISREG(st.st_mode)) return make_error(Errc::permission, name + " " + path.string() + " is not a regular file");
  return fd;
}

// Reads until EOF or until buffer is full; returns the number of bytes read, or the errno as a negative number.
template <class Buffer>
long long read_into(int fd, Buffer& buffer) {
  std::size_t length = 0;
  while (length < buffer.size()) {
    const ssize_t n = ::read(fd, buffer.data() + length, buffer.size() - length);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -static_cast<long long>(errno);
    if (n == 0) break;
    length += static_cast<std::size_t>(n);
  }
  return static_cast<long long>(length);
}

}  // namespace

Result<Bytes> read_public_file(const std::filesystem::path& path, std::string_view what, std::size_t max_size) {
  struct stat st {};
  auto fd = open_regular_file(path, what, st);
  if (!fd) return std::move(fd).error();
  const std::size_t file_size = st.st_size > 0 ? static_cast<std::size_t>(st.st_size) : 0;
  Bytes content(std::min(file_size, max_size) + 1);
  const long long length = read_into(fd->get(), content);
  if (length < 0) return io_error("cannot read " + std::string(what), path, static_cast<int>(-length));
  if (static_cast<std::size_t>(length) > max_size) {
    return make_error(Errc::limit, std::string(what) + " " + path.string() + " has more than " +
                                       std::to_string(max_size) + " bytes (at most " + std::to_string(max_size) +
                                       " allowed)");
  }
  content.resize(static_cast<std::size_t>(length));
  return content;
}

}  // namespace dauth::crypto::files

namespace dauth::crypto {

namespace {

// The one rule (docs/conventions.md §8): a key file others may read or write is refused, not warned about, naming the
// mode. Decided on the open descriptor: no window between the check and the read.
Result<void> refuse_open_mode(const struct stat& st, const std::string& name) {
  if ((st.st_mode & 077) == 0) return ok_result();
  return make_error(Errc::permission, name + ": mode " + files::mode_text(st.st_mode) +
                                          ", must not be readable or writable by group or others (chmod 600)");
}

}  // namespace

Result<SecretBuffer> read_key_file(const std::filesystem::path& path, std::string_view what, std::size_t max_size) {
  struct stat st {};
  auto fd = files::open_regular_file(path, what, st);
  if (!fd) return std::move(fd).error();
  if (auto ok = refuse_open_mode(st, std::string(what) + " " + path.string()); !ok) return std::move(ok).error();
  // One byte more than allowed, so that a longer file shows as longer without reading it all. st_size only sizes
  // the buffer: at least 4 KiB, so that a file whose size stat does not report (a credential on a pseudo file
  // system) is still read whole.
  constexpr std::size_t kMinBuffer = 4096;
  const std::size_t file_size = st.st_size > 0 ? static_cast<std::size_t>(st.st_size) : 0;
  SecretBuffer content(std::min(std::max(file_size, kMinBuffer), max_size) + 1);
  const long long length = files::read_into(fd->get(), content);
  if (length < 0) return files::io_error("cannot read " + std::string(what), path, static_cast<int>(-length));
  return content.slice(0, static_cast<std::size_t>(length));
}

Result<SecretBuffer> read_key_fd(int fd, std::string_view what, std::size_t max_size) {
  const std::string name(what);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return make_error(Errc::io, name + ": fstat: " + std::strerror(errno));
  const bool regular = S_ISREG(st.st_mode);
  if (!regular && !S_ISFIFO(st.st_mode)) {
    return make_error(Errc::permission, name + ": not a regular file or a pipe (pass the key file, or a pipe "
                                               "holding the key)");
  }
  if (regular) {
    // The policy does not depend on who opened the file.
    if (auto ok = refuse_open_mode(st, name); !ok) return std::move(ok).error();
  } else {
    // A pipe whose writer is still open would block the caller's loop: never wait for it.
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) {
      return make_error(Errc::io, name + ": fcntl: " + std::strerror(errno));
    }
  }
  SecretBuffer content(max_size + 1);  // one byte more than allowed, as above
  std::size_t length = 0;
  while (length < content.size()) {
    // A regular file is read from offset 0 with pread: the sender's file offset stays where it was.
    const ssize_t n = regular ? ::pread(fd, content.data() + length, content.size() - length, static_cast<off_t>(length))
                              : ::read(fd, content.data() + length, content.size() - length);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return make_error(Errc::invalid_argument, name + ": the pipe's writer has not closed it; write the whole "
                                                       "key, close the pipe, then send the request");
    }
    if (n < 0) return make_error(Errc::io, name + ": read: " + std::strerror(errno));
    if (n == 0) break;
    length += static_cast<std::size_t>(n);
  }
  return content.slice(0, length);
}

Result<UniqueFd> write_key_file_at(int dir_fd, const std::filesystem::path& dir, const std::string& name,
                                   ByteView content, IfExists if_exists) {
  const std::string tmp_name = name + ".tmp";
  const std::filesystem::path tmp_path = dir / tmp_name;
  const std::filesystem::path final_path = dir / name;
  if (if_exists == IfExists::replace && ::unlinkat(dir_fd, tmp_name.c_str(), 0) != 0 && errno != ENOENT) {
    return files::io_error("cannot remove leftover", tmp_path, errno);
  }
  UniqueFd fd(::openat(dir_fd, tmp_name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!fd.valid()) {
    const int err = errno;
    if (err == EEXIST) {
      return make_error(Errc::exists, tmp_path.string() + " exists (left by an interrupted write?); remove it to "
                                                          "write " + final_path.string());
    }
    return files::io_error("cannot create", tmp_path, err);
  }
  // From here on the temporary is ours: removed unless it became the file.
  bool renamed = false;
  struct RemoveTemporary {
    int dir_fd;
    const std::string& name;
    const bool& renamed;
    ~RemoveTemporary() {
      if (!renamed) ::unlinkat(dir_fd, name.c_str(), 0);
    }
  } cleanup{dir_fd, tmp_name, renamed};

  if (::fchmod(fd.get(), 0600) != 0) return files::io_error("cannot chmod", tmp_path, errno);  // whatever the umask
  if (const int err = files::write_all(fd.get(), content.data, content.size); err != 0) {
    return files::io_error("cannot write", tmp_path, err);
  }
  if (::fsync(fd.get()) != 0) return files::io_error("cannot fsync", tmp_path, errno);
  if (if_exists == IfExists::replace) {
    if (::renameat(dir_fd, tmp_name.c_str(), dir_fd, name.c_str()) != 0) {
      return files::io_error("cannot rename " + tmp_path.string() + " to", final_path, errno);
    }
  } else {
    // link(2) fails with EEXIST instead of replacing, even if the name appeared while we wrote.
    if (::linkat(dir_fd, tmp_name.c_str(), dir_fd, name.c_str(), 0) != 0) {
      const int err = errno;
      if (err == EEXIST) {
        return make_error(Errc::exists, final_path.string() + " already exists; refusing to overwrite a key file");
      }
      return files::io_error("cannot link " + tmp_path.string() + " to", final_path, err);
    }
    if (::unlinkat(dir_fd, tmp_name.c_str(), 0) != 0) return files::io_error("cannot remove", tmp_path, errno);
  }
  renamed = true;
  if (::fsync(dir_fd) != 0) return files::io_error("cannot fsync directory", dir, errno);
  return fd;
}

Result<void> write_key_file(const std::filesystem::path& path, ByteView content, IfExists if_exists) {
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  UniqueFd dir_fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!dir_fd.valid()) return files::io_error("cannot open directory", dir, errno);
  auto written = write_key_file_at(dir_fd.get(), dir, path.filename().string(), content, if_exists);
  if (!written) return std::move(written).error();
  return ok_result();
}

}  // namespace dauth::crypto

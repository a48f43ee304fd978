// dauthctl genpsk [--out FILE] [--bytes N]: a new random pre-provisioned key (SecretBuffer::random) in the key-file
// format dauthd reads (hex, one newline; secret_file.hpp), like `wg genkey`. Local only: no daemon involved.
// --out writes the file 0600 through a temporary file and link(2), so an existing file is never overwritten and a
// crash leaves no half-written key; without --out the key goes to standard output.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>

#include "dauth/crypto/key_file.hpp"
#include "dauth/daemon/exit_codes.hpp"
#include "dauth/secret.hpp"
#include "secret_file.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

using dauth::daemon::ExitCode;
using dauth::daemon::as_int;

std::string mode_text(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof text, "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

int write_all(int fd, const std::uint8_t* data, std::size_t size) {
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return n < 0 ? errno : EIO;
    done += static_cast<std::size_t>(n);
  }
  return 0;
}

// The key as hex and a newline, in guarded memory (never a std::string).
dauth::SecretBuffer key_text(std::size_t bytes) {
  return dauth::secret_to_hex_line(dauth::SecretBuffer::random(bytes));
}

int write_file(const std::filesystem::path& path, const dauth::SecretBuffer& text, bool json,
               const std::string& fingerprint) {
  const auto fail = [&](const std::string& why, ExitCode code) {
    std::cerr << "dauthctl: genpsk: " << path.string() << ": " << why << "\n";
    return as_int(code);
  };
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  struct stat dir_st {};
  if (::stat(dir.c_str(), &dir_st) != 0) return fail(std::strerror(errno), ExitCode::usage);
  if (::lstat(path.c_str(), &dir_st) == 0 || errno != ENOENT) {
    return fail("exists; refusing to overwrite a key file (remove it first)", ExitCode::usage);
  }
  ::stat(dir.c_str(), &dir_st);
  if ((dir_st.st_mode & 022) != 0) {
    std::cerr << "dauthctl: genpsk: warning: directory " << dir.string() << " is mode " << mode_text(dir_st.st_mode)
              << " (group/world-writable): others could replace the key file\n";
  }
  // The key store's way (temporary, fsync, link, directory fsync): no overwrite even if the file appears meanwhile.
  if (auto written = dauth::crypto::write_key_file(path, dauth::ByteView(text.data(), text.size()),
                                                   dauth::crypto::IfExists::refuse);
      !written) {
    std::cerr << "dauthctl: genpsk: " << written.error().message << "\n";  // names the path
    return as_int(written.error().code == dauth::Errc::exists ? ExitCode::usage : ExitCode::failed);
  }
  if (json) {
    std::cout << nlohmann::json{{"file", path.string()}, {"bytes", (text.size() - 1) / 2},
                                {"fingerprint", fingerprint}}.dump(2)
              << "\n";
  } else {
    std::cout << "wrote " << path.string() << " (0600, " << (text.size() - 1) / 2 << " bytes, fingerprint "
              << fingerprint << ")\n";
  }
  return as_int(ExitCode::ok);
}

}  // namespace

CLI::App* add_genpsk(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("genpsk", "generate a random pre-provisioned key in dauthd's key-file format "
                                                  "(local; no daemon needed)");
  static std::string out;
  static std::size_t bytes = 32;
  sub->add_option("--out", out, "write the key to this new file (0600; never overwrites) instead of stdout");
  sub->add_option("--bytes", bytes, "key size in bytes")
      ->check(CLI::Range(dauth::daemon::detail::kMinKpmBytes, dauth::daemon::detail::kMaxKpmBytes))
      ->capture_default_str();
  sub->callback([&context] {
    const dauth::SecretBuffer text = key_text(bytes);
    if (!out.empty()) {
      auto key = dauth::secret_from_hex(std::string_view(reinterpret_cast<const char*>(text.data()), bytes * 2));
      context.exit_code = write_file(out, text, context.json, key ? key->fingerprint() : std::string("?"));
      return;
    }
    if (context.json) {
      std::cerr << "dauthctl: genpsk: --json needs --out FILE (the key itself is never printed as JSON)\n";
      context.exit_code = as_int(ExitCode::usage);
      return;
    }
    // The same rule dauthd applies when it reads the file: warn now rather than be refused later.
    struct stat st {};
    if (::fstat(STDOUT_FILENO, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 077) != 0) {
      std::cerr << "dauthctl: genpsk: warning: standard output is a file of mode " << mode_text(st.st_mode)
                << "; dauthd refuses key files readable by group or others (chmod 600)\n";
    }
    std::cout.flush();
    if (write_all(STDOUT_FILENO, text.data(), text.size()) != 0) {
      std::cerr << "dauthctl: genpsk: writing standard output: " << std::strerror(errno) << "\n";
      context.exit_code = as_int(ExitCode::failed);
      return;
    }
    context.exit_code = as_int(ExitCode::ok);
  });
  return sub;
}

}  // namespace dauthctl

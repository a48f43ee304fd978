#include "dauth/daemon/check_config.hpp"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>

#include "dauth/crypto/keystore.hpp"
#include "dauth/crypto/token.hpp"
#include "dauth/transport/address.hpp"
#include "dauth/transport/transport.hpp"
#include "dauth/unique_fd.hpp"

namespace dauth::daemon {

namespace {

const ConfigTable* find_table(const Config& config, std::string_view section) {
  for (const auto& table : config.tables) {
    if (table.section == section) return &table;
  }
  return nullptr;
}

// "dauthd.toml:14:9: mef.listen = "0.0.0.0:5685"" (no position for a default).
std::string where(const Config& config, const ConfigTable& table, const ConfigEntry& entry) {
  std::string text = config.source;
  if (entry.line) text += ":" + std::to_string(entry.line) + ":" + std::to_string(entry.column);
  text += ": " + table.key_path(entry.spec->name) + " = ";
  if (const auto* value = std::get_if<std::string>(&entry.value)) return text + "\"" + *value + "\"";
  return text + "[...]";
}

std::string user_name() {
  const passwd* user = ::getpwuid(::geteuid());
  return user ? user->pw_name : "uid " + std::to_string(::geteuid());
}

// The ports a running dauthd reports in its status (role -> port), if one answers on this control socket.
std::optional<nlohmann::json> running_ports(const std::filesystem::path& socket_path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (!fd.valid() || socket_path.string().size() >= sizeof address.sun_path) return std::nullopt;
  std::memcpy(address.sun_path, socket_path.c_str(), socket_path.string().size());
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) return std::nullopt;
  const timeval limit{2, 0};  // a daemon that does not answer in 2 s is taken as not running
  (void)::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
  const std::string request = "{\"verb\":\"status\"}\n";
  if (::send(fd.get(), request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
    return std::nullopt;
  }
  std::string reply;
  char buffer[4096];
  while (reply.find('\n') == std::string::npos) {
    const ssize_t n = ::recv(fd.get(), buffer, sizeof buffer, 0);
    if (n <= 0) return std::nullopt;
    reply.append(buffer, static_cast<std::size_t>(n));
  }
  const auto parsed = nlohmann::json::parse(reply.substr(0, reply.find('\n')), nullptr, false);
  if (parsed.is_discarded() || !parsed.value("ok", false)) return std::nullopt;
  return parsed["result"];
}

void check_port(const Config& config, std::string_view section, std::string_view key, DeploymentCheck& out) {
  const ConfigTable* table = find_table(config, section);
  const ConfigEntry* entry = table ? table->find(key) : nullptr;
  if (entry == nullptr) return;
  const std::string place = where(config, *table, *entry);
  auto listen = transport::parse_host_port(std::get<std::string>(entry->value));
  auto address = listen ? transport::numeric_address(listen->host, listen->port)
                        : Result<transport::SocketAddress>(listen.error());
  if (!address) {
    out.errors.push_back(place + ": " + address.error().message);
    return;
  }
  auto free = transport::check_udp_port_free(*address);
  if (free) return;
  if (free.error().code == Errc::exists) {
    if (auto status = running_ports(config.daemon.control_socket)) {
      const auto& ports = (*status)["ports"];
      for (const auto& [role, port] : ports.items()) {
        if (port.is_number() && port.get<int>() == listen->port) {
          out.notes.push_back(place + ": held by the running dauthd (pid " +
                              std::to_string(status->value("pid", 0)) + ", control socket " +
                              config.daemon.control_socket.string() + "); free again when it stops");
          return;
        }
      }
    }
  }
  out.errors.push_back(place + ": " + free.error().message);
}

}  // namespace

Result<void> become_user(const std::string& name) {
  const passwd* user = ::getpwnam(name.c_str());
  if (user == nullptr) return make_error(Errc::not_found, "-u " + name + ": no such user");
  const uid_t uid = user->pw_uid;
  const gid_t gid = user->pw_gid;
  if (::geteuid() == uid) return ok_result();
  if (::initgroups(name.c_str(), gid) != 0 || ::setresgid(gid, gid, gid) != 0 || ::setresuid(uid, uid, uid) != 0) {
    return make_error(Errc::permission, "-u " + name + ": cannot become that user: " + std::strerror(errno) +
                                            " (run as root)");
  }
  return ok_result();
}

Result<void> check_state_directory(const Config& config) {
  const std::filesystem::path& dir = config.daemon.state_directory;
  std::string place = config.source;
  if (const ConfigTable* table = find_table(config, "daemon")) {
    if (const ConfigEntry* entry = table->find("state_directory"); entry && entry->line) {
      place += ":" + std::to_string(entry->line) + ":" + std::to_string(entry->column);
    }
  }
  place += ": daemon.state_directory = \"" + dir.string() + "\"";
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    return make_error(Errc::not_found, place + ": " + std::strerror(errno) +
                                           " (systemd creates it from StateDirectory= when it starts the unit; "
                                           "otherwise create it, mode 0700, owned by the user dauthd runs as)");
  }
  if (!S_ISDIR(st.st_mode)) return make_error(Errc::invalid_argument, place + ": not a directory");
  // The key store's own rule (keystore.hpp), said at start with the config position, not at first use.
  if (auto mode = crypto::check_store_directory_mode(st.st_mode, place); !mode) return mode;
  // The kernel's own answer for this process's effective ids (ACLs included): dauthd writes its store there.
  if (::faccessat(AT_FDCWD, dir.c_str(), R_OK | W_OK | X_OK, AT_EACCESS) != 0) {
    return make_error(Errc::permission, place + ": user " + user_name() + " cannot create files in it: " +
                                            std::strerror(errno) + " (owner uid " + std::to_string(st.st_uid) +
                                            "; chown it to the user dauthd runs as)");
  }
  return ok_result();
}

DeploymentCheck check_deployment(const Config& config) {
  DeploymentCheck out;
  if (auto state = check_state_directory(config); !state) out.errors.push_back(state.error().message);

  // Every file the roles read at start (certificates, CAs, their private keys), opened as this user. Key files
  // with a mode rule (kpm_file, master_key_file) were load_secrets()'s.
  for (const ConfigTable& table : config.tables) {
    for (const ConfigEntry& entry : table.entries) {
      const auto type = entry.spec->type;
      if ((type != ValueType::path && type != ValueType::path_list) || entry.spec->key_file ||
          entry.spec->name == "state_directory" || entry.spec->name == "control_socket") {
        continue;
      }
      std::vector<std::string> paths;
      if (const auto* one = std::get_if<std::string>(&entry.value)) paths.push_back(*one);
      if (const auto* many = std::get_if<std::vector<std::string>>(&entry.value)) paths = *many;
      for (const auto& path : paths) {
        if (entry.spec->check == ValueCheck::private_key && crypto::is_pkcs11_uri(path)) continue;  // load_secrets'
        UniqueFd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
        if (!file.valid()) {
          out.errors.push_back(where(config, table, entry) + ": " + path + ": user " + user_name() +
                               " cannot read it: " + std::strerror(errno));
        }
      }
    }
  }

  // The UDP ports the roles bind (Roles::start): the MEF's, the peer endpoint and, with it, the local AEs' one.
  if (config.mef) check_port(config, "mef", "listen", out);
  if (config.peer) check_port(config, "peer", "listen", out);
  if (config.peer && config.enrolee) check_port(config, "enrolee", "local_listen", out);

  const char* credentials = std::getenv("CREDENTIALS_DIRECTORY");
  if (config.daemon.master_key_source == "credential" && (credentials == nullptr || *credentials == '\0')) {
    out.notes.push_back("daemon.master_key_credential = \"" + config.daemon.master_key_credential +
                        "\": not checked here; the key will come from systemd LoadCredential= "
                        "($CREDENTIALS_DIRECTORY/" + config.daemon.master_key_credential +
                        ") when systemd starts the unit (dauthd.service: LoadCredentialEncrypted=master-key:...)");
  }
  return out;
}

}  // namespace dauth::daemon

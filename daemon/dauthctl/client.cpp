#include "client.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <iostream>
#include <optional>
#include <vector>

#include "dauth/daemon/exit_codes.hpp"
#include "dauth/error.hpp"
#include "dauth/unique_fd.hpp"

namespace dauthctl {

namespace {

using dauth::daemon::ExitCode;
using dauth::daemon::as_int;

// A reply the daemon is still computing is normal; one that never comes is not. Generous: the machine may be busy.
constexpr int kReplyTimeoutSeconds = 60;

std::optional<dauth::Errc> errc_from_word(const std::string& word) {
  for (std::size_t i = 0; i < dauth::kErrcCount; ++i) {
    const auto code = static_cast<dauth::Errc>(i);
    if (dauth::to_string(code) == word) return code;
  }
  return std::nullopt;
}

struct Exchange {
  int exit_code = 0;
  nlohmann::json reply;
};

// Sends the first part of the line with the descriptors attached (SCM_RIGHTS): dauthd attaches them to the
// request of the line they came with (docs/control-protocol.md "Passing keys").
ssize_t send_with_fds(int socket, const std::string& data, const std::vector<int>& fds) {
  iovec part{const_cast<char*>(data.data()), data.size()};
  msghdr message{};
  message.msg_iov = &part;
  message.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  message.msg_control = control.data();
  message.msg_controllen = control.size();
  cmsghdr* header = CMSG_FIRSTHDR(&message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(header), fds.data(), sizeof(int) * fds.size());
  return ::sendmsg(socket, &message, MSG_NOSIGNAL);
}

// Connects, sends one line (with fds, if any), reads one line. Prints transport failures itself.
Exchange exchange(const Context& context, const std::string& verb, const nlohmann::json& args,
                  const std::vector<int>& fds) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (context.socket.size() >= sizeof address.sun_path) {
    std::cerr << "dauthctl: control socket path is " << context.socket.size() << " bytes; must be at most "
              << sizeof address.sun_path - 1 << "\n";
    return {as_int(ExitCode::usage), {}};
  }
  std::memcpy(address.sun_path, context.socket.c_str(), context.socket.size() + 1);
  dauth::UniqueFd socket(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (socket.get() < 0 ||
      ::connect(socket.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
    const int err = errno;
    std::cerr << "dauthctl: cannot reach dauthd at " << context.socket << ": " << std::strerror(err)
              << (err == EACCES ? " (not root, dauthd's user, or in its control group)"
                                : " (is dauthd running? -s PATH selects another socket)")
              << "\n";
    return {as_int(err == EACCES || err == EPERM ? ExitCode::refused : ExitCode::unreachable), {}};
  }
  timeval timeout{kReplyTimeoutSeconds, 0};
  ::setsockopt(socket.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);

  const std::string line = nlohmann::json{{"verb", verb}, {"args", args}}.dump() + "\n";
  std::size_t sent = 0;
  while (sent < line.size()) {
    const ssize_t n = sent == 0 && !fds.empty()
                          ? send_with_fds(socket.get(), line, fds)
                          : ::send(socket.get(), line.data() + sent, line.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      std::cerr << "dauthctl: sending to " << context.socket << ": " << std::strerror(errno) << "\n";
      return {as_int(ExitCode::unreachable), {}};
    }
    sent += static_cast<std::size_t>(n);
  }

  std::string input;
  char buffer[4096];
  while (input.find('\n') == std::string::npos) {
    const ssize_t n = ::recv(socket.get(), buffer, sizeof buffer, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      std::cerr << "dauthctl: no reply from dauthd at " << context.socket << ": " << std::strerror(errno) << "\n";
      return {as_int(ExitCode::failed), {}};
    }
    if (n == 0) break;
    input.append(buffer, static_cast<std::size_t>(n));
  }
  const auto newline = input.find('\n');
  auto reply = nlohmann::json::parse(input.substr(0, newline), nullptr, false);
  if (newline == std::string::npos || reply.is_discarded() || !reply.is_object() || !reply.contains("ok") ||
      !reply["ok"].is_boolean()) {
    std::cerr << "dauthctl: dauthd at " << context.socket << " sent a malformed reply\n";
    return {as_int(ExitCode::failed), {}};
  }
  return {0, std::move(reply)};
}

}  // namespace

int call_raw(const Context& context, const std::string& verb, const nlohmann::json& args,
             const std::function<void(const nlohmann::json& result)>& on_result, const std::vector<int>& fds) {
  Exchange e = exchange(context, verb, args, fds);
  if (e.reply.is_null()) return e.exit_code;
  if (e.reply["ok"].get<bool>()) {
    on_result(e.reply.value("result", nlohmann::json::object()));
    return as_int(ExitCode::ok);
  }
  const std::string error = e.reply.value("error", std::string("(no error message)"));
  const std::string word = e.reply.value("code", std::string());
  // The daemon's reason, unchanged (docs/conventions.md §3): on stdout as the reply object with --json, else on stderr.
  if (context.json) {
    std::cout << e.reply.dump(2) << "\n";
  } else {
    std::cerr << error << "\n";
  }
  const auto code = errc_from_word(word);
  return as_int(code ? dauth::daemon::exit_code_for(*code, dauth::daemon::ErrorStage::operation) : ExitCode::failed);
}

int call(const Context& context, const std::string& verb, const nlohmann::json& args, const HumanPrinter& human,
         const std::vector<int>& fds) {
  return call_raw(
      context, verb, args,
      [&](const nlohmann::json& result) {
        if (context.json) {
          std::cout << result.dump(2) << "\n";
        } else {
          human(result, std::cout);
        }
      },
      fds);
}

std::string format_duration(long long seconds) {
  if (seconds < 0) seconds = 0;
  const long long days = seconds / 86400;
  const long long hours = seconds % 86400 / 3600;
  const long long minutes = seconds % 3600 / 60;
  std::string text;
  if (days) text += std::to_string(days) + "d ";
  if (days || hours) text += std::to_string(hours) + "h ";
  if (days || hours || minutes) text += std::to_string(minutes) + "m ";
  return text + std::to_string(seconds % 60) + "s";
}

namespace {

std::string units(long long seconds) {
  struct Unit {
    long long length;
    const char* name;
  };
  static constexpr Unit kUnits[] = {
      {365 * 86400LL, "year"}, {86400, "day"}, {3600, "hour"}, {60, "minute"}, {1, "second"}};
  std::string text;
  int shown = 0;
  for (const auto& unit : kUnits) {
    const long long count = seconds / unit.length;
    if (count == 0 || shown == 2) continue;  // the two largest units say enough
    seconds -= count * unit.length;
    text += (text.empty() ? "" : ", ") + std::to_string(count) + " " + unit.name + (count == 1 ? "" : "s");
    ++shown;
  }
  return text;
}

bool is_time_field(const std::string& key) {
  return key == "created" || key == "last_used" || key == "at" ||
         (key.size() > 3 && key.compare(key.size() - 3, 3, "_at") == 0);
}

std::string row_value(const std::string& key, const nlohmann::json& value) {
  if (is_time_field(key) && value.is_number_integer()) {
    const auto at = value.get<std::int64_t>();
    return at == 0 ? "never" : local_time(at, TimeStyle::iso);
  }
  if (!value.is_string()) return value.dump();
  const std::string text = value.get<std::string>();
  if (!text.empty() && text.find_first_of(" \t\r\n\"\\") == std::string::npos) return text;
  std::string quoted = "\"";
  for (const char c : text) {
    if (c == '"' || c == '\\') quoted += '\\';
    quoted += (c == '\n' || c == '\r' || c == '\t') ? ' ' : c;
  }
  return quoted + "\"";
}

}  // namespace

std::string local_time(std::int64_t unix_seconds, TimeStyle style) {
  const std::time_t t = static_cast<std::time_t>(unix_seconds);
  std::tm tm{};
  ::localtime_r(&t, &tm);
  char text[40];
  if (style == TimeStyle::iso) {
    std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S%z", &tm);
  } else {
    std::strftime(text, sizeof text, "%Y-%m-%d %H:%M:%S", &tm);
  }
  return text;
}

std::string when(std::int64_t now, std::int64_t at) {
  if (at == 0) return "never";
  if (at == now) return "now";
  return at < now ? units(now - at) + " ago" : "in " + units(at - now);
}

void print_rows(const nlohmann::json& rows, std::ostream& out, const char* empty_text) {
  if (!rows.is_array() || rows.empty()) {
    out << empty_text << "\n";
    return;
  }
  for (const auto& row : rows) {
    if (!row.is_object()) {
      out << row.dump() << "\n";
      continue;
    }
    std::string line;
    for (const auto& [key, value] : row.items()) {
      line += (line.empty() ? "" : "  ") + key + "=" + row_value(key, value);
    }
    out << line << "\n";
  }
}

}  // namespace dauthctl

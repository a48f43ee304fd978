#include "dauth/transport/address.hpp"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <vector>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/unique_fd.hpp"

namespace dauth::transport {

namespace {

constexpr std::string_view kHostPortForms =
    "must be host:port, e.g. 127.0.0.1:5684, [::1]:5684 or mef.example.net:5685";

Error invalid(const std::string& why) { return make_error(Errc::invalid_argument, why); }

bool is_ipv6_literal(const std::string& host) {
  in6_addr address{};
  return ::inet_pton(AF_INET6, host.c_str(), &address) == 1;
}

template <class Address>
SocketAddress socket_address(const Address& address) {
  SocketAddress out;
  std::memcpy(&out.storage, &address, sizeof address);
  out.length = sizeof address;
  return out;
}

}  // namespace

Result<HostPort> parse_host_port(std::string_view text, PortZero port_zero) {
  std::string_view host;
  std::string_view port;
  const bool bracketed = !text.empty() && text.front() == '[';
  if (bracketed) {
    const auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return invalid("an IPv6 address needs brackets and a port, e.g. [::1]:5684");
    }
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return invalid("no port; " + std::string(kHostPortForms));
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) return invalid("an IPv6 address needs brackets, e.g. [::1]:5684");
  }
  if (host.empty()) return invalid("no host; " + std::string(kHostPortForms));
  const unsigned lowest = port_zero == PortZero::allowed ? 0 : 1;
  const std::string range = "must be " + std::to_string(lowest) + "–65535";
  if (port.empty() || port.size() > 5 ||
      !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return invalid("port '" + std::string(port) + "': " + range);
  }
  const unsigned long number = std::stoul(std::string(port));
  if (number < lowest || number > 65535) return invalid("port " + std::string(port) + ": " + range);

  HostPort out{std::string(host), static_cast<std::uint16_t>(number)};
  if (bracketed) {
    if (!is_ipv6_literal(out.host)) return invalid("[" + out.host + "]: only an IPv6 address goes in brackets");
    return out;
  }
  in_addr v4{};
  if (::inet_pton(AF_INET, out.host.c_str(), &v4) != 1) {
    if (auto fqdn = crypto::validate_fqdn(out.host); !fqdn) return invalid("host: " + fqdn.error().message);
  }
  return out;
}

Result<SocketAddress> numeric_address(const std::string& host, std::uint16_t port) {
  // inet_pton, not getaddrinfo: only the canonical literals ("127.1" is not an address here), and never DNS.
  sockaddr_in v4{};
  sockaddr_in6 v6{};
  if (::inet_pton(AF_INET, host.c_str(), &v4.sin_addr) == 1) {
    v4.sin_family = AF_INET;
    v4.sin_port = htons(port);
    return socket_address(v4);
  }
  if (::inet_pton(AF_INET6, host.c_str(), &v6.sin6_addr) == 1) {
    v6.sin6_family = AF_INET6;
    v6.sin6_port = htons(port);
    return socket_address(v6);
  }
  return invalid("'" + host + "' is not a numeric IPv4 or IPv6 address (names are not resolved here)");
}

bool is_loopback(const sockaddr& address) noexcept {
  if (address.sa_family == AF_INET) {
    sockaddr_in v4{};
    std::memcpy(&v4, &address, sizeof v4);
    return (ntohl(v4.sin_addr.s_addr) >> 24) == 127;
  }
  if (address.sa_family == AF_INET6) {
    sockaddr_in6 v6{};
    std::memcpy(&v6, &address, sizeof v6);
    return IN6_IS_ADDR_LOOPBACK(&v6.sin6_addr);
  }
  return false;
}

bool is_loopback_ip(const std::string& host) {
  auto address = numeric_address(host, 0);
  return address.ok() && is_loopback(address->get());
}

std::string host_port_text(const std::string& host, std::uint16_t port) {
  return (is_ipv6_literal(host) ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

namespace {
std::uint16_t port_of(const SocketAddress& address) {
  if (address.family() == AF_INET) return ntohs(reinterpret_cast<const sockaddr_in*>(&address.storage)->sin_port);
  if (address.family() == AF_INET6) return ntohs(reinterpret_cast<const sockaddr_in6*>(&address.storage)->sin6_port);
  return 0;
}
}  // namespace

std::string address_text(const SocketAddress& address) {
  char host[INET6_ADDRSTRLEN] = "?";
  if (address.family() == AF_INET) {
    ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&address.storage)->sin_addr, host, sizeof host);
  } else {
    ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&address.storage)->sin6_addr, host, sizeof host);
  }
  return host_port_text(host, port_of(address));
}

// ---- exclusive UDP ports ------------------------------------------------------------------------------------------

namespace {

Error port_in_use(const std::string& by) {
  return make_error(Errc::exists, "UDP port in use by another socket" + by +
                                      " (another dauthd, a CoAP server?): choose another port or stop it");
}

// The IPv6 form of an address for comparing across families: an IPv4 address as ::ffff:a.b.c.d, 0.0.0.0 as ::.
in6_addr as_ipv6(const sockaddr_storage& storage) {
  in6_addr out{};
  if (storage.ss_family == AF_INET6) return reinterpret_cast<const sockaddr_in6*>(&storage)->sin6_addr;
  const in_addr v4 = reinterpret_cast<const sockaddr_in*>(&storage)->sin_addr;
  if (v4.s_addr == htonl(INADDR_ANY)) return in6addr_any;
  out.s6_addr[10] = 0xff;
  out.s6_addr[11] = 0xff;
  std::memcpy(&out.s6_addr[12], &v4, 4);
  return out;
}

// Two bound addresses (same port) that receive the same datagrams: the same address, or a wildcard on one side in
// that family. Only what is certain: an IPv4 socket and an IPv6 wildcard may or may not share (IPV6_V6ONLY, which
// /proc does not show), and the probe bind before libcoap's has judged those by the kernel's own rule.
bool same_datagrams(const sockaddr_storage& a, const sockaddr_storage& b) {
  const in6_addr x = as_ipv6(a);
  const in6_addr y = as_ipv6(b);
  if (std::memcmp(&x, &y, sizeof x) == 0) return true;
  if (a.ss_family != b.ss_family) return false;
  return IN6_IS_ADDR_UNSPECIFIED(&x) || IN6_IS_ADDR_UNSPECIFIED(&y);
}

bool same_bound_address(const sockaddr_storage& a, const SocketAddress& b) {
  if (a.ss_family != b.family()) return false;
  if (a.ss_family == AF_INET) {
    const auto* x = reinterpret_cast<const sockaddr_in*>(&a);
    const auto* y = reinterpret_cast<const sockaddr_in*>(&b.storage);
    return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
  }
  const auto* x = reinterpret_cast<const sockaddr_in6*>(&a);
  const auto* y = reinterpret_cast<const sockaddr_in6*>(&b.storage);
  return x->sin6_port == y->sin6_port && std::memcmp(&x->sin6_addr, &y->sin6_addr, sizeof x->sin6_addr) == 0;
}

struct ProcSocket {
  sockaddr_storage local{};
  std::uint16_t port = 0;
  unsigned long inode = 0;
};

// The UDP sockets of this network namespace from /proc/net/udp or udp6: local address as the kernel prints it
// (each 32-bit word of the address in host order, %08X; the port %04X), and the inode.
std::vector<ProcSocket> proc_udp_sockets(const char* path, int family) {
  std::vector<ProcSocket> out;
  std::ifstream file(path);
  std::string line;
  std::getline(file, line);  // header
  while (std::getline(file, line)) {
    std::istringstream fields(line);
    std::string slot, local, remote, state, queues, timer, retransmits, uid, timeout;
    unsigned long inode = 0;
    if (!(fields >> slot >> local >> remote >> state >> queues >> timer >> retransmits >> uid >> timeout >> inode)) {
      continue;
    }
    const auto colon = local.find(':');
    if (colon == std::string::npos) continue;
    ProcSocket socket;
    socket.inode = inode;
    socket.port = static_cast<std::uint16_t>(std::stoul(local.substr(colon + 1), nullptr, 16));
    socket.local.ss_family = static_cast<sa_family_t>(family);
    const std::string hex = local.substr(0, colon);
    if (family == AF_INET && hex.size() == 8) {
      auto* v4 = reinterpret_cast<sockaddr_in*>(&socket.local);
      v4->sin_addr.s_addr = static_cast<std::uint32_t>(std::stoul(hex, nullptr, 16));
    } else if (family == AF_INET6 && hex.size() == 32) {
      auto* v6 = reinterpret_cast<sockaddr_in6*>(&socket.local);
      for (int word = 0; word < 4; ++word) {
        const auto value = static_cast<std::uint32_t>(std::stoul(hex.substr(8 * word, 8), nullptr, 16));
        std::memcpy(&v6->sin6_addr.s6_addr[4 * word], &value, 4);
      }
    } else {
      continue;
    }
    out.push_back(socket);
  }
  return out;
}

}  // namespace

Result<void> check_udp_port_free(const SocketAddress& address) {
  if (port_of(address) == 0) return ok_result();
  UniqueFd probe(::socket(address.family(), SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!probe.valid()) return make_error(Errc::io, "socket(): " + std::string(std::strerror(errno)));
  if (address.family() == AF_INET6) {
    const int off = 0;  // dual-stack, like libcoap's endpoint: an IPv4 socket on the port counts too
    (void)::setsockopt(probe.get(), IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
  }
  if (::bind(probe.get(), &address.get(), address.length) == 0) return ok_result();
  if (errno == EADDRINUSE) return port_in_use("");
  return make_error(Errc::io, std::string("bind: ") + std::strerror(errno));
}

Result<void> make_udp_port_exclusive(const SocketAddress& bound) {
  // Our socket: libcoap 4.3.1 has no getter for an endpoint's descriptor, so find the UDP socket of this process
  // bound to exactly this address.
  std::vector<unsigned long> ours;
  // An IPv6 wildcard without IPV6_V6ONLY (libcoap 4.3.1's endpoints are dual-stack) also receives IPv4 datagrams:
  // then any IPv4 socket on the port is a sharer, which same_datagrams() cannot tell from /proc alone.
  bool dual_stack_wildcard = false;
  struct CloseDir {
    void operator()(DIR* dir) const { ::closedir(dir); }
  };
  std::unique_ptr<DIR, CloseDir> fds(::opendir("/proc/self/fd"));
  if (!fds) return make_error(Errc::internal, std::string("/proc/self/fd: ") + std::strerror(errno));
  while (const dirent* entry = ::readdir(fds.get())) {
    const int fd = std::atoi(entry->d_name);
    if (entry->d_name[0] == '.' || fd == ::dirfd(fds.get())) continue;
    struct stat st {};
    int type = 0;
    socklen_t type_length = sizeof type;
    sockaddr_storage local{};
    socklen_t local_length = sizeof local;
    if (::fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode) ||
        ::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_length) != 0 || type != SOCK_DGRAM ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_length) != 0 ||
        !same_bound_address(local, bound)) {
      continue;
    }
    const int off = 0;
    if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &off, sizeof off) != 0) {
      return make_error(Errc::internal, std::string("clearing SO_REUSEADDR: ") + std::strerror(errno));
    }
    ours.push_back(static_cast<unsigned long>(st.st_ino));
    if (local.ss_family == AF_INET6 &&
        IN6_IS_ADDR_UNSPECIFIED(&reinterpret_cast<const sockaddr_in6*>(&local)->sin6_addr)) {
      int v6_only = 1;
      socklen_t v6_only_length = sizeof v6_only;
      dual_stack_wildcard =
          ::getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6_only, &v6_only_length) == 0 && v6_only == 0;
    }
  }
  if (ours.empty()) {
    return make_error(Errc::internal, "the endpoint's socket is not among this process's");
  }
  if (ours.size() > 1) return port_in_use(" of this process");
  // From here no socket can join us (ours no longer sets SO_REUSEADDR); one that did before shows up here.
  const std::uint16_t port = port_of(bound);
  // /proc/self/net, not /proc/net: the unit's ProcSubset=pid hides the latter.
  for (const auto& [path, family] :
       {std::pair{"/proc/self/net/udp", AF_INET}, std::pair{"/proc/self/net/udp6", AF_INET6}}) {
    for (const ProcSocket& socket : proc_udp_sockets(path, family)) {
      if (socket.port != port || socket.inode == ours.front()) continue;
      if (same_datagrams(socket.local, bound.storage) || (dual_stack_wildcard && family == AF_INET)) {
        return port_in_use(" (socket inode " + std::to_string(socket.inode) + ")");
      }
    }
  }
  return ok_result();
}

}  // namespace dauth::transport

#include "dauth/transport/address.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cstring>

#include "dauth/crypto/identifiers.hpp"

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

}  // namespace dauth::transport

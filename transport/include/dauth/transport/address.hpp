// Network addresses as dauth reads them: the one "host:port" parser (configuration, the roles, the sessions'
// remote text, the test relay) and the one loopback rule (local AEs speak plain CoAP, which must never leave the
// host: docs/PROTOCOL.md §6). Nothing here resolves a name: no blocking DNS.
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "dauth/error.hpp"

namespace dauth::transport {

struct HostPort {
  std::string host;  // an IPv4 or IPv6 literal (without brackets) or a host name (checked as an FQDN)
  std::uint16_t port = 0;
};

// Port 0 asks the kernel for a free port when binding; anywhere else it is a mistake.
enum class PortZero { refused, allowed };

// "127.0.0.1:5684", "[::1]:5684" or "mef.example.net:5685": an IPv6 literal only in brackets (and nothing else in
// them), any other host without; the port 1–65535 in decimal (0–65535 with PortZero::allowed). Errc::invalid_argument
// saying what is wrong and what is allowed, without quoting text (the caller names the value and where it is from).
Result<HostPort> parse_host_port(std::string_view text, PortZero port_zero = PortZero::refused);

// The inverse of parse_host_port for an IP literal: "127.0.0.1:5684", "[::1]:5684" (Session::remote_address's form).
std::string host_port_text(const std::string& host, std::uint16_t port);

// An IPv4 or IPv6 literal and a port, as the socket API takes it.
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;

  const sockaddr& get() const noexcept { return *reinterpret_cast<const sockaddr*>(&storage); }
  int family() const noexcept { return storage.ss_family; }
};

// Errc::invalid_argument when host is not a numeric IPv4 or IPv6 address (names are not resolved here).
Result<SocketAddress> numeric_address(const std::string& host, std::uint16_t port);

// 127.0.0.0/8 or ::1. Any other address, and any other family, is not.
bool is_loopback(const sockaddr& address) noexcept;
// The same for an IP literal ("127.0.0.2", "::1"); false for anything that is not one.
bool is_loopback_ip(const std::string& host);

// "127.0.0.1:5684", "[::1]:5684": the address as dauth writes it in messages.
std::string address_text(const SocketAddress& address);

// ---- exclusive UDP ports (docs/transport.md §3, "Exclusive ports") ----
// libcoap 4.3.1 sets SO_REUSEADDR on every UDP endpoint it binds, and Linux lets any number of sockets that all set
// it share a UDP port, each getting some of the datagrams. dauth's endpoints are exclusive: bind_exclusively() is
// the only way transport binds one, and --check-config asks check_udp_port_free() the same question.

// Whether a UDP socket could bind `address` alone right now: a probe bind without SO_REUSEADDR (an IPv6 one
// dual-stack, as libcoap binds it), which fails against any socket holding the port, with or without
// SO_REUSEADDR. Errc::exists "UDP port in use by another socket ..." when one does; Errc::io for other bind errors
// (an address this host does not have). Port 0 is always free. Messages do not repeat the address: callers name it.
Result<void> check_udp_port_free(const SocketAddress& address);

// After libcoap bound `bound` (its port resolved): clears SO_REUSEADDR on this process's UDP socket bound there, so
// that no socket binds the port from now on, then checks that none did before (/proc/net/udp and udp6: the short
// window between check_udp_port_free() and libcoap's bind, where another socket setting SO_REUSEADDR, e.g. a
// second dauthd starting at the same moment, could have joined). Errc::exists when another socket shares the port;
// Errc::internal when our own socket is not found.
Result<void> make_udp_port_exclusive(const SocketAddress& bound);

}  // namespace dauth::transport

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

}  // namespace dauth::transport

// A node's UDP ports are its own (docs/transport.md §3, "Exclusive ports"): libcoap 4.3.1 binds its endpoints with
// SO_REUSEADDR, and Linux lets every socket that sets it share the port, each getting some of the datagrams. Real
// sockets on real ports: a plain socket with and without SO_REUSEADDR, and the stock coap-server-gnutls.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <thread>

#include "dauth/transport/address.hpp"
#include "dauth/unique_fd.hpp"
#include "loopback_ports.hpp"
#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

// A UDP socket on 127.0.0.1:port, with or without SO_REUSEADDR (libcoap's own endpoints set it); invalid if the
// bind fails.
UniqueFd udp_socket(std::uint16_t port, bool reuse_address) {
  UniqueFd fd(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  REQUIRE(fd.valid());
  const int on = reuse_address ? 1 : 0;
  REQUIRE(::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) == 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(port);
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) return UniqueFd();
  return fd;
}

transport::NodeConfig psk_server_config() {
  transport::NodeConfig config;
  config.secure_addresses = {"127.0.0.1"};
  config.psk_lookup = psk_table({{"CAE-alpha", "exclusive-port-psk-0123456789abcdef"}});
  return config;
}

Result<std::unique_ptr<transport::Node>> server_on(std::uint16_t port) {
  auto config = psk_server_config();
  config.secure_port = port;
  return transport::Node::create(std::move(config));
}

void require_port_in_use(const Result<std::unique_ptr<transport::Node>>& node, const std::string& url) {
  REQUIRE_FALSE(node.ok());
  CHECK(node.error().code == Errc::exists);
  CHECK_THAT(node.error().message, Catch::Contains("cannot listen on " + url) &&
                                       Catch::Contains("port in use by another socket"));
}

}  // namespace

TEST_CASE("exclusive port: a port held by a socket without SO_REUSEADDR is refused naming the address") {
  const std::uint16_t port = free_loopback_port();
  const UniqueFd holder = udp_socket(port, false);
  REQUIRE(holder.valid());
  require_port_in_use(server_on(port), "coaps://127.0.0.1:" + std::to_string(port));
}

TEST_CASE("exclusive port: a port held by a socket with SO_REUSEADDR is refused too (libcoap alone would share it)") {
  const std::uint16_t port = free_loopback_port();
  const UniqueFd holder = udp_socket(port, true);
  REQUIRE(holder.valid());
  require_port_in_use(server_on(port), "coaps://127.0.0.1:" + std::to_string(port));
  // The plain local endpoint in the same way.
  transport::NodeConfig local;
  local.local_address = "127.0.0.1";
  local.local_port = port;
  require_port_in_use(transport::Node::create(std::move(local)), "coap://127.0.0.1:" + std::to_string(port));
}

TEST_CASE("exclusive port: once a node listens no socket can join its port even with SO_REUSEADDR") {
  const std::uint16_t port = free_loopback_port();
  auto node = server_on(port);
  REQUIRE(node.ok());
  CHECK((*node)->secure_port() == port);
  CHECK_FALSE(udp_socket(port, true).valid());
  CHECK_FALSE(udp_socket(port, false).valid());
  // The question --check-config asks, on the same port.
  auto address = transport::numeric_address("127.0.0.1", port);
  REQUIRE(address.ok());
  const auto free = transport::check_udp_port_free(*address);
  REQUIRE_FALSE(free.ok());
  CHECK(free.error().code == Errc::exists);
  // Gone with the node: the port is free again.
  node->reset();
  CHECK(transport::check_udp_port_free(*address).ok());
  CHECK(udp_socket(port, false).valid());
}

TEST_CASE("exclusive port: ephemeral ports and two nodes on different ports still work") {
  auto first = server_on(0);
  auto second = server_on(0);
  REQUIRE(first.ok());
  REQUIRE(second.ok());
  CHECK((*first)->secure_port() != (*second)->secure_port());
  // A second node on the first one's port is refused in this process as well.
  require_port_in_use(server_on((*first)->secure_port()),
                      "coaps://127.0.0.1:" + std::to_string((*first)->secure_port()));
}

TEST_CASE("exclusive port: the stock coap-server-gnutls on the port is refused") {
  if (!have_program("coap-server-gnutls")) {
    WARN("coap-server-gnutls not installed (libcoap3-bin): skipped");
    return;
  }
  const std::uint16_t port = free_loopback_port(PortUse::udp_and_tcp);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::execlp("coap-server-gnutls", "coap-server-gnutls", "-A", "127.0.0.1", "-p", std::to_string(port).c_str(),
             static_cast<char*>(nullptr));
    ::_exit(127);
  }
  auto address = transport::numeric_address("127.0.0.1", port);
  REQUIRE(address.ok());
  // Bound when the probe no longer gets the port (an upper bound on waiting, not a timed assertion).
  for (int i = 0; i < 200 && transport::check_udp_port_free(*address).ok(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  auto node = server_on(port);
  ::kill(child, SIGTERM);
  ::waitpid(child, nullptr, 0);
  require_port_in_use(node, "coaps://127.0.0.1:" + std::to_string(port));
}

TEST_CASE("exclusive port: a socket of another process that joined before SO_REUSEADDR was cleared is found") {
  // The window between the probe bind and libcoap's: ours and another process's socket both set SO_REUSEADDR.
  const std::uint16_t port = free_loopback_port();
  const UniqueFd ours = udp_socket(port, true);
  REQUIRE(ours.valid());
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    const UniqueFd joined = udp_socket(port, true);
    const char bound = joined.valid() ? 'y' : 'n';
    if (::write(ready[1], &bound, 1) != 1) ::_exit(1);
    ::pause();
    ::_exit(0);
  }
  ::close(ready[1]);
  char bound = 0;
  REQUIRE(::read(ready[0], &bound, 1) == 1);
  ::close(ready[0]);
  auto address = transport::numeric_address("127.0.0.1", port);
  REQUIRE(address.ok());
  const auto exclusive = transport::make_udp_port_exclusive(*address);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  REQUIRE(bound == 'y');
  REQUIRE_FALSE(exclusive.ok());
  CHECK(exclusive.error().code == Errc::exists);
  CHECK_THAT(exclusive.error().message, Catch::Contains("port in use by another socket"));
  // Alone on the port it is ours, and from now on no one joins.
  REQUIRE(transport::make_udp_port_exclusive(*address).ok());
  CHECK_FALSE(udp_socket(port, true).valid());
}

TEST_CASE("exclusive port: an IPv4 socket that joined a dual-stack [::] endpoint's port is found") {
  // [::] without IPV6_V6ONLY (as libcoap binds) gets IPv4 datagrams too; an IPv4 socket that set SO_REUSEADDR in the
  // window before ours cleared it takes those addressed to 127.0.0.1 (review of issue 15: /proc alone missed it).
  const std::uint16_t port = free_loopback_port();
  UniqueFd ours(::socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  REQUIRE(ours.valid());
  const int on = 1;
  const int off = 0;
  REQUIRE(::setsockopt(ours.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) == 0);
  REQUIRE(::setsockopt(ours.get(), IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off) == 0);
  sockaddr_in6 wildcard{};
  wildcard.sin6_family = AF_INET6;
  wildcard.sin6_addr = in6addr_any;
  wildcard.sin6_port = htons(port);
  REQUIRE(::bind(ours.get(), reinterpret_cast<const sockaddr*>(&wildcard), sizeof wildcard) == 0);
  const UniqueFd joined = udp_socket(port, true);
  REQUIRE(joined.valid());
  auto address = transport::numeric_address("::", port);
  REQUIRE(address.ok());
  const auto exclusive = transport::make_udp_port_exclusive(*address);
  REQUIRE_FALSE(exclusive.ok());
  CHECK(exclusive.error().code == Errc::exists);
  CHECK_THAT(exclusive.error().message, Catch::Contains("port in use by another socket"));
}

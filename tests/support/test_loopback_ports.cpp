// free_loopback_ports(): ports outside the ephemeral range, bindable when handed out, never shared between two
// processes that run at the same time. Real sockets, a real second process.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <fstream>
#include <set>
#include <vector>

#include "loopback_ports.hpp"

using dauth::test::free_loopback_port;
using dauth::test::free_loopback_ports;
using dauth::test::PortUse;

namespace {

bool binds(std::uint16_t port, int type) {
  const int fd = ::socket(AF_INET, type | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(port);
  const bool bound = ::bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0;
  ::close(fd);
  return bound;
}

std::uint32_t ephemeral_first() {
  std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range");
  std::uint32_t first = 0;
  REQUIRE(range >> first);
  return first;
}

// More ports than one block holds, so that a second block is claimed too.
constexpr int kManyPorts = 40;

std::vector<std::uint16_t> take_many() {
  std::vector<std::uint16_t> ports;
  for (int i = 0; i < kManyPorts; ++i) ports.push_back(free_loopback_port());
  return ports;
}

}  // namespace

TEST_CASE("loopback ports lie below the ephemeral range and are bindable when handed out") {
  const auto first_ephemeral = ephemeral_first();
  std::set<std::uint16_t> seen;
  for (int i = 0; i < kManyPorts; ++i) {
    const auto udp = free_loopback_port();
    const auto both = free_loopback_port(PortUse::udp_and_tcp);
    for (const auto port : {udp, both}) {
      CHECK(port >= 20000);
      CHECK(port < first_ephemeral);
      CHECK(seen.insert(port).second);  // never the same port twice in one process
    }
    CHECK(binds(udp, SOCK_DGRAM));
    CHECK(binds(both, SOCK_DGRAM));
    CHECK(binds(both, SOCK_STREAM));
  }
}

TEST_CASE("consecutive loopback ports are bindable together") {
  const auto first = free_loopback_ports(2, PortUse::udp_and_tcp);
  for (const auto port : {first, static_cast<std::uint16_t>(first + 1)}) {
    CHECK(binds(port, SOCK_DGRAM));
    CHECK(binds(port, SOCK_STREAM));
  }
  CHECK(free_loopback_port() > first + 1);
}

TEST_CASE("a port taken by someone else is not handed out") {
  // Learn where this process hands out next, occupy the following port, and see it skipped.
  const auto probe = free_loopback_port();
  const auto occupied = static_cast<std::uint16_t>(probe + 1);
  const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(occupied);
  const bool bound = ::bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0;
  const auto next = free_loopback_port();
  ::close(fd);
  if (!bound) {
    WARN("port " << occupied << " was taken already; nothing to check");
    return;
  }
  CHECK(next != occupied);
}

TEST_CASE("two processes running at the same time never get the same loopback port") {
  const auto before = take_many();  // this process holds its blocks from here on
  int to_parent[2];
  int to_child[2];
  REQUIRE(::pipe(to_parent) == 0);
  REQUIRE(::pipe(to_child) == 0);
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    ::close(to_parent[0]);
    ::close(to_child[1]);
    const auto ports = take_many();
    const auto size = static_cast<ssize_t>(ports.size() * sizeof ports[0]);
    const bool written = ::write(to_parent[1], ports.data(), static_cast<std::size_t>(size)) == size;
    char done = 0;
    // Holds its blocks until the parent has taken its second set (or is gone: then read returns 0).
    const bool waited = ::read(to_child[0], &done, 1) >= 0;
    ::_exit(written && waited ? 0 : 1);
  }
  ::close(to_parent[1]);
  ::close(to_child[0]);
  std::vector<std::uint16_t> theirs(kManyPorts);
  const auto size = static_cast<ssize_t>(theirs.size() * sizeof theirs[0]);
  const bool received = ::read(to_parent[0], theirs.data(), static_cast<std::size_t>(size)) == size;
  const auto after = take_many();
  ::close(to_child[1]);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  ::close(to_parent[0]);
  REQUIRE(received);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);

  std::set<std::uint16_t> ours(before.begin(), before.end());
  ours.insert(after.begin(), after.end());
  CHECK(ours.size() == 2 * kManyPorts);
  for (const auto port : theirs) {
    INFO("port " << port);
    CHECK(ours.count(port) == 0);
  }
}

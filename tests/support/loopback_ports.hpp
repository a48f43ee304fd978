// Loopback ports for tests and benchmarks that must name a port before the process that binds it runs (a dauthd
// configuration, `coap-server -p`, a server restarted on the same port). Binding port 0 and closing it again races:
// that number comes from the kernel's ephemeral range, where any outgoing socket of a parallel test may take it
// before the real bind. These come from below that range, from blocks that one process claims for its lifetime
// (README.md, "Tests"). A server that binds in this process and reports its port may still bind port 0.
#pragma once

#include <cstdint>

namespace dauth::test {

enum class PortUse {
  udp,          // dauthd, transport::Node
  udp_and_tcp,  // the stock coap-server-* tools listen on both
};

// The first of `count` consecutive ports on 127.0.0.1, each bindable right now for `use`, from a block of ports
// no other process using this allocator is handed; never the same port twice in one process. Thread-safe. Throws
// std::runtime_error when every block is taken.
std::uint16_t free_loopback_ports(int count, PortUse use = PortUse::udp);
inline std::uint16_t free_loopback_port(PortUse use = PortUse::udp) { return free_loopback_ports(1, use); }

}  // namespace dauth::test

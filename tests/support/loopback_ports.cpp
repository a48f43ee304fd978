#include "loopback_ports.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dauth::test {

namespace {

// Below Linux's default ephemeral range (32768-60999), above the ports most services register, and below the
// demo's defaults (scripts/demo.d/run, 25680-25685). The end moves down when /proc/sys/net/ipv4/
// ip_local_port_range starts lower.
constexpr std::uint32_t kRangeFirst = 20000;
constexpr std::uint32_t kRangeEnd = 25600;
// Port 0 of a block is its claim: a UDP socket bound there for the process's lifetime. The kernel makes that bind
// exclusive across all processes and releases it however the process ends (SIGKILL included), with no lock files.
constexpr std::uint32_t kBlockSize = 32;

class UniqueFd {
 public:
  explicit UniqueFd(int fd) : fd_(fd) {}
  ~UniqueFd() {
    if (fd_ >= 0) ::close(fd_);
  }
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&&) = delete;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// A socket of `type` bound to 127.0.0.1:port, or an invalid one if the port is taken. No SO_REUSEADDR: a bind
// that succeeds here is one nobody else holds (libcoap's own sockets set it, which does not let them share a port
// with a socket that did not).
UniqueFd bound_socket(std::uint32_t port, int type) {
  UniqueFd fd(::socket(AF_INET, type | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) throw std::runtime_error("loopback ports: socket() failed");
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(static_cast<std::uint16_t>(port));
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) return UniqueFd(-1);
  return fd;
}

bool bindable(std::uint32_t port, PortUse use) {
  if (bound_socket(port, SOCK_DGRAM).get() < 0) return false;
  return use == PortUse::udp || bound_socket(port, SOCK_STREAM).get() >= 0;
}

std::uint32_t ephemeral_first() {
  std::ifstream range("/proc/sys/net/ipv4/ip_local_port_range");
  std::uint32_t first = 0;
  return range >> first ? first : kRangeEnd;
}

class Allocator {
 public:
  std::uint16_t take(int count, PortUse use) {
    if (count < 1 || static_cast<std::uint32_t>(count) >= kBlockSize) {
      throw std::invalid_argument("loopback ports: count must be 1-" + std::to_string(kBlockSize - 1));
    }
    const auto wanted = static_cast<std::uint32_t>(count);
    std::lock_guard<std::mutex> lock(mutex_);
    if (owner_ != ::getpid()) {  // a forked child: its parent's blocks are not its own
      claims_.clear();
      next_ = end_ = 0;
      owner_ = ::getpid();
    }
    for (;;) {
      for (; next_ + wanted <= end_; ++next_) {
        bool all = true;
        for (std::uint32_t port = next_; all && port < next_ + wanted; ++port) all = bindable(port, use);
        if (all) {
          const auto first = next_;
          next_ += wanted;
          return static_cast<std::uint16_t>(first);
        }
      }
      claim_block();
    }
  }

 private:
  void claim_block() {
    const std::uint32_t end = std::min(kRangeEnd, ephemeral_first());
    if (end < kRangeFirst + kBlockSize) {
      throw std::runtime_error("loopback ports: the ephemeral range starts at " + std::to_string(end) +
                               ", no room for test ports from " + std::to_string(kRangeFirst));
    }
    const std::uint32_t blocks = (end - kRangeFirst) / kBlockSize;
    // Parallel processes start at different blocks, so that they seldom try the same claim.
    if (claims_.empty()) cursor_ = static_cast<std::uint32_t>(::getpid()) % blocks;
    for (std::uint32_t tried = 0; tried < blocks; ++tried, cursor_ = (cursor_ + 1) % blocks) {
      const std::uint32_t first = kRangeFirst + cursor_ * kBlockSize;
      UniqueFd claim = bound_socket(first, SOCK_DGRAM);
      if (claim.get() < 0) continue;  // this process's block already, another's, or someone else's port
      claims_.push_back(std::move(claim));
      next_ = first + 1;
      end_ = first + kBlockSize;
      return;
    }
    throw std::runtime_error("loopback ports: every block of " + std::to_string(kBlockSize) + " ports in " +
                             std::to_string(kRangeFirst) + "-" + std::to_string(end - 1) + " is taken");
  }

  std::mutex mutex_;
  pid_t owner_ = ::getpid();
  std::vector<UniqueFd> claims_;  // held until the process exits
  std::uint32_t cursor_ = 0;
  std::uint32_t next_ = 0;  // the current block's ports not yet handed out: [next_, end_)
  std::uint32_t end_ = 0;
};

}  // namespace

std::uint16_t free_loopback_ports(int count, PortUse use) {
  static Allocator allocator;  // one per process, its claims released only at exit
  return allocator.take(count, use);
}

}  // namespace dauth::test

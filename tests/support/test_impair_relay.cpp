// dauth_impair_relay through ImpairRelay: real UDP sockets on 127.0.0.1, a UDP echo server in a thread and the
// relay as a child process. Counts are checked against binomial bounds and, for a fixed seed, exactly; time only
// as a lower bound (a delay); waits have generous limits that only turn a hang into a failure.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "dauth/transport/address.hpp"
#include "dauth/unique_fd.hpp"
#include "impair_relay_process.hpp"
#include "support.hpp"

namespace {

using dauth::test::DirectionImpairment;
using dauth::test::ImpairProfile;
using dauth::test::ImpairRelay;
using Stats = std::map<std::string, std::uint64_t>;

constexpr std::chrono::seconds kHangLimit{10};
// Datagrams sent before waiting for them all to be decided: small enough for the sockets' buffers.
constexpr int kBatch = 50;

// A UDP socket bound to 127.0.0.1 on a free port; closed on destruction.
class UdpSocket {
 public:
  UdpSocket() : fd_(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)) {
    sockaddr_in address = loopback(0);
    if (!fd_.valid() || ::bind(fd_.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
      const std::string reason = std::strerror(errno);
      throw std::runtime_error("UDP socket on 127.0.0.1: " + reason);
    }
  }
  UdpSocket(const UdpSocket&) = delete;
  UdpSocket& operator=(const UdpSocket&) = delete;

  std::uint16_t port() const {
    sockaddr_in address{};
    socklen_t length = sizeof address;
    ::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&address), &length);
    return ntohs(address.sin_port);
  }

  void send_to(std::uint16_t port, const std::string& payload) const {
    const sockaddr_in address = loopback(port);
    if (::sendto(fd_.get(), payload.data(), payload.size(), 0, reinterpret_cast<const sockaddr*>(&address),
                 sizeof address) != static_cast<ssize_t>(payload.size())) {
      throw std::runtime_error("sendto 127.0.0.1:" + std::to_string(port) + ": " + std::strerror(errno));
    }
  }

  // The next datagram and its source port, or nullopt when none arrives within `limit`.
  std::optional<std::pair<std::string, std::uint16_t>> receive(std::chrono::milliseconds limit) const {
    pollfd ready{fd_.get(), POLLIN, 0};
    if (::poll(&ready, 1, static_cast<int>(limit.count())) <= 0) return std::nullopt;
    char buffer[65536];
    sockaddr_in from{};
    socklen_t length = sizeof from;
    const ssize_t size =
        ::recvfrom(fd_.get(), buffer, sizeof buffer, MSG_DONTWAIT, reinterpret_cast<sockaddr*>(&from), &length);
    if (size < 0) return std::nullopt;
    return std::make_pair(std::string(buffer, static_cast<std::size_t>(size)), ntohs(from.sin_port));
  }

 private:
  static sockaddr_in loopback(std::uint16_t port) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    address.sin_port = htons(port);
    return address;
  }

  dauth::UniqueFd fd_;
};

// Echoes every datagram to its sender from a thread, and records which source ports it came from.
class EchoServer {
 public:
  EchoServer() : thread_([this] { serve(); }) {}
  ~EchoServer() {
    stop_ = true;
    thread_.join();
  }
  EchoServer(const EchoServer&) = delete;
  EchoServer& operator=(const EchoServer&) = delete;

  std::uint16_t port() const { return socket_.port(); }
  std::uint64_t echoed() const { return echoed_; }
  // Source ports in the order their first datagram arrived.
  std::vector<std::uint16_t> sources() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return sources_;
  }
  // Sends from the server's own socket (safe beside the echo thread: sendto on one socket is thread-safe).
  void send_to(std::uint16_t port, const std::string& payload) const { socket_.send_to(port, payload); }

 private:
  void serve() {
    while (!stop_) {
      const auto datagram = socket_.receive(std::chrono::milliseconds(20));
      if (!datagram) continue;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (std::find(sources_.begin(), sources_.end(), datagram->second) == sources_.end()) {
          sources_.push_back(datagram->second);
        }
      }
      socket_.send_to(datagram->second, datagram->first);
      ++echoed_;
    }
  }

  UdpSocket socket_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> echoed_{0};
  mutable std::mutex mutex_;
  std::vector<std::uint16_t> sources_;
  std::thread thread_;  // last: starts after every member it uses exists
};

std::string numbered(int number) { return "n=" + std::to_string(number); }
int number_of(const std::string& payload) { return std::stoi(payload.substr(2)); }

std::string stats_text(const Stats& stats) {
  std::string text;
  for (const auto& [key, value] : stats) text += key + "=" + std::to_string(value) + " ";
  return text;
}

// Polls `done` until it holds; fails the test after kHangLimit, with the relay's last counters when given.
void wait_until(const std::string& what, const std::function<bool()>& done, const Stats* last_stats = nullptr) {
  const auto deadline = std::chrono::steady_clock::now() + kHangLimit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) {
      FAIL("no " << what << " within " << kHangLimit.count() << " s"
                 << (last_stats ? "; relay: " + stats_text(*last_stats) : std::string()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// Waits until the relay has exited (a zombie until ImpairRelay reaps it), so that a command sent next cannot
// race with its exit.
void wait_for_exit(const ImpairRelay& relay) {
  const std::string stat_file = "/proc/" + std::to_string(relay.pid()) + "/stat";
  wait_until("the relay to exit",
             [&] { return dauth::test::read_text_file(stat_file).find(") Z ") != std::string::npos; });
}

// Sends datagrams 0..count-1 through the relay in batches; after each batch waits until the relay has decided
// every datagram both ways and every survivor has reached the client. So each direction sees the same sequence
// of datagrams in every run, whatever the timing: the condition for identical decisions from one seed.
// Returns the numbers in the order the client received them.
std::vector<int> exchange_numbered(ImpairRelay& relay, const EchoServer& server, const UdpSocket& client, int count) {
  std::vector<int> received;
  for (int first = 0; first < count; first += kBatch) {
    const int end = std::min(first + kBatch, count);
    for (int number = first; number < end; ++number) client.send_to(relay.port(), numbered(number));
    Stats stats;
    wait_until(
        "settled batch " + std::to_string(first) + ".." + std::to_string(end - 1),
        [&] {
          while (const auto datagram = client.receive(std::chrono::milliseconds(0))) {
            received.push_back(number_of(datagram->first));
          }
          stats = relay.stats();
          const std::uint64_t echoed = server.echoed();
          return stats["up_received"] == static_cast<std::uint64_t>(end) && stats["queued"] == 0 &&
                 echoed == stats["up_sent"] && stats["down_received"] == echoed &&
                 received.size() == stats["down_sent"];
        },
        &stats);
  }
  return received;
}

// One fresh echo server, relay and client; the numbers that came back.
std::set<int> delivered(std::uint64_t seed, const ImpairProfile& profile, int count) {
  EchoServer server;
  ImpairRelay relay(server.port(), seed, profile);
  UdpSocket client;
  const std::vector<int> received = exchange_numbered(relay, server, client, count);
  return std::set<int>(received.begin(), received.end());
}

}  // namespace

TEST_CASE("an unimpaired relay forwards every datagram in order", "[relay]") {
  EchoServer server;
  ImpairRelay relay(server.port(), 1, ImpairProfile::none());
  UdpSocket client;
  const std::vector<int> received = exchange_numbered(relay, server, client, 200);
  std::vector<int> expected(200);
  for (int i = 0; i < 200; ++i) expected[static_cast<std::size_t>(i)] = i;
  CHECK(received == expected);
  Stats stats = relay.stats();
  CHECK(stats["up_sent"] == 200);
  CHECK(stats["down_sent"] == 200);
  CHECK(stats["clients"] == 1);
  CHECK(server.sources().size() == 1);
}

TEST_CASE("independent loss stays within a binomial bound and repeats exactly for a seed", "[relay]") {
  constexpr int kCount = 2000;
  // Loss 0.2 each way: a round trip survives with 0.8 × 0.8 = 0.64; its standard deviation over 2000 datagrams
  // is 0.011, so ± 0.05 is more than 4 of them.
  const ImpairProfile profile = ImpairProfile::lossy(0.2, 0, 0);
  const std::set<int> first = delivered(42, profile, kCount);
  const double fraction = static_cast<double>(first.size()) / kCount;
  INFO("delivered fraction " << fraction);
  CHECK(fraction > 0.59);
  CHECK(fraction < 0.69);
  CHECK(delivered(42, profile, kCount) == first);
  CHECK(delivered(43, profile, kCount) != first);
}

TEST_CASE("Gilbert-Elliott loss keeps its average and comes in bursts", "[relay]") {
  constexpr int kCount = 2000;
  // Up only, so that every gap in the returned numbers is one burst of the up direction's chain.
  ImpairProfile profile;
  profile.up = ImpairProfile::bursty(0.2, 4).up;
  EchoServer server;
  ImpairRelay relay(server.port(), 7, profile);
  UdpSocket client;
  const std::vector<int> received = exchange_numbered(relay, server, client, kCount);
  const std::set<int> arrived(received.begin(), received.end());
  std::vector<int> bursts;
  int run = 0;
  for (int number = 0; number < kCount; ++number) {
    if (arrived.count(number) == 0) {
      ++run;
    } else if (run > 0) {
      bursts.push_back(run);
      run = 0;
    }
  }
  if (run > 0) bursts.push_back(run);
  const double loss = 1.0 - static_cast<double>(arrived.size()) / kCount;
  double mean_burst = 0;
  for (const int burst : bursts) mean_burst += burst;
  mean_burst /= static_cast<double>(std::max<std::size_t>(bursts.size(), 1));
  INFO("loss " << loss << " in " << bursts.size() << " bursts, mean burst " << mean_burst);
  // About 100 bursts of geometric length (mean 4, variance 12): the loss varies by about 0.03, the mean burst
  // by about 0.35; the bounds are more than 2.5 times wider.
  CHECK(loss > 0.12);
  CHECK(loss < 0.28);
  CHECK(mean_burst > 2);
  Stats stats = relay.stats();
  CHECK(stats["up_dropped_loss"] == kCount - arrived.size());
  CHECK(stats["down_dropped_loss"] == 0);
}

TEST_CASE("mtu drops IPv4 payloads larger than the path MTU minus 28 bytes", "[relay]") {
  EchoServer server;
  ImpairProfile profile;
  profile.up.mtu = 576;
  profile.down.mtu = 576;
  ImpairRelay relay(server.port(), 1, profile);
  UdpSocket client;
  const std::string largest(548, 'a');
  client.send_to(relay.port(), largest);
  const auto back = client.receive(kHangLimit);
  REQUIRE(back);
  CHECK(back->first == largest);

  client.send_to(relay.port(), std::string(549, 'b'));
  Stats stats;
  wait_until("second datagram at the relay", [&] {
    stats = relay.stats();
    return stats["up_received"] == 2;
  });
  CHECK(stats["up_dropped_mtu"] == 1);
  CHECK(stats["up_sent"] == 1);
  CHECK(stats["down_sent"] == 1);
}

TEST_CASE("delay holds each direction back", "[relay]") {
  EchoServer server;
  ImpairRelay relay(server.port(), 1, ImpairProfile::lossy(0, 50, 0));
  UdpSocket client;
  const auto start = std::chrono::steady_clock::now();
  client.send_to(relay.port(), "ping");
  const auto back = client.receive(kHangLimit);
  const auto round_trip = std::chrono::steady_clock::now() - start;
  REQUIRE(back);
  CHECK(back->first == "ping");
  CHECK(round_trip >= std::chrono::milliseconds(100));
}

TEST_CASE("partition drops everything until it is turned off", "[relay]") {
  EchoServer server;
  UdpSocket client;

  SECTION("datagrams that arrive during the partition") {
    ImpairRelay relay(server.port(), 1, ImpairProfile::none());
    relay.partition(true);
    for (int number = 0; number < 5; ++number) client.send_to(relay.port(), numbered(number));
    Stats stats;
    wait_until("5 datagrams at the relay", [&] {
      stats = relay.stats();
      return stats["up_received"] == 5;
    });
    CHECK(stats["up_dropped_partition"] == 5);
    CHECK(stats["partition"] == 1);
    CHECK_FALSE(client.receive(std::chrono::milliseconds(100)));
    CHECK(server.echoed() == 0);

    relay.partition(false);
    client.send_to(relay.port(), "after");
    const auto back = client.receive(kHangLimit);
    REQUIRE(back);
    CHECK(back->first == "after");
  }

  SECTION("datagrams already delayed in the relay") {
    ImpairRelay relay(server.port(), 1, ImpairProfile::lossy(0, 200, 0));
    client.send_to(relay.port(), "on the way");
    Stats stats;
    wait_until("the datagram at the relay", [&] {
      stats = relay.stats();
      return stats["up_received"] == 1;
    });
    relay.partition(true);
    wait_until("the delay to pass", [&] {
      stats = relay.stats();
      return stats["queued"] == 0;
    });
    CHECK(stats["up_dropped_partition"] == 1);
    CHECK(stats["up_sent"] == 0);
    CHECK(server.echoed() == 0);
  }
}

TEST_CASE("rebind gives the server a new source port and loses replies to the old one", "[relay]") {
  EchoServer server;
  ImpairRelay relay(server.port(), 1, ImpairProfile::none());
  UdpSocket client;
  client.send_to(relay.port(), "before");
  REQUIRE(client.receive(kHangLimit));
  REQUIRE(server.sources().size() == 1);
  const std::uint16_t old_port = server.sources()[0];

  relay.rebind();
  client.send_to(relay.port(), "after");
  const auto echo = client.receive(kHangLimit);
  REQUIRE(echo);
  CHECK(echo->first == "after");
  const std::vector<std::uint16_t> sources = server.sources();
  REQUIRE(sources.size() == 2);
  const std::uint16_t new_port = sources[1];
  CHECK(new_port != old_port);

  // The old port is closed: a late reply to it never reaches the client; one to the new port does.
  server.send_to(old_port, "stale");
  server.send_to(new_port, "fresh");
  const auto reply = client.receive(kHangLimit);
  REQUIRE(reply);
  CHECK(reply->first == "fresh");
  CHECK_FALSE(client.receive(std::chrono::milliseconds(100)));
  Stats stats = relay.stats();
  CHECK(stats["rebinds"] == 1);
  CHECK(stats["clients"] == 1);
  CHECK(stats["down_received"] == 3);  // before, after, fresh
}

TEST_CASE("duplicate 1 delivers every datagram twice", "[relay]") {
  constexpr int kCount = 20;
  EchoServer server;
  ImpairProfile profile;
  profile.up.duplicate = 1.0;
  ImpairRelay relay(server.port(), 1, profile);
  UdpSocket client;
  const std::vector<int> received = exchange_numbered(relay, server, client, kCount);
  std::map<int, int> copies;
  for (const int number : received) ++copies[number];
  CHECK(copies.size() == static_cast<std::size_t>(kCount));
  for (const auto& [number, count] : copies) {
    INFO("datagram " << number);
    CHECK(count == 2);
  }
  Stats stats = relay.stats();
  CHECK(stats["up_duplicated"] == kCount);
  CHECK(stats["up_sent"] == 2 * kCount);
  CHECK(server.echoed() == 2 * kCount);
}

TEST_CASE("set changes an impairment at run time and refuses values out of range", "[relay]") {
  EchoServer server;
  ImpairRelay relay(server.port(), 1, ImpairProfile::none());
  UdpSocket client;
  relay.set("up-loss", "1");
  for (int number = 0; number < 5; ++number) client.send_to(relay.port(), numbered(number));
  Stats stats;
  wait_until("5 datagrams at the relay", [&] {
    stats = relay.stats();
    return stats["up_received"] == 5;
  });
  CHECK(stats["up_dropped_loss"] == 5);

  relay.set("up-loss", "0");
  client.send_to(relay.port(), "through");
  const auto back = client.receive(kHangLimit);
  REQUIRE(back);
  CHECK(back->first == "through");

  CHECK_THROWS_WITH(relay.set("up-loss", "1.5"), Catch::Contains("set up-loss 1.5: must be a probability from 0 to 1"));
  CHECK_THROWS_WITH(relay.set("sideways-loss", "0.1"), Catch::Contains("unknown key"));
  // Gilbert–Elliott without a way back to the good state is refused, and the old settings stay.
  CHECK_THROWS_WITH(relay.set("ge-p", "0.1"), Catch::Contains("needs ge-r"));
  client.send_to(relay.port(), "still through");
  const auto again = client.receive(kHangLimit);
  REQUIRE(again);
  CHECK(again->first == "still through");
  CHECK(relay.command("dance").rfind("error: unknown command 'dance'", 0) == 0);
}

TEST_CASE("bad options exit with 2 and name the option and the value", "[relay]") {
  const std::string relay = DAUTH_IMPAIR_RELAY_PATH;
  const auto loss = dauth::test::run_command({relay, "--upstream", "127.0.0.1:5683", "--loss", "1.5"});
  CHECK(loss.exit_code == 2);
  CHECK_THAT(loss.output, Catch::Contains("--loss 1.5") && Catch::Contains("from 0 to 1"));

  const auto remote = dauth::test::run_command({relay, "--upstream", "10.0.0.1:5683"});
  CHECK(remote.exit_code == 2);
  CHECK_THAT(remote.output, Catch::Contains("--upstream 10.0.0.1:5683") && Catch::Contains("loopback"));

  const auto remote_listen = dauth::test::run_command({relay, "--listen", "0.0.0.0:0", "--upstream", "[::1]:5683"});
  CHECK(remote_listen.exit_code == 2);
  CHECK_THAT(remote_listen.output, Catch::Contains("--listen 0.0.0.0:0"));

  // dauthd's host:port rule (dauth/transport/address.hpp): brackets for IPv6, a port, 1–65535 (0 only to listen).
  for (const std::string bad : {"[::1]", "::1:5683", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536"}) {
    INFO(bad);
    const auto refused = dauth::test::run_command({relay, "--upstream", bad});
    CHECK(refused.exit_code == 2);
    CHECK_THAT(refused.output, Catch::Contains("--upstream " + bad + ": " +
                                               dauth::transport::parse_host_port(bad).error().message));
  }
  const auto listen_range = dauth::test::run_command({relay, "--listen", "[::1]:65536", "--upstream", "[::1]:5683"});
  CHECK(listen_range.exit_code == 2);
  CHECK_THAT(listen_range.output, Catch::Contains("--listen [::1]:65536: port 65536: must be 0–65535"));

  const auto missing = dauth::test::run_command({relay, "--loss", "0.1"});
  CHECK(missing.exit_code == 2);
  CHECK_THAT(missing.output, Catch::Contains("--upstream") && Catch::Contains("missing"));

  const auto burst_without_end = dauth::test::run_command({relay, "--upstream", "127.0.0.1:5683", "--ge-p", "0.1"});
  CHECK(burst_without_end.exit_code == 2);
  CHECK_THAT(burst_without_end.output, Catch::Contains("ge-r"));

  CHECK_THROWS_WITH(ImpairRelay(5683, 1, ImpairProfile::lossy(1.5, 0, 0)),
                    Catch::Contains("exited before listening (exit status 2)") && Catch::Contains("--loss 1.5"));
}

TEST_CASE("the relay ends on EOF on its stdin and on SIGTERM", "[relay]") {
  // run_command closes stdin at once: the relay reports its port and exits 0.
  const auto ipv6 = dauth::test::run_command(
      {DAUTH_IMPAIR_RELAY_PATH, "--listen", "[::1]:0", "--upstream", "[::1]:5683", "--loss", "0.1"});
  CHECK(ipv6.exit_code == 0);
  CHECK_THAT(ipv6.output, Catch::StartsWith("listening [::1]:"));

  ImpairRelay relay(5683, 1, ImpairProfile::none());
  REQUIRE(::kill(relay.pid(), SIGTERM) == 0);
  wait_for_exit(relay);
  CHECK_THROWS_WITH(relay.stats(), Catch::Contains("exit status 0"));
}

TEST_CASE("the relay stops by itself after max-seconds", "[relay]") {
  ImpairProfile profile;
  profile.max_seconds = 1;
  ImpairRelay relay(5683, 1, profile);
  wait_for_exit(relay);
  CHECK_THROWS_WITH(relay.stats(), Catch::Contains("exit status 0"));
}

TEST_CASE("reorder and jitter change the order and lose nothing", "[relay]") {
  constexpr int kCount = 200;
  ImpairProfile profile;
  profile.up.reorder = 0.3;
  profile.up.reorder_delay_ms = 20;
  profile.down.delay_ms = 5;
  profile.down.jitter_ms = 5;
  EchoServer server;
  ImpairRelay relay(server.port(), 3, profile);
  UdpSocket client;
  const std::vector<int> received = exchange_numbered(relay, server, client, kCount);
  CHECK(received.size() == static_cast<std::size_t>(kCount));
  CHECK(std::set<int>(received.begin(), received.end()).size() == static_cast<std::size_t>(kCount));
  CHECK_FALSE(std::is_sorted(received.begin(), received.end()));
  Stats stats = relay.stats();
  CHECK(stats["up_reordered"] > 0);
  CHECK(stats["up_reordered"] < kCount);
  CHECK(stats["down_reordered"] == 0);
}

TEST_CASE("an idle client's mapping expires and the next datagram makes a new one", "[relay]") {
  EchoServer server;
  ImpairProfile profile;
  profile.mapping_timeout_s = 1;
  ImpairRelay relay(server.port(), 1, profile);
  UdpSocket client;
  client.send_to(relay.port(), "first");
  REQUIRE(client.receive(kHangLimit));
  Stats stats;
  wait_until("the mapping to expire", [&] {
    stats = relay.stats();
    return stats["clients_expired"] == 1;
  });
  CHECK(stats["clients"] == 0);
  client.send_to(relay.port(), "second");
  const auto back = client.receive(kHangLimit);
  REQUIRE(back);
  CHECK(back->first == "second");
  CHECK(relay.stats()["clients"] == 1);
}

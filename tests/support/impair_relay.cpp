// dauth_impair_relay: a seeded userspace UDP impairment relay between UDP clients and one UDP server on loopback,
// for tests and benchmarks on machines without the kernel's netem. Loss (independent or Gilbert–Elliott bursts),
// delay, jitter, reordering, duplication, a path MTU, partitions and NAT-style source rebinding, each per
// direction, every random decision reproducible from --seed. docs/impairment-relay.md is the contract: options,
// control commands on stdin, the stats line and the determinism guarantee.
//
// Standalone on purpose: C++17 and POSIX/Linux only (epoll, signalfd), no dauth library, so that any test or
// benchmark can start it. It only ever binds and sends to loopback addresses.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dauth/transport/address.hpp"
#include "dauth/unique_fd.hpp"

namespace {

using Clock = std::chrono::steady_clock;

constexpr const char* kProgram = "dauth_impair_relay";

// Exit codes as everywhere in dauth: 0 ok, 1 the relay failed while running, 2 usage error.
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

// A UDP payload never exceeds 65535 - 8 bytes; one buffer of this size never truncates.
constexpr std::size_t kMaxDatagram = 65536;
// Bytes held in the delay queue at most, besides --max-queue datagrams: bounds memory with large datagrams.
constexpr std::size_t kMaxQueuedBytes = 64u << 20;
// Datagrams read from one socket per wake-up, so that a flooding client cannot starve the others or stdin.
constexpr int kReadBurst = 64;
// A control line longer than this is refused (and the rest of it discarded).
constexpr std::size_t kMaxControlLine = 1024;
// IPv4 header + UDP header, IPv6 header + UDP header: what --mtu subtracts to get the largest payload.
constexpr int kIpv4UdpOverhead = 20 + 8;
constexpr int kIpv6UdpOverhead = 40 + 8;

using dauth::UniqueFd;

// A command-line or control-command value that is not allowed; what() says which, where and what is allowed.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string errno_text(int err) { return std::strerror(err); }

// A value as the user would write it: "0.1", not std::to_string's "0.100000".
std::string number_text(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", value);
  return text;
}

// ---------------------------------------------------------------------------------------------------------------
// Addresses: numeric loopback only.

struct Endpoint {
  sockaddr_storage address{};
  socklen_t length = 0;

  int family() const { return address.ss_family; }
  const sockaddr* raw() const { return reinterpret_cast<const sockaddr*>(&address); }
  std::uint16_t port() const {
    return family() == AF_INET ? ntohs(reinterpret_cast<const sockaddr_in*>(&address)->sin_port)
                               : ntohs(reinterpret_cast<const sockaddr_in6*>(&address)->sin6_port);
  }
  // "127.0.0.1:5683" or "[::1]:5683"; also the key of a client's mapping.
  std::string text() const {
    char host[INET6_ADDRSTRLEN] = {};
    if (family() == AF_INET) {
      ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&address)->sin_addr, host, sizeof host);
      return std::string(host) + ":" + std::to_string(port());
    }
    ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&address)->sin6_addr, host, sizeof host);
    return "[" + std::string(host) + "]:" + std::to_string(port());
  }
};

Endpoint endpoint_from(const sockaddr_storage& address, socklen_t length) {
  Endpoint endpoint;
  endpoint.address = address;
  endpoint.length = length;
  return endpoint;
}

constexpr const char* kLoopbackAllowed =
    "allowed: a numeric loopback address (127.0.0.0/8 or ::1) and a port, as 127.0.0.1:PORT or [::1]:PORT";

// Parses "127.x.y.z:PORT" or "[::1]:PORT". Anything that is not loopback is refused: the relay must never send a
// datagram off the machine.
Endpoint parse_loopback_endpoint(const std::string& option, const std::string& text, bool port_zero_allowed) {
  const auto fail = [&](const std::string& why) {
    return UsageError(option + " " + text + ": " + why + "; " + kLoopbackAllowed);
  };
  // dauth's own host:port and loopback rules (dauth/transport/address.hpp), so the relay takes what dauthd takes.
  auto parsed = dauth::transport::parse_host_port(
      text, port_zero_allowed ? dauth::transport::PortZero::allowed : dauth::transport::PortZero::refused);
  if (!parsed) throw fail(parsed.error().message);
  auto address = dauth::transport::numeric_address(parsed->host, parsed->port);
  if (!address) throw fail(address.error().message);
  if (!dauth::transport::is_loopback(address->get())) throw fail("not a loopback address");
  return endpoint_from(address->storage, address->length);
}

// ---------------------------------------------------------------------------------------------------------------
// Impairment settings: one table, used by the command line and by the `set` control command alike.

enum Direction : std::size_t { kUp = 0, kDown = 1 };
constexpr std::array<const char*, 2> kDirectionNames = {"up", "down"};

struct DirectionSettings {
  double loss = 0;
  double ge_p = 0;  // 0: Gilbert–Elliott off
  double ge_r = 0;
  double ge_loss_bad = 1.0;
  double ge_loss_good = 0;
  double delay_ms = 0;
  double jitter_ms = 0;
  double reorder = 0;
  double reorder_delay_ms = -1;  // negative: 2 × delay + 10
  double duplicate = 0;
  double mtu = 0;  // 0: no limit

  double effective_reorder_delay_ms() const { return reorder_delay_ms >= 0 ? reorder_delay_ms : 2 * delay_ms + 10; }
};

enum class ValueKind { probability, milliseconds, mtu };

struct ImpairmentRow {
  const char* name;  // "loss": --loss, --up-loss, --down-loss, `set loss`, `set up-loss`, ...
  double DirectionSettings::*field;
  ValueKind kind;
};

constexpr double kMaxMilliseconds = 60000;

const std::array<ImpairmentRow, 11> kImpairments = {{
    {"loss", &DirectionSettings::loss, ValueKind::probability},
    {"ge-p", &DirectionSettings::ge_p, ValueKind::probability},
    {"ge-r", &DirectionSettings::ge_r, ValueKind::probability},
    {"ge-loss-bad", &DirectionSettings::ge_loss_bad, ValueKind::probability},
    {"ge-loss-good", &DirectionSettings::ge_loss_good, ValueKind::probability},
    {"delay", &DirectionSettings::delay_ms, ValueKind::milliseconds},
    {"jitter", &DirectionSettings::jitter_ms, ValueKind::milliseconds},
    {"reorder", &DirectionSettings::reorder, ValueKind::probability},
    {"reorder-delay", &DirectionSettings::reorder_delay_ms, ValueKind::milliseconds},
    {"duplicate", &DirectionSettings::duplicate, ValueKind::probability},
    {"mtu", &DirectionSettings::mtu, ValueKind::mtu},
}};

// Parses and range-checks one impairment value; `where` names it in the error ("--up-loss", "set up-loss").
double parse_impairment_value(const ImpairmentRow& row, const std::string& where, const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  const bool is_number = !text.empty() && *end == '\0' && errno == 0 && std::isfinite(value);
  switch (row.kind) {
    case ValueKind::probability:
      if (!is_number || value < 0 || value > 1) {
        throw UsageError(where + " " + text + ": must be a probability from 0 to 1");
      }
      break;
    case ValueKind::milliseconds:
      if (!is_number || value < 0 || value > kMaxMilliseconds) {
        throw UsageError(where + " " + text + ": must be 0 to 60000 milliseconds");
      }
      break;
    case ValueKind::mtu:
      if (!is_number || value != std::floor(value) || (value != 0 && (value < 68 || value > 65535))) {
        throw UsageError(where + " " + text + ": must be 0 (no limit) or a path MTU of 68 to 65535 bytes");
      }
      break;
  }
  return value;
}

// Rules between fields, checked once after every change (command line or `set`), on the new settings.
void check_cross_field_rules(const std::array<DirectionSettings, 2>& settings) {
  for (std::size_t d = 0; d < settings.size(); ++d) {
    const DirectionSettings& s = settings[d];
    const std::string direction = kDirectionNames[d];
    if (s.ge_p > 0 && s.ge_r <= 0) {
      throw UsageError(direction + " direction: ge-p " + number_text(s.ge_p) + " needs ge-r > 0 (--ge-r or --" +
                       direction + "-ge-r: the bad->good probability per datagram, up to 1; mean burst = 1/ge-r)");
    }
    if (s.ge_p > 0 && s.loss > 0) {
      throw UsageError(direction + " direction: loss " + number_text(s.loss) + " and ge-p " + number_text(s.ge_p) +
                       " exclude each other (Gilbert-Elliott replaces independent loss; use ge-loss-good for loss "
                       "in the good state)");
    }
  }
}

// "loss" -> both directions, "up-loss" / "down-loss" -> one. Returns the row, or nullptr for an unknown key.
const ImpairmentRow* find_impairment(const std::string& key, std::vector<Direction>& directions) {
  std::string name = key;
  directions = {kUp, kDown};
  for (const Direction d : {kUp, kDown}) {
    const std::string prefix = std::string(kDirectionNames[d]) + "-";
    if (key.compare(0, prefix.size(), prefix) == 0) {
      name = key.substr(prefix.size());
      directions = {d};
    }
  }
  for (const auto& row : kImpairments) {
    if (name == row.name) return &row;
  }
  return nullptr;
}

std::string impairment_names() {
  std::string names;
  for (const auto& row : kImpairments) names += (names.empty() ? "" : ", ") + std::string(row.name);
  return names;
}

// ---------------------------------------------------------------------------------------------------------------
// Command line.

struct Options {
  Endpoint listen;
  Endpoint upstream;
  std::uint64_t seed = 0;
  std::array<DirectionSettings, 2> impairments{};
  double mapping_timeout_s = 300;
  double max_seconds = 3600;
  std::size_t max_queue = 10000;
  std::size_t max_clients = 1024;
  bool help = false;  // --help: print the usage and exit 0
};

constexpr const char* kUsage =
    "usage: dauth_impair_relay --upstream ADDR:PORT [--listen ADDR:PORT] [--seed N] [impairments] [limits]\n"
    "  addresses: numeric loopback only, 127.0.0.1:PORT or [::1]:PORT; --listen defaults to 127.0.0.1:0\n"
    "  impairments, each as --X (both directions), --up-X (client->server) or --down-X (server->client):\n"
    "    --loss P            independent loss probability\n"
    "    --ge-p P --ge-r R   Gilbert-Elliott bursty loss: good->bad and bad->good probability per datagram\n"
    "    --ge-loss-bad P     loss probability in the bad state (default 1)\n"
    "    --ge-loss-good P    loss probability in the good state (default 0)\n"
    "    --delay MS --jitter MS     delay, uniform in delay +- jitter (never below 0)\n"
    "    --reorder P --reorder-delay MS   hold a datagram back by reorder-delay (default 2 x delay + 10)\n"
    "    --duplicate P       send a second copy (with its own delay)\n"
    "    --mtu BYTES         drop payloads larger than BYTES - 28 (IPv4) or BYTES - 48 (IPv6); 0: no limit\n"
    "  limits: --mapping-timeout S (300) --max-seconds S (3600) --max-queue N (10000) --max-clients N (1024)\n"
    "  stdin commands: partition on|off, rebind, stats, set KEY VALUE; EOF on stdin ends the relay\n"
    "  see docs/impairment-relay.md\n";

double parse_bounded_number(const std::string& option, const std::string& text, double low, double high,
                            const std::string& allowed) {
  char* end = nullptr;
  errno = 0;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || errno != 0 || !std::isfinite(value) || value < low || value > high) {
    throw UsageError(option + " " + text + ": must be " + allowed);
  }
  return value;
}

std::uint64_t parse_seed(const std::string& text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text.c_str(), &end, 10);
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text.front())) || *end != '\0' || errno != 0) {
    throw UsageError("--seed " + text + ": must be a decimal integer from 0 to 18446744073709551615");
  }
  return value;
}

// Parses argv into new Options. Direction-specific impairments (--up-X, --down-X) win over --X whatever their
// order on the command line; otherwise the last occurrence wins.
Options parse_options(int argc, char** argv) {
  Options options;
  options.listen = parse_loopback_endpoint("--listen", "127.0.0.1:0", true);
  bool have_upstream = false;
  struct Pending {
    const ImpairmentRow* row;
    std::vector<Direction> directions;
    double value;
  };
  std::vector<Pending> both_directions;
  std::vector<Pending> one_direction;
  for (int i = 1; i < argc; ++i) {
    std::string option = argv[i];
    if (option == "--help" || option == "-h") {
      options.help = true;
      return options;
    }
    std::string value;
    const auto equals = option.find('=');
    if (option.compare(0, 2, "--") == 0 && equals != std::string::npos) {
      value = option.substr(equals + 1);
      option.resize(equals);
    } else if (option.compare(0, 2, "--") == 0) {
      if (i + 1 >= argc) throw UsageError(option + ": needs a value");
      value = argv[++i];
    } else {
      throw UsageError("'" + option + "': not an option (options start with --; see --help)");
    }
    if (option == "--listen") {
      options.listen = parse_loopback_endpoint(option, value, true);
    } else if (option == "--upstream") {
      options.upstream = parse_loopback_endpoint(option, value, false);
      have_upstream = true;
    } else if (option == "--seed") {
      options.seed = parse_seed(value);
    } else if (option == "--mapping-timeout") {
      options.mapping_timeout_s = parse_bounded_number(option, value, 1, 86400, "1 to 86400 seconds");
    } else if (option == "--max-seconds") {
      options.max_seconds = parse_bounded_number(option, value, 1, 604800, "1 to 604800 seconds");
    } else if (option == "--max-queue") {
      options.max_queue =
          static_cast<std::size_t>(parse_bounded_number(option, value, 1, 1000000, "1 to 1000000 datagrams"));
    } else if (option == "--max-clients") {
      options.max_clients =
          static_cast<std::size_t>(parse_bounded_number(option, value, 1, 65536, "1 to 65536 client addresses"));
    } else {
      std::vector<Direction> directions;
      const ImpairmentRow* row = find_impairment(option.substr(2), directions);
      if (row == nullptr) throw UsageError(option + ": unknown option (see --help)");
      Pending pending{row, directions, parse_impairment_value(*row, option, value)};
      (directions.size() == 2 ? both_directions : one_direction).push_back(pending);
    }
  }
  if (!have_upstream) {
    throw UsageError(
        "--upstream: missing; the server's loopback address and port is required, e.g. --upstream "
        "127.0.0.1:5683");
  }
  for (const auto* list : {&both_directions, &one_direction}) {
    for (const Pending& pending : *list) {
      for (const Direction d : pending.directions) options.impairments[d].*(pending.row->field) = pending.value;
    }
  }
  check_cross_field_rules(options.impairments);
  return options;
}

// ---------------------------------------------------------------------------------------------------------------
// Randomness: one stream per direction. mt19937_64 and seed_seq are specified exactly by the standard, and the
// conversion to [0, 1) is ours, so the numbers do not depend on the standard library's distributions.

class DecisionStream {
 public:
  // Every datagram received in a direction takes exactly these draws, in this order, whatever is decided: the
  // k-th datagram of a direction always gets the same numbers for a seed (docs/impairment-relay.md).
  struct Draws {
    double loss;
    double ge_transition;
    double duplicate;
    double delay;
    double reorder;
    double copy_delay;
    double copy_reorder;
  };

  DecisionStream(std::uint64_t seed, Direction direction) {
    std::seed_seq sequence{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32),
                           static_cast<std::uint32_t>(direction)};
    engine_.seed(sequence);
  }

  Draws next() {
    Draws draws{};
    draws.loss = uniform();
    draws.ge_transition = uniform();
    draws.duplicate = uniform();
    draws.delay = uniform();
    draws.reorder = uniform();
    draws.copy_delay = uniform();
    draws.copy_reorder = uniform();
    return draws;
  }

 private:
  // The top 53 bits as a double in [0, 1): exact, and the same on every platform.
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

  std::mt19937_64 engine_;
};

// ---------------------------------------------------------------------------------------------------------------
// The relay.

struct DirectionStats {
  std::uint64_t received = 0;
  std::uint64_t dropped_loss = 0;
  std::uint64_t dropped_mtu = 0;
  std::uint64_t dropped_partition = 0;
  std::uint64_t dropped_queue = 0;  // the delay queue was full
  std::uint64_t dropped_send = 0;   // sendto failed (buffer full, no client socket, port unreachable)
  std::uint64_t duplicated = 0;
  std::uint64_t reordered = 0;
  std::uint64_t sent = 0;
};

// One client source address and the upstream socket that stands for it towards the server (a NAT mapping).
struct ClientMapping {
  Endpoint client;
  UniqueFd upstream_socket;
  std::uint64_t socket_id = 0;  // epoll key of upstream_socket; a new socket gets a new id
  Clock::time_point last_active;
  std::list<std::string>::iterator idle_position;  // in Relay::idle_order_
};

// A datagram waiting for its send time.
struct Scheduled {
  Clock::time_point due;
  std::uint64_t order;  // ties keep arrival order
  Direction direction;
  Endpoint client;  // the client it comes from (up) or goes to (down)
  std::vector<std::uint8_t> payload;
};

// Earliest first, for std::push_heap / std::pop_heap (a max-heap of the reversed order).
bool later(const Scheduled& a, const Scheduled& b) { return a.due != b.due ? a.due > b.due : a.order > b.order; }

class Relay {
 public:
  explicit Relay(Options options);
  // Runs until EOF on stdin, SIGTERM/SIGINT or --max-seconds. Returns the exit code.
  int run();

 private:
  // epoll keys below kFirstSocketId are fixed descriptors; upstream sockets count up from it.
  static constexpr std::uint64_t kStdinId = 1;
  static constexpr std::uint64_t kListenId = 2;
  static constexpr std::uint64_t kSignalId = 3;
  static constexpr std::uint64_t kFirstSocketId = 16;

  void watch(int fd, std::uint64_t id);
  void unwatch(int fd);

  void read_from_clients(Clock::time_point now);
  void read_from_server(std::uint64_t socket_id, Clock::time_point now);
  void impair(Direction direction, const Endpoint& client, const std::uint8_t* data, std::size_t size,
              int arrival_family, Clock::time_point now);
  bool drop_for_loss(Direction direction, const DecisionStream::Draws& draws);
  void schedule(Direction direction, const Endpoint& client, const std::uint8_t* data, std::size_t size,
                double delay_draw, double reorder_draw, Clock::time_point now);
  void send_due(Clock::time_point now);
  void send_now(const Scheduled& datagram, Clock::time_point now);

  // The client's mapping, made now if it has none; nullptr when no upstream socket can be opened.
  ClientMapping* mapping_for(const Endpoint& client, Clock::time_point now);
  UniqueFd open_upstream_socket();
  void touch(ClientMapping& mapping, Clock::time_point now);
  void expire_idle(Clock::time_point now);
  void remove_mapping(const std::string& client_key);
  void rebind_all();

  void read_control();
  std::string execute(const std::string& line);
  static std::string long_line_error();
  std::string stats_line() const;
  void reply(const std::string& line);

  int wait_timeout_ms(Clock::time_point now) const;

  Options options_;
  std::array<DecisionStream, 2> streams_;
  std::array<bool, 2> ge_bad_state_{false, false};
  std::array<DirectionStats, 2> stats_{};
  bool partition_ = false;
  std::uint64_t rebinds_ = 0;
  std::uint64_t clients_expired_ = 0;
  std::uint64_t clients_refused_ = 0;  // no upstream socket could be opened (--max-clients, descriptor limit)

  UniqueFd epoll_;
  UniqueFd listen_socket_;
  UniqueFd signals_;
  bool stdin_watched_ = false;
  std::string control_buffer_;
  bool discarding_long_line_ = false;

  std::unordered_map<std::string, ClientMapping> clients_;       // by client endpoint text
  std::unordered_map<std::uint64_t, std::string> socket_owner_;  // epoll key -> client endpoint text
  std::list<std::string> idle_order_;                            // least recently active client first
  std::uint64_t next_socket_id_ = kFirstSocketId;

  std::vector<Scheduled> queue_;  // heap ordered by `later`
  std::size_t queued_bytes_ = 0;
  std::uint64_t next_order_ = 0;

  Clock::time_point deadline_;
  bool stop_ = false;
  int exit_code_ = kExitOk;
  std::vector<std::uint8_t> buffer_ = std::vector<std::uint8_t>(kMaxDatagram);
};

Relay::Relay(Options options)
    : options_(std::move(options)), streams_{DecisionStream(options_.seed, kUp), DecisionStream(options_.seed, kDown)} {
  epoll_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_.valid()) throw std::runtime_error("epoll_create1: " + errno_text(errno));

  listen_socket_ = UniqueFd(::socket(options_.listen.family(), SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!listen_socket_.valid()) throw std::runtime_error("socket: " + errno_text(errno));
  if (::bind(listen_socket_.get(), options_.listen.raw(), options_.listen.length) != 0) {
    throw std::runtime_error("--listen " + options_.listen.text() + ": bind: " + errno_text(errno));
  }
  // Room for bursts while datagrams wait in userspace; the kernel caps it at net.core.rmem_max silently.
  const int receive_buffer = 4 << 20;
  ::setsockopt(listen_socket_.get(), SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
  sockaddr_storage bound{};
  socklen_t bound_length = sizeof bound;
  ::getsockname(listen_socket_.get(), reinterpret_cast<sockaddr*>(&bound), &bound_length);
  options_.listen = endpoint_from(bound, bound_length);
  watch(listen_socket_.get(), kListenId);

  sigset_t termination;
  sigemptyset(&termination);
  sigaddset(&termination, SIGTERM);
  sigaddset(&termination, SIGINT);
  ::sigprocmask(SIG_BLOCK, &termination, nullptr);
  signals_ = UniqueFd(::signalfd(-1, &termination, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!signals_.valid()) throw std::runtime_error("signalfd: " + errno_text(errno));
  watch(signals_.get(), kSignalId);

  // A regular file or /dev/null on stdin cannot be polled (EPERM): its commands are read at once in run().
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.u64 = kStdinId;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, STDIN_FILENO, &event) == 0) {
    stdin_watched_ = true;
  } else if (errno != EPERM) {
    throw std::runtime_error("epoll_ctl(stdin): " + errno_text(errno));
  }

  // Each client costs one descriptor; raise the soft limit as far as --max-clients needs and the hard limit lets.
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) == 0) {
    const rlim_t wanted = static_cast<rlim_t>(options_.max_clients) + 64;
    if (limit.rlim_cur < wanted) {
      limit.rlim_cur = std::min(wanted, limit.rlim_max);
      ::setrlimit(RLIMIT_NOFILE, &limit);
    }
  }
  deadline_ = Clock::now() + std::chrono::milliseconds(static_cast<std::int64_t>(options_.max_seconds * 1000));
}

void Relay::watch(int fd, std::uint64_t id) {
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.u64 = id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    throw std::runtime_error("epoll_ctl(ADD): " + errno_text(errno));
  }
}

void Relay::unwatch(int fd) { ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr); }

int Relay::run() {
  // The one line a parent waits for: the bound address, so that --listen 127.0.0.1:0 is usable.
  reply("listening " + options_.listen.text());
  if (!stdin_watched_) {
    while (!stop_) read_control();
  }
  std::array<epoll_event, 64> events{};
  while (!stop_) {
    const int count =
        ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), wait_timeout_ms(Clock::now()));
    if (count < 0 && errno != EINTR) throw std::runtime_error("epoll_wait: " + errno_text(errno));
    const Clock::time_point now = Clock::now();
    for (int i = 0; i < count && !stop_; ++i) {
      const std::uint64_t id = events[static_cast<std::size_t>(i)].data.u64;
      if (id == kStdinId) {
        read_control();
      } else if (id == kListenId) {
        read_from_clients(now);
      } else if (id == kSignalId) {
        signalfd_siginfo info{};
        if (::read(signals_.get(), &info, sizeof info) == static_cast<ssize_t>(sizeof info)) {
          std::fprintf(stderr, "%s: signal %u; exiting\n", kProgram, info.ssi_signo);
          stop_ = true;
        }
      } else {
        read_from_server(id, now);
      }
    }
    if (stop_) break;
    const Clock::time_point after = Clock::now();
    send_due(after);
    expire_idle(after);
    if (after >= deadline_) {
      std::fprintf(stderr, "%s: --max-seconds %g reached; exiting\n", kProgram, options_.max_seconds);
      stop_ = true;
    }
  }
  return exit_code_;
}

// Sleeps until the next queued datagram, mapping expiry or --max-seconds, rounded up to whole milliseconds so
// that a wait never ends just before its deadline and spins.
int Relay::wait_timeout_ms(Clock::time_point now) const {
  Clock::time_point wake = deadline_;
  if (!queue_.empty()) wake = std::min(wake, queue_.front().due);
  if (!idle_order_.empty()) {
    const ClientMapping& oldest = clients_.at(idle_order_.front());
    wake = std::min(wake, oldest.last_active +
                              std::chrono::milliseconds(static_cast<std::int64_t>(options_.mapping_timeout_s * 1000)));
  }
  if (wake <= now) return 0;
  const auto micros = std::chrono::duration_cast<std::chrono::microseconds>(wake - now).count();
  return static_cast<int>(std::min<std::int64_t>((micros + 999) / 1000, 24 * 3600 * 1000));
}

void Relay::read_from_clients(Clock::time_point now) {
  for (int i = 0; i < kReadBurst; ++i) {
    sockaddr_storage from{};
    socklen_t from_length = sizeof from;
    const ssize_t size = ::recvfrom(listen_socket_.get(), buffer_.data(), buffer_.size(), 0,
                                    reinterpret_cast<sockaddr*>(&from), &from_length);
    if (size < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        std::fprintf(stderr, "%s: recvfrom on %s: %s\n", kProgram, options_.listen.text().c_str(),
                     std::strerror(errno));
      }
      return;
    }
    impair(kUp, endpoint_from(from, from_length), buffer_.data(), static_cast<std::size_t>(size),
           options_.listen.family(), now);
  }
}

void Relay::read_from_server(std::uint64_t socket_id, Clock::time_point now) {
  const auto owner = socket_owner_.find(socket_id);
  if (owner == socket_owner_.end()) return;  // closed earlier in this round (rebind); its event is stale
  const std::string client_key = owner->second;
  ClientMapping& mapping = clients_.at(client_key);
  for (int i = 0; i < kReadBurst; ++i) {
    const ssize_t size = ::recv(mapping.upstream_socket.get(), buffer_.data(), buffer_.size(), 0);
    if (size < 0) {
      // ECONNREFUSED: an earlier datagram found no server (ICMP port unreachable); nothing to read.
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNREFUSED) {
        std::fprintf(stderr, "%s: recv from %s for client %s: %s\n", kProgram, options_.upstream.text().c_str(),
                     client_key.c_str(), std::strerror(errno));
      }
      return;
    }
    touch(mapping, now);
    impair(kDown, mapping.client, buffer_.data(), static_cast<std::size_t>(size), options_.upstream.family(), now);
  }
}

// Every received datagram takes its draws first, so that what happens to it never changes which numbers later
// datagrams get. Then: partition, MTU, loss; a survivor is scheduled, and maybe a copy.
void Relay::impair(Direction direction, const Endpoint& client, const std::uint8_t* data, std::size_t size,
                   int arrival_family, Clock::time_point now) {
  DirectionStats& stats = stats_[direction];
  const DirectionSettings& settings = options_.impairments[direction];
  ++stats.received;
  const DecisionStream::Draws draws = streams_[direction].next();
  const bool lost = drop_for_loss(direction, draws);
  const int overhead = arrival_family == AF_INET6 ? kIpv6UdpOverhead : kIpv4UdpOverhead;
  if (partition_) {
    ++stats.dropped_partition;
  } else if (settings.mtu > 0 && static_cast<double>(size) > settings.mtu - overhead) {
    ++stats.dropped_mtu;
  } else if (lost) {
    ++stats.dropped_loss;
  } else {
    schedule(direction, client, data, size, draws.delay, draws.reorder, now);
    if (draws.duplicate < settings.duplicate) {
      ++stats.duplicated;
      schedule(direction, client, data, size, draws.copy_delay, draws.copy_reorder, now);
    }
  }
}

// Independent loss, or Gilbert–Elliott: the loss probability of the current state decides this datagram, then
// the chain moves (good->bad with ge-p, bad->good with ge-r). The chain moves for every datagram, dropped or not.
bool Relay::drop_for_loss(Direction direction, const DecisionStream::Draws& draws) {
  const DirectionSettings& settings = options_.impairments[direction];
  if (settings.ge_p <= 0) return draws.loss < settings.loss;
  bool& bad = ge_bad_state_[direction];
  const bool lost = draws.loss < (bad ? settings.ge_loss_bad : settings.ge_loss_good);
  if (bad ? draws.ge_transition < settings.ge_r : draws.ge_transition < settings.ge_p) bad = !bad;
  return lost;
}

void Relay::schedule(Direction direction, const Endpoint& client, const std::uint8_t* data, std::size_t size,
                     double delay_draw, double reorder_draw, Clock::time_point now) {
  DirectionStats& stats = stats_[direction];
  const DirectionSettings& settings = options_.impairments[direction];
  double delay_ms = std::max(0.0, settings.delay_ms + settings.jitter_ms * (2 * delay_draw - 1));
  if (reorder_draw < settings.reorder) {
    ++stats.reordered;
    delay_ms += settings.effective_reorder_delay_ms();
  }
  if (queue_.size() >= options_.max_queue || queued_bytes_ + size > kMaxQueuedBytes) {
    ++stats.dropped_queue;
    return;
  }
  Scheduled datagram{now + std::chrono::microseconds(std::llround(delay_ms * 1000)), next_order_++, direction, client,
                     std::vector<std::uint8_t>(data, data + size)};
  queued_bytes_ += size;
  queue_.push_back(std::move(datagram));
  std::push_heap(queue_.begin(), queue_.end(), later);
}

void Relay::send_due(Clock::time_point now) {
  while (!queue_.empty() && queue_.front().due <= now) {
    std::pop_heap(queue_.begin(), queue_.end(), later);
    Scheduled datagram = std::move(queue_.back());
    queue_.pop_back();
    queued_bytes_ -= datagram.payload.size();
    send_now(datagram, now);
  }
}

// A partition also cuts what is already on the way. An up datagram leaves through the client's current mapping
// (made now if it has none, as a NAT would), so a rebind while it waited sends it from the new port; a down
// datagram is past the mapping already and goes to its client even if the mapping expired meanwhile.
void Relay::send_now(const Scheduled& datagram, Clock::time_point now) {
  DirectionStats& stats = stats_[datagram.direction];
  if (partition_) {
    ++stats.dropped_partition;
    return;
  }
  ssize_t sent = -1;
  if (datagram.direction == kUp) {
    ClientMapping* mapping = mapping_for(datagram.client, now);
    if (mapping == nullptr) {
      ++stats.dropped_send;
      return;
    }
    touch(*mapping, now);
    sent = ::send(mapping->upstream_socket.get(), datagram.payload.data(), datagram.payload.size(), 0);
  } else {
    sent = ::sendto(listen_socket_.get(), datagram.payload.data(), datagram.payload.size(), 0, datagram.client.raw(),
                    datagram.client.length);
  }
  if (sent < 0) {
    ++stats.dropped_send;
  } else {
    ++stats.sent;
  }
}

ClientMapping* Relay::mapping_for(const Endpoint& client, Clock::time_point now) {
  const std::string client_key = client.text();
  const auto found = clients_.find(client_key);
  if (found != clients_.end()) return &found->second;
  if (clients_.size() >= options_.max_clients) {
    ++clients_refused_;
    if (clients_refused_ == 1) {
      std::fprintf(stderr, "%s: client %s refused: --max-clients %zu reached (counted as clients_refused)\n", kProgram,
                   client_key.c_str(), options_.max_clients);
    }
    return nullptr;
  }
  UniqueFd upstream_socket = open_upstream_socket();
  if (!upstream_socket.valid()) {
    ++clients_refused_;
    return nullptr;
  }
  ClientMapping mapping;
  mapping.client = client;
  mapping.upstream_socket = std::move(upstream_socket);
  mapping.socket_id = next_socket_id_++;
  mapping.last_active = now;
  mapping.idle_position = idle_order_.insert(idle_order_.end(), client_key);
  watch(mapping.upstream_socket.get(), mapping.socket_id);
  socket_owner_.emplace(mapping.socket_id, client_key);
  return &clients_.emplace(client_key, std::move(mapping)).first->second;
}

// A socket connected to the server: the kernel then delivers only the server's datagrams on it, and the
// server sees one source port per client.
UniqueFd Relay::open_upstream_socket() {
  UniqueFd upstream_socket(::socket(options_.upstream.family(), SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!upstream_socket.valid() ||
      ::connect(upstream_socket.get(), options_.upstream.raw(), options_.upstream.length) != 0) {
    std::fprintf(stderr, "%s: upstream socket to %s: %s\n", kProgram, options_.upstream.text().c_str(),
                 std::strerror(errno));
    return UniqueFd();
  }
  return upstream_socket;
}

void Relay::touch(ClientMapping& mapping, Clock::time_point now) {
  mapping.last_active = now;
  idle_order_.splice(idle_order_.end(), idle_order_, mapping.idle_position);
}

void Relay::expire_idle(Clock::time_point now) {
  const auto timeout = std::chrono::milliseconds(static_cast<std::int64_t>(options_.mapping_timeout_s * 1000));
  while (!idle_order_.empty()) {
    const std::string client_key = idle_order_.front();
    if (clients_.at(client_key).last_active + timeout > now) break;
    ++clients_expired_;
    remove_mapping(client_key);
  }
}

void Relay::remove_mapping(const std::string& client_key) {
  ClientMapping& mapping = clients_.at(client_key);
  unwatch(mapping.upstream_socket.get());
  socket_owner_.erase(mapping.socket_id);
  idle_order_.erase(mapping.idle_position);
  clients_.erase(client_key);
}

// Like a NAT that forgot every mapping: each client gets a new upstream socket, opened before the old one is
// closed so that its port is a different one; the server's replies to the old port are lost.
void Relay::rebind_all() {
  for (auto& [client_key, mapping] : clients_) {
    UniqueFd replacement = open_upstream_socket();
    if (!replacement.valid()) continue;  // keeps the old mapping; the error is on stderr
    unwatch(mapping.upstream_socket.get());
    socket_owner_.erase(mapping.socket_id);
    mapping.upstream_socket = std::move(replacement);
    mapping.socket_id = next_socket_id_++;
    watch(mapping.upstream_socket.get(), mapping.socket_id);
    socket_owner_.emplace(mapping.socket_id, client_key);
  }
  ++rebinds_;
}

// ---------------------------------------------------------------------------------------------------------------
// Control: one command per line on stdin, one answer line on stdout.

void Relay::read_control() {
  char chunk[4096];
  const ssize_t size = ::read(STDIN_FILENO, chunk, sizeof chunk);
  if (size < 0) {
    if (errno == EINTR || errno == EAGAIN) return;
    std::fprintf(stderr, "%s: read stdin: %s; exiting\n", kProgram, std::strerror(errno));
    stop_ = true;
    exit_code_ = kExitFailure;
    return;
  }
  if (size == 0) {  // the parent went away or closed our stdin: end with it
    stop_ = true;
    return;
  }
  control_buffer_.append(chunk, static_cast<std::size_t>(size));
  std::size_t newline;
  while (!stop_ && (newline = control_buffer_.find('\n')) != std::string::npos) {
    std::string line = control_buffer_.substr(0, newline);
    control_buffer_.erase(0, newline + 1);
    if (discarding_long_line_) {
      discarding_long_line_ = false;
      continue;
    }
    if (!line.empty() && line.back() == '\r') line.pop_back();
    reply(line.size() > kMaxControlLine ? long_line_error() : execute(line));
  }
  if (control_buffer_.size() > kMaxControlLine && !discarding_long_line_) {
    reply(long_line_error());
    discarding_long_line_ = true;
  }
  if (discarding_long_line_) control_buffer_.clear();  // until the newline that ends the long line
}

std::string Relay::long_line_error() {
  return "error: command line longer than " + std::to_string(kMaxControlLine) + " bytes; discarded";
}

std::string Relay::execute(const std::string& line) {
  std::istringstream words(line);
  std::vector<std::string> command;
  for (std::string word; words >> word;) command.push_back(word);
  if (command == std::vector<std::string>{"partition", "on"}) {
    partition_ = true;
    return "ok";
  }
  if (command == std::vector<std::string>{"partition", "off"}) {
    partition_ = false;
    return "ok";
  }
  if (command == std::vector<std::string>{"rebind"}) {
    rebind_all();
    return "ok";
  }
  if (command == std::vector<std::string>{"stats"}) return stats_line();
  if (!command.empty() && command[0] == "set") {
    if (command.size() != 3) return "error: set needs a key and a value: set KEY VALUE (e.g. set up-loss 0.3)";
    std::vector<Direction> directions;
    const ImpairmentRow* row = find_impairment(command[1], directions);
    if (row == nullptr) {
      return "error: set " + command[1] + ": unknown key; allowed: " + impairment_names() +
             ", each also as up-KEY or down-KEY";
    }
    // Parse into new settings, check them, then swap: a refused change leaves the old settings in force.
    try {
      std::array<DirectionSettings, 2> changed = options_.impairments;
      const double value = parse_impairment_value(*row, "set " + command[1], command[2]);
      for (const Direction d : directions) changed[d].*(row->field) = value;
      check_cross_field_rules(changed);
      options_.impairments = changed;
    } catch (const UsageError& error) {
      return std::string("error: ") + error.what();
    }
    return "ok";
  }
  return "error: unknown command '" + line + "'; commands: partition on, partition off, rebind, stats, set KEY VALUE";
}

std::string Relay::stats_line() const {
  std::string line;
  const auto add = [&line](const std::string& key, std::uint64_t value) {
    line += (line.empty() ? "" : " ") + key + "=" + std::to_string(value);
  };
  for (const Direction d : {kUp, kDown}) {
    const DirectionStats& s = stats_[d];
    const std::string prefix = std::string(kDirectionNames[d]) + "_";
    add(prefix + "received", s.received);
    add(prefix + "dropped_loss", s.dropped_loss);
    add(prefix + "dropped_mtu", s.dropped_mtu);
    add(prefix + "dropped_partition", s.dropped_partition);
    add(prefix + "dropped_queue", s.dropped_queue);
    add(prefix + "dropped_send", s.dropped_send);
    add(prefix + "duplicated", s.duplicated);
    add(prefix + "reordered", s.reordered);
    add(prefix + "sent", s.sent);
  }
  add("queued", queue_.size());
  add("clients", clients_.size());
  add("clients_expired", clients_expired_);
  add("clients_refused", clients_refused_);
  add("rebinds", rebinds_);
  add("partition", partition_ ? 1 : 0);
  return line;
}

void Relay::reply(const std::string& line) {
  const std::string text = line + "\n";
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t written = ::write(STDOUT_FILENO, text.data() + done, text.size() - done);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) {  // nobody reads our answers any more: the parent is gone
      stop_ = true;
      return;
    }
    done += static_cast<std::size_t>(written);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // A parent that stopped reading makes write() fail with EPIPE (and the relay stop) instead of killing it.
  std::signal(SIGPIPE, SIG_IGN);
  Options options;
  try {
    options = parse_options(argc, argv);
    if (options.help) {
      std::fputs(kUsage, stdout);
      return kExitOk;
    }
  } catch (const UsageError& error) {
    std::fprintf(stderr, "%s: %s\n", kProgram, error.what());
    return kExitUsage;
  }
  try {
    Relay relay(std::move(options));
    return relay.run();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s: %s\n", kProgram, error.what());
    return kExitFailure;
  }
}

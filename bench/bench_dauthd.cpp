// bench_dauthd: real dauthd processes against Debian's stock coap-server-gnutls (libcoap's example server) measured
// in the same run (issue 13). What counts is the server's CPU per operation (/proc/<pid>/task/*/schedstat, all
// threads), not wall-clock rates: the clients run in this process on the same 2 cores and cost the same for both
// servers. Rounds interleave the servers (stock, dauthd, stock, dauthd, ...) so that a busy machine slows both alike
// within a round; each result is the median of the per-round ratios with their spread (min-max).
//
// Measures (--only takes a comma-separated list of these names; default: all):
//   psk       PSK handshake + GET /time that gateway B forwards to its local AE (the valve, coap-server-notls) vs
//             coap-server-gnutls answering a PSK handshake + GET /time itself. Ratio stock/dauthd, goal >= 1.0.
//   psk-x509  the same with X.509 enabled on B's peer endpoint (peer.trust_anchors, the valve's AE-ID certificate
//             from the MEF over EST), PSK clients still. Goal >= 1.0. Also against a stock server with PSK + PKI.
//   x509      X.509 P-256 mutual handshake + GET vs coap-server-gnutls with a P-256 certificate. Goal >= 1.2.
//   live      handshake + GET cost with 0 / 1,000 / 5,000 idle PSK sessions held open (by forked holder processes,
//             one client Node per session, at most --holder-size each: GnuTLS client sessions select() their socket).
//             Cost at N / cost at 0 per server (goal for dauthd <= 1.5 and below stock's) and stock/dauthd at N.
//   proxy     client -> dauthd A local port -> DTLS -> dauthd B -> valve vs the client straight to the valve:
//             requests/s with 16 outstanding (goal >= 20k), added p50/p99 latency one at a time (goal p50 <= 0.2 ms).
//   mef       the MEF dauthd: enrolments (PSK KpmID handshake + POST /mef/enrolment, 8 in flight) while gateway B
//             observes /fetchCredentials, vs PSK handshake + GET /mef/revoked on the same dauthd (same credential).
//             Ratio = handshake+GET CPU / enrolment CPU (= enrolment rate / handshake rate when CPU-bound), goal >= 0.8.
//   rss       idle VmRSS (RssAnon / RssFile, and /proc/<pid>/smaps by mapping) of an MEF dauthd without enrolments
//             and with --enrolees rows enrolled through the real enrolment path; goal <= 8 MB. Stock idle for scale.
//
// Usage: bench_dauthd [--only LIST] [--rounds 5] [--ops 300] [--clients 4] [--live 0,1000,5000] [--holder-size 150]
//                     [--proxy-requests 4000] [--latency-samples 1000] [--mef-in-flight 8] [--enrolees 10000]
// BENCH_DAUTHD=<path> runs another dauthd build; BENCH_KEEP_DIR keeps the deployments' directories (logs).
// Reports, never asserts: a goal missed is printed as such. docs/benchmarks.md explains how to read the table.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bench_deployment.hpp"
#include "dauth/crypto/keystore.hpp"
#include "dauth/rspf/enrolee.hpp"
#include "dauth/rspf/messages.hpp"
#include "dauth/transport/transport.hpp"

using namespace dauth;
using namespace dauth::bench;
using Clock = std::chrono::steady_clock;

namespace {

// The stock server's PSK: on its command line, as coap-server-gnutls takes it (a throw-away bench value).
constexpr const char* kStockPskIdentity = "CAE-bench";
constexpr const char* kStockPsk = "bench-psk-0123456789abcdef0123456";
constexpr const char* kMefFqdn = "mef.bench.test";  // bench_deployment's MEF

struct Options {
  std::set<std::string> only;
  int rounds = 5;
  int ops = 300;
  std::size_t clients = 4;
  std::vector<int> live = {0, 1000, 5000};
  int holder_size = 150;
  int proxy_requests = 4000;
  int latency_samples = 1000;
  std::size_t mef_in_flight = 8;
  int enrolees = 10000;
  std::string dauthd_path = DAUTHD_PATH;

  bool wants(const std::string& measure) const { return only.empty() || only.count(measure) != 0; }
};

template <class T>
T must(Result<T> result, const std::string& what) {
  if (!result.ok()) throw std::runtime_error(what + ": " + result.error().to_string());
  return std::move(result).value();
}

// ---- what the servers spend ---------------------------------------------------------------------------------------

// CPU time of every thread of a process so far, microseconds (schedstat: nanoseconds on the CPU, unlike utime/stime
// not rounded to clock ticks).
double cpu_microseconds(pid_t pid) {
  double nanoseconds = 0;
  const std::filesystem::path tasks = "/proc/" + std::to_string(pid) + "/task";
  std::error_code error;
  for (const auto& task : std::filesystem::directory_iterator(tasks, error)) {
    std::ifstream in(task.path() / "schedstat");
    double task_ns = 0;
    if (in >> task_ns) nanoseconds += task_ns;
  }
  if (error) throw std::runtime_error("cannot read " + tasks.string() + ": " + error.message());
  return nanoseconds / 1000.0;
}

std::string load_average() {
  std::ifstream in("/proc/loadavg");
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return one + " " + five + " " + fifteen;
}

// Fields of /proc/<pid>/status in kB.
std::map<std::string, long> memory_status(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::map<std::string, long> fields;
  std::string line;
  while (std::getline(in, line)) {
    for (const char* name : {"VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"}) {
      if (line.rfind(std::string(name) + ":", 0) == 0) fields[name] = std::stol(line.substr(std::strlen(name) + 1));
    }
  }
  return fields;
}

// Resident kB per mapping of /proc/<pid>/smaps, by name: each shared library (all of its segments), [heap],
// [stack], anonymous mappings, the executable. Largest first.
std::vector<std::pair<std::string, long>> resident_by_mapping(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/smaps");
  std::map<std::string, long> by_name;
  std::string line;
  std::string current;
  while (std::getline(in, line)) {
    if (line.rfind("Rss:", 0) == 0) {
      by_name[current] += std::stol(line.substr(4));
      continue;
    }
    // A mapping header: "start-end perms offset dev inode [path]"; field lines start with "Name:".
    const auto colon = line.find(':');
    const auto space = line.find(' ');
    if (space == std::string::npos || (colon != std::string::npos && colon < space)) continue;
    std::istringstream header(line);
    std::string range, perms, offset, device, inode, path;
    header >> range >> perms >> offset >> device >> inode;
    std::getline(header, path);
    path.erase(0, path.find_first_not_of(' '));
    current = path.empty() ? "[anonymous]" : std::filesystem::path(path).filename().string();
    if (path.rfind('[', 0) == 0) current = path;
  }
  std::vector<std::pair<std::string, long>> out(by_name.begin(), by_name.end());
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  return out;
}

double median(std::vector<double> values) { return percentile(std::move(values), 0.5); }

// ---- the summary table --------------------------------------------------------------------------------------------

struct Row {
  std::string measure;
  std::string baseline;  // stock server (or the measure's own baseline, named in the measure)
  std::string dauthd;
  std::string ratio;  // median (min-max of the rounds)
  std::string goal;
  std::string met;  // yes / NO / "" (information)
  std::string load;
};
std::vector<Row> g_rows;

std::string fixed(double value, int decimals) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", decimals, value);
  return buffer;
}

std::string spread(const std::vector<double>& values, int decimals = 2) {
  return fixed(median(values), decimals) + " (" + fixed(*std::min_element(values.begin(), values.end()), decimals) +
         " to " + fixed(*std::max_element(values.begin(), values.end()), decimals) + ")";
}

std::string met(bool yes) { return yes ? "yes" : "NO"; }

void print_summary() {
  std::printf("\n== bench_dauthd summary (CPU per operation of the server process, median over interleaved rounds; "
              "ratio = median of per-round ratios (min to max)) ==\n");
  std::printf("%-68s | %-16s | %-30s | %-22s | %-10s | %-4s | %s\n", "measure", "stock/baseline", "dauthd",
              "ratio (spread)", "goal", "met", "load 1/5/15");
  for (const auto& row : g_rows) {
    std::printf("%-68s | %-16s | %-30s | %-22s | %-10s | %-4s | %s\n", row.measure.c_str(), row.baseline.c_str(),
                row.dauthd.c_str(), row.ratio.c_str(), row.goal.c_str(), row.met.c_str(), row.load.c_str());
  }
}

// ---- the load: client Nodes in this process ---------------------------------------------------------------------

struct Op {
  transport::Peer peer;
  transport::ClientCredentials credentials;
  transport::Request request;
  int expected_code = 205;

  Op clone() const { return Op{peer, credentials.clone(), request, expected_code}; }
};
using OpSource = std::function<Op(int index)>;

OpSource repeat(const Op& op) {
  return [&op](int) { return op.clone(); };
}

struct RunResult {
  double seconds = 0;
  int failures = 0;
  std::string first_failure;
  std::vector<double> latencies_us;
};

class ClientPool {
 public:
  explicit ClientPool(std::size_t count) {
    for (std::size_t i = 0; i < count; ++i) {
      transport::NodeConfig config;
      config.limits.max_client_sessions = 4;
      auto node = must(transport::Node::create(std::move(config)), "client node");
      node->set_failure_observer([](const transport::Failure&) {});
      nodes_.push_back(std::move(node));
    }
    epoll_ = ::epoll_create1(EPOLL_CLOEXEC);
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      epoll_event event{};
      event.events = EPOLLIN;
      event.data.u64 = i;
      if (::epoll_ctl(epoll_, EPOLL_CTL_ADD, nodes_[i]->fd(), &event) != 0) {
        throw std::runtime_error(std::string("epoll_ctl: ") + std::strerror(errno));
      }
    }
  }
  ~ClientPool() { ::close(epoll_); }
  ClientPool(const ClientPool&) = delete;
  ClientPool& operator=(const ClientPool&) = delete;

  std::size_t size() const { return nodes_.size(); }

  // `count` operations on the first `width` clients, one outstanding per client. new_session_each: the client's
  // sessions are closed when its answer arrived (outside the Node's callbacks), so every operation is a handshake.
  // `first` offsets the clients used (a holder opens its sessions in batches).
  RunResult run(std::size_t width, const OpSource& source, int count, bool new_session_each, std::size_t first = 0) {
    first = std::min(first, nodes_.size());
    width = std::min(width, nodes_.size() - first);
    RunResult result;
    std::vector<Clock::time_point> sent(width);
    std::vector<std::size_t> finished;
    int started = 0;
    int completed = 0;
    auto start_on = [&](std::size_t client) {
      Op op = source(started++);
      sent[client] = Clock::now();
      const int expected = op.expected_code;
      nodes_[first + client]->request(op.peer, op.credentials, std::move(op.request),
                              [&, client, expected](Result<transport::Response> answer, const transport::Session*) {
                                result.latencies_us.push_back(
                                    std::chrono::duration<double, std::micro>(Clock::now() - sent[client]).count());
                                if (!answer.ok() || answer->code != expected) {
                                  if (result.failures++ == 0) {
                                    result.first_failure = answer.ok() ? "answer " + std::to_string(answer->code)
                                                                       : answer.error().to_string();
                                  }
                                }
                                finished.push_back(client);
                              });
    };
    const auto begin = Clock::now();
    for (std::size_t client = 0; client < width && started < count; ++client) start_on(client);
    run_until([&] {
      while (!finished.empty()) {
        const std::vector<std::size_t> arrived = std::move(finished);
        finished.clear();
        for (const std::size_t client : arrived) {
          ++completed;
          if (new_session_each) nodes_[first + client]->close_client_sessions();
          if (started < count) start_on(client);
        }
      }
      return completed >= count;
    });
    result.seconds = std::chrono::duration<double>(Clock::now() - begin).count();
    return result;
  }

  // Retries one operation until it succeeds: a server that is still starting, or a dauthd that refuses a KeID it
  // has not fetched from the MEF yet (the client retries, PROTOCOL.md §4).
  void warm_up(const Op& op, const std::string& what) {
    std::string last;
    for (int attempt = 0; attempt < 60; ++attempt) {
      const auto result = run(1, repeat(op), 1, true);
      if (result.failures == 0) return;
      last = result.first_failure;
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
    throw std::runtime_error(what + " does not answer: " + last);
  }

  void close_all() {
    for (auto& node : nodes_) node->close_client_sessions();
    run_until([] { return true; });
  }

 private:
  void run_until(const std::function<bool()>& done) {
    const auto give_up = Clock::now() + std::chrono::seconds(180);
    while (!done()) {
      if (Clock::now() > give_up) throw std::runtime_error("the clients hung for 180 s");
      auto timeout = std::chrono::milliseconds(100);
      for (auto& node : nodes_) timeout = std::min(timeout, node->next_timeout());
      epoll_event events[64];
      const int ready = ::epoll_wait(epoll_, events, 64, static_cast<int>(std::max<long>(0, timeout.count())));
      if (ready < 0 && errno != EINTR) throw std::runtime_error(std::string("epoll_wait: ") + std::strerror(errno));
      if (ready <= 0) {
        for (auto& node : nodes_) node->process_ready();
      }
      for (int e = 0; e < ready; ++e) nodes_[events[e].data.u64]->process_ready();
    }
  }

  std::vector<std::unique_ptr<transport::Node>> nodes_;
  int epoll_ = -1;
};

// One server under load in a round: its processes (CPU summed) and its operation.
struct Side {
  Side(std::string side_name, std::vector<pid_t> server_pids, OpSource op_source, bool new_session_per_op = true)
      : name(std::move(side_name)),
        servers(std::move(server_pids)),
        source(std::move(op_source)),
        new_session_each(new_session_per_op) {}

  std::string name;
  std::vector<pid_t> servers;
  OpSource source;
  bool new_session_each = true;
  // Per round:
  std::vector<double> cpu_us_per_op;
  std::vector<double> per_second;
  std::vector<double> latencies_p50;
  std::vector<double> latencies_p99;
  int failures = 0;
  std::string first_failure;
};

double servers_cpu(const std::vector<pid_t>& servers) {
  double total = 0;
  for (const pid_t pid : servers) total += cpu_microseconds(pid);
  return total;
}

void one_round(ClientPool& pool, std::size_t width, Side& side, int ops) {
  const double before = servers_cpu(side.servers);
  const auto result = pool.run(width, side.source, ops, side.new_session_each);
  // Let the server finish what the last answers started (close_notify, a notification) before reading its CPU.
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  side.cpu_us_per_op.push_back((servers_cpu(side.servers) - before) / ops);
  side.per_second.push_back(ops / result.seconds);
  side.latencies_p50.push_back(percentile(result.latencies_us, 0.5));
  side.latencies_p99.push_back(percentile(result.latencies_us, 0.99));
  if (result.failures != 0 && side.failures == 0) side.first_failure = result.first_failure;
  side.failures += result.failures;
}

// Interleaved rounds over the sides, each round in the order given.
void interleave(ClientPool& pool, std::size_t width, std::vector<Side*> sides, int rounds, int ops,
                const std::string& label) {
  for (int round = 0; round < rounds; ++round) {
    std::printf("  %s round %d:", label.c_str(), round + 1);
    for (Side* side : sides) {
      one_round(pool, width, *side, ops);
      std::printf(" %s %.0f us/op (%.0f/s)", side->name.c_str(), side->cpu_us_per_op.back(), side->per_second.back());
    }
    std::printf("  [load %s]\n", load_average().c_str());
    std::fflush(stdout);
  }
  for (Side* side : sides) {
    if (side->failures != 0) {
      std::printf("  %s: %d failed operations, first: %s\n", side->name.c_str(), side->failures,
                  side->first_failure.c_str());
    }
  }
}

// Per-round stock/dauthd CPU ratios (higher is better for dauthd).
std::vector<double> ratios(const Side& stock, const Side& dauthd) {
  std::vector<double> out;
  for (std::size_t i = 0; i < stock.cpu_us_per_op.size(); ++i) {
    out.push_back(stock.cpu_us_per_op[i] / dauthd.cpu_us_per_op[i]);
  }
  return out;
}

void add_cpu_row(const std::string& measure, const Side& stock, const Side& dauthd, double goal) {
  const auto r = ratios(stock, dauthd);
  g_rows.push_back({measure, fixed(median(stock.cpu_us_per_op), 0) + " us",
                    fixed(median(dauthd.cpu_us_per_op), 0) + " us", spread(r), ">= " + fixed(goal, 2),
                    met(median(r) >= goal), load_average()});
}

// ---- servers ---------------------------------------------------------------------------------------------------


// A stock coap-server-gnutls; its DTLS port is dtls_port.
struct StockServer {
  pid_t pid = -1;
  std::uint16_t dtls_port = 0;

  StockServer(const std::filesystem::path& dir, const std::string& name, bool psk, const std::string& pki_prefix) {
    // coap-server -p P listens for CoAP on P and for DTLS on P + 1, each over UDP and TCP.
    const std::uint16_t port = test::free_loopback_ports(2, test::PortUse::udp_and_tcp);
    dtls_port = static_cast<std::uint16_t>(port + 1);
    std::vector<std::string> argv = {"coap-server-gnutls", "-A", "127.0.0.1", "-p", std::to_string(port), "-v", "0"};
    if (psk) argv.insert(argv.end(), {"-k", kStockPsk});
    if (!pki_prefix.empty()) {
      argv.insert(argv.end(), {"-c", pki_prefix + "stock.pem", "-j", pki_prefix + "stock.key", "-C",
                               pki_prefix + "ca.pem"});
    }
    pid = spawn(argv, dir / ("stock-" + name + ".log"));
  }
  ~StockServer() {
    ::kill(pid, SIGTERM);
    int status = 0;
    ::waitpid(pid, &status, 0);
  }
  StockServer(const StockServer&) = delete;
  StockServer& operator=(const StockServer&) = delete;

  transport::Peer peer() const { return {"127.0.0.1", dtls_port}; }
};

// A file's bytes straight into guarded memory (key files: no std::string copy).
SecretBuffer read_secret_file(const std::filesystem::path& path) {
  const auto size = static_cast<std::size_t>(std::filesystem::file_size(path));
  SecretBuffer bytes(size);
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (!in) throw std::runtime_error("cannot read " + path.string());
  return bytes;
}

// A dauthd key file (hex, one optional trailing newline) as the key.
SecretBuffer read_key_file(const std::filesystem::path& path) {
  const SecretBuffer text = read_secret_file(path);
  std::size_t length = text.size();
  while (length > 0 && (text.data()[length - 1] == '\n' || text.data()[length - 1] == '\r')) --length;
  return must(secret_from_hex(std::string_view(reinterpret_cast<const char*>(text.data()), length)),
              "key file " + path.string());
}

// The AE "meter" enrolled by this process (rspf::Enrolee with its own key store), to hold the credential of a
// DTLS-PSK session to gateway B's valve: psk_identity = KeID, psk = the usage-constrained key (PROTOCOL.md §4).
// Gateway A stays down in the measures that use it, so only the bench enrols as meter.
struct BenchEnrolee {
  std::unique_ptr<transport::Node> node;
  std::optional<crypto::KeyStore> store;
  std::unique_ptr<rspf::Enrolee> enrolee;

  explicit BenchEnrolee(const Deployment& d) {
    const auto dir = d.dir / "bench-enrolee";
    std::filesystem::create_directory(dir);
    ::chmod(dir.c_str(), 0700);
    store.emplace(must(crypto::KeyStore::open(dir, SecretBuffer::random(crypto::kMasterKeySize)), "bench key store"));
    const std::string kpm_id = std::string("meter@") + kMefFqdn;
    if (auto stored = store->put(crypto::BootstrapKeyRecord{kpm_id, read_key_file(d.dir / "keys" / "meter.kpm"),
                                                            "CAE-meter"});
        !stored.ok()) {
      throw std::runtime_error("bench key store: " + stored.error().to_string());
    }
    node = must(transport::Node::create(transport::NodeConfig{}), "bench enrolee node");
    node->set_failure_observer([](const transport::Failure&) {});
    rspf::EnroleeConfig config;
    config.kpm_id = kpm_id;
    config.mef_address = transport::Peer{"127.0.0.1", d.ports.at("mef")};
    config.log = [](rspf::LogKind, const std::string&, const std::string&) {};
    enrolee = must(rspf::Enrolee::create(*node, *store, std::move(config)), "bench enrolee");
    std::optional<Result<void>> outcome;
    enrolee->enrol([&](Result<void> r) { outcome.emplace(std::move(r)); });
    node->run_until([&] { return outcome.has_value(); }, std::chrono::seconds(30));
    if (!outcome || !outcome->ok()) {
      throw std::runtime_error("bench enrolment as CAE-meter failed: " +
                               (outcome ? outcome->error().to_string() : std::string("timeout")));
    }
  }

  // PSK credentials for a session to B naming the valve.
  transport::ClientCredentials to_valve() const {
    auto key = must(enrolee->key_for_target("CAE-valve"), "key for CAE-valve");
    return transport::ClientCredentials::psk(key.ke_id, std::move(key.key), "CAE-valve");
  }
};

transport::Request get_time(const std::string& originator) {
  transport::Request request;
  request.path = {"time"};
  request.originator = originator;
  return request;
}

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// Gateway B (and the MEF and the valve) as bench_deployment sets them up, gateway A not started. B may hold many
// sessions for the live-session measure; they must not expire while it runs.
Deployment& start_without_a(Deployment& d) {
  d.replace_in_config("b", "[peer]\n", "[peer]\nmax_sessions = 12000\nidle_timeout = 3600\n");
  d.start_dauthd("mef");
  d.start_valve();
  d.start_dauthd("b");
  d.wait_enrolled("b", "CAE-valve");
  return d;
}

// Waits until the node's log has `text`; throws after limit_seconds.
void wait_for_log(const Deployment& d, const std::string& node, const std::string& text, int limit_seconds) {
  const auto give_up = Clock::now() + std::chrono::seconds(limit_seconds);
  while (read_text(d.dir / (node + ".log")).find(text) == std::string::npos) {
    if (Clock::now() > give_up) throw std::runtime_error("no '" + text + "' in " + node + ".log");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

// ---- measures --------------------------------------------------------------------------------------------------

// What measure_psk and measure_live share: the deployment without gateway A, this process enrolled as CAE-meter,
// a stock PSK server, the two operations (PSK handshake + GET each) and a warmed-up client pool.
struct ForwardedGet {
  ForwardedGet(const Options& options, const std::string& name)
      : d({options.dauthd_path, "bench-dauthd-" + name, ""}),
        bench(start_without_a(d)),
        stock_server(d.dir, name, true, ""),
        stock_op{stock_server.peer(),
                 transport::ClientCredentials::psk(kStockPskIdentity, SecretBuffer::copy_of(ByteView::of(kStockPsk)),
                                                   ""),
                 get_time(""), 205},
        dauthd_op{{"127.0.0.1", d.ports.at("b_peer")}, bench.to_valve(), get_time("CAE-meter"), 205},
        pool(options.clients) {
    pool.warm_up(stock_op, "coap-server-gnutls");
    pool.warm_up(dauthd_op, "dauthd B");
  }
  Deployment d;
  BenchEnrolee bench;
  StockServer stock_server;
  const Op stock_op;
  const Op dauthd_op;
  ClientPool pool;
};

void measure_psk(const Options& options) {
  std::printf("\n-- psk: PSK handshake + GET, dauthd B forwarding to the valve vs stock answering itself --\n");
  ForwardedGet f(options, "psk");
  auto& [d, bench, stock_server, stock_op, dauthd_op, pool] = f;
  Side stock{"stock", {stock_server.pid}, repeat(stock_op)};
  Side dauthd{"dauthd", {d.children.at("b")}, repeat(dauthd_op)};
  interleave(pool, options.clients, {&stock, &dauthd}, options.rounds, options.ops, "psk");
  add_cpu_row("PSK handshake + GET (dauthd forwards to the AE)", stock, dauthd, 1.0);
}

// P-256 certificates with the repository's own tool (scripts/demo.d/make-pki): the MEF's issuing CA, the client's
// AE-ID certificate (SAN URI CAE-meter) under it, and the stock server's certificate under the same CA.
std::string make_pki(const std::filesystem::path& dir) {
  const auto pki = dir / "pki";
  std::filesystem::create_directory(pki);
  const std::string prefix = (pki / "").string();
  for (const std::vector<std::string>& step :
       {std::vector<std::string>{MAKE_PKI_PATH, "ca", prefix + "ca", "bench MEF CA"},
        std::vector<std::string>{MAKE_PKI_PATH, "leaf", prefix + "ca", prefix + "meter", "CAE-meter", "URI:CAE-meter"},
        std::vector<std::string>{MAKE_PKI_PATH, "leaf", prefix + "ca", prefix + "stock", "stock.bench.test",
                                 "DNS:stock.bench.test"}}) {
    const auto result = run_command(step);
    if (result.exit_code != 0) throw std::runtime_error("make-pki failed: " + result.output);
  }
  return prefix;
}

transport::X509Credentials meter_certificate(const std::string& pki) {
  return {read_text(pki + "meter.pem"), read_secret_file(pki + "meter.key"), read_text(pki + "ca.pem")};
}

void measure_x509(const Options& options) {
  const bool psk_side = options.wants("psk-x509");
  const bool x509_side = options.wants("x509");
  std::printf("\n-- psk-x509 / x509: B with X.509 enabled (peer.trust_anchors, the valve's AE-ID certificate) --\n");
  Deployment d({options.dauthd_path, "bench-dauthd-x509", ""});
  const std::string pki = make_pki(d.dir);
  // The MEF issues the valve an AE-ID certificate over EST; B presents it to handshakes naming CAE-valve and trusts
  // the MEF CA for peers (docs/dauthd.toml.5, NOTES).
  d.replace_in_config("mef", "[mef]\n",
                      "[mef]\nissuing_ca_certificate = \"" + pki + "ca.pem\"\nissuing_ca_key = \"" + pki + "ca.key\"\n");
  d.replace_in_config("mef", "enrolee_id = \"CAE-valve\"\n", "enrolee_id = \"CAE-valve\"\ncertificate_enrolment = true\n");
  d.replace_in_config("b", "valve.kpm\"\n", "valve.kpm\"\ncertificate_enrolment = true\n");
  d.replace_in_config("b", "[peer]\n", "[peer]\ntrust_anchors = [\"" + pki + "ca.pem\"]\n");
  start_without_a(d);
  const Op x509_dauthd{{"127.0.0.1", d.ports.at("b_peer")},
                       transport::ClientCredentials::certificate(meter_certificate(pki), "CAE-valve", "CAE-valve"),
                       get_time("CAE-meter"), 205};
  ClientPool pool(options.clients);
  // B refuses X.509 peers until the MEF's revocation list arrived once (fail closed): warm-up retries.
  pool.warm_up(x509_dauthd, "dauthd B (X.509)");
  if (psk_side) {
    BenchEnrolee bench(d);
    StockServer stock_psk(d.dir, "psk", true, "");
    StockServer stock_both(d.dir, "psk-pki", true, pki);
    const auto stock_credentials =
        transport::ClientCredentials::psk(kStockPskIdentity, SecretBuffer::copy_of(ByteView::of(kStockPsk)), "");
    const Op stock_op{stock_psk.peer(), stock_credentials.clone(), get_time(""), 205};
    const Op stock_both_op{stock_both.peer(), stock_credentials.clone(), get_time(""), 205};
    const Op dauthd_op{{"127.0.0.1", d.ports.at("b_peer")}, bench.to_valve(), get_time("CAE-meter"), 205};
    pool.warm_up(stock_op, "coap-server-gnutls");
    pool.warm_up(stock_both_op, "coap-server-gnutls (PSK + PKI)");
    pool.warm_up(dauthd_op, "dauthd B");
    Side stock{"stock", {stock_psk.pid}, repeat(stock_op)};
    Side dauthd{"dauthd", {d.children.at("b")}, repeat(dauthd_op)};
    Side stock_pki{"stock+pki", {stock_both.pid}, repeat(stock_both_op)};
    interleave(pool, options.clients, {&stock, &dauthd, &stock_pki}, options.rounds, options.ops, "psk-x509");
    add_cpu_row("PSK handshake + GET, X.509 enabled on dauthd's endpoint", stock, dauthd, 1.0);
    const auto r = ratios(stock_pki, dauthd);
    g_rows.push_back({"  (information: stock with PSK + PKI enabled too)",
                      fixed(median(stock_pki.cpu_us_per_op), 0) + " us",
                      fixed(median(dauthd.cpu_us_per_op), 0) + " us", spread(r), "", "", load_average()});
  }
  if (x509_side) {
    StockServer stock_server(d.dir, "pki", false, pki);
    const Op stock_op{stock_server.peer(), transport::ClientCredentials::certificate(meter_certificate(pki), "", ""),
                      get_time(""), 205};
    pool.warm_up(stock_op, "coap-server-gnutls (PKI)");
    Side stock{"stock", {stock_server.pid}, repeat(stock_op)};
    Side dauthd{"dauthd", {d.children.at("b")}, repeat(x509_dauthd)};
    interleave(pool, options.clients, {&stock, &dauthd}, options.rounds, options.ops, "x509");
    add_cpu_row("X.509 P-256 mutual handshake + GET", stock, dauthd, 1.2);
  }
}

// ---- live sessions: holder processes ----------------------------------------------------------------------------

long open_fds() {
  return static_cast<long>(std::distance(std::filesystem::directory_iterator("/proc/self/fd"),
                                         std::filesystem::directory_iterator{}));
}

// A forked child that opens `count` sessions with `op` (one client Node each, so that every session is its own
// DTLS session with the same credential), reports "<opened> <failed> <fds>\n" on report_fd and then keeps them,
// idle, until it is killed. Killing it (instead of closing 5,000 sessions at once) leaves the servers' sessions to
// their idle timeout.
[[noreturn]] void hold_sessions(const Op& op, int count, int report_fd) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  int failed = 0;
  std::unique_ptr<ClientPool> pool;  // outlives the report: the sessions stay open until the process is killed
  try {
    pool = std::make_unique<ClientPool>(static_cast<std::size_t>(count));
    // Batches of 50: both servers let at most 100 handshakes run at once (libcoap's default, peer.max_handshakes).
    for (int first = 0; first < count; first += 50) {
      const int batch = std::min(50, count - first);
      failed += pool->run(static_cast<std::size_t>(batch), repeat(op), batch, false, static_cast<std::size_t>(first))
                    .failures;
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "holder: %s\n", error.what());
    failed = count;
  }
  const std::string report =
      std::to_string(count - failed) + " " + std::to_string(failed) + " " + std::to_string(open_fds()) + "\n";
  (void)!::write(report_fd, report.data(), report.size());
  for (;;) ::pause();
}

class Holders {
 public:
  ~Holders() {
    for (const pid_t pid : pids_) ::kill(pid, SIGKILL);
    for (const pid_t pid : pids_) {
      int status = 0;
      ::waitpid(pid, &status, 0);
    }
  }

  // Opens `count` more sessions, one holder of at most holder_size after the other. Returns the failures.
  int open(const Op& op, int count, int holder_size) {
    int failures = 0;
    for (int done = 0; done < count; done += holder_size) {
      const int these = std::min(holder_size, count - done);
      int fds[2];
      if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
      std::fflush(stdout);
      const pid_t pid = ::fork();
      if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
      if (pid == 0) {
        ::close(fds[0]);
        hold_sessions(op, these, fds[1]);
      }
      ::close(fds[1]);
      pids_.push_back(pid);
      char line[128] = {};
      ssize_t n = 0;
      while ((n = ::read(fds[0], line, sizeof line - 1)) < 0 && errno == EINTR) {
      }
      ::close(fds[0]);
      int opened = 0, failed = these;
      long holder_fds = 0;
      if (n <= 0 || std::sscanf(line, "%d %d %ld", &opened, &failed, &holder_fds) != 3) failed = these;
      failures += failed;
      max_fds_ = std::max(max_fds_, holder_fds);
    }
    return failures;
  }
  long max_fds() const { return max_fds_; }

 private:
  std::vector<pid_t> pids_;
  long max_fds_ = 0;
};

// dauthd's own count of live server sessions of its peer endpoint (control protocol "stats"), or -1.
long dauthd_live_sessions(const Deployment& d, const std::string& node) {
  const auto reply = control(d.control_socket(node), "{\"verb\":\"stats\"}\n");
  const std::string key = "\"peer_server_sessions\":";
  const auto at = reply.find(key);
  if (at == std::string::npos) return -1;
  return std::atol(reply.c_str() + at + key.size());
}

void measure_live(const Options& options) {
  std::printf("\n-- live: PSK handshake + GET with N idle sessions held open --\n");
  ForwardedGet f(options, "live");
  auto& [d, bench, stock_server, stock_op, dauthd_op, pool] = f;
  Holders stock_holders;
  Holders dauthd_holders;
  std::vector<int> levels = options.live;
  std::sort(levels.begin(), levels.end());
  std::map<int, std::pair<std::vector<double>, std::vector<double>>> cost;  // level -> (stock, dauthd) per round
  int held = 0;
  std::optional<Clock::time_point> first_opened;
  for (const int level : levels) {
    if (level > held) {
      if (!first_opened) first_opened = Clock::now();
      const auto begin = Clock::now();
      const int stock_failed = stock_holders.open(stock_op, level - held, options.holder_size);
      const auto stock_done = Clock::now();
      const int dauthd_failed = dauthd_holders.open(dauthd_op, level - held, options.holder_size);
      std::printf("  opened %d more idle sessions each: stock %.1f s (%d failed), dauthd %.1f s (%d failed); "
                  "holder fds at most %ld; dauthd reports %ld live server sessions\n",
                  level - held, std::chrono::duration<double>(stock_done - begin).count(), stock_failed,
                  std::chrono::duration<double>(Clock::now() - stock_done).count(), dauthd_failed,
                  std::max(stock_holders.max_fds(), dauthd_holders.max_fds()), dauthd_live_sessions(d, "b"));
      held = level;
    }
    Side stock{"stock", {stock_server.pid}, repeat(stock_op)};
    Side dauthd{"dauthd", {d.children.at("b")}, repeat(dauthd_op)};
    interleave(pool, options.clients, {&stock, &dauthd}, options.rounds, options.ops,
               "live " + std::to_string(level));
    cost[level] = {stock.cpu_us_per_op, dauthd.cpu_us_per_op};
    add_cpu_row("handshake + GET with " + std::to_string(level) + " live sessions", stock, dauthd,
                level == 0 ? 1.0 : 0.0);
    if (level != 0) {  // the goal at N is the growth below; here the comparison is information
      g_rows.back().goal = "";
      g_rows.back().met = "";
    }
    if (first_opened) {
      const double age = std::chrono::duration<double>(Clock::now() - *first_opened).count();
      if (age > 280) {
        std::printf("  warning: the oldest held sessions are %.0f s old; coap-server-gnutls drops idle sessions "
                    "after 300 s\n", age);
      }
    }
  }
  if (cost.count(0) == 0) return;
  const double stock_zero = median(cost[0].first);
  const double dauthd_zero = median(cost[0].second);
  for (const auto& [level, per_round] : cost) {
    if (level == 0) continue;
    std::vector<double> stock_growth;
    std::vector<double> dauthd_growth;
    for (const double c : per_round.first) stock_growth.push_back(c / stock_zero);
    for (const double c : per_round.second) dauthd_growth.push_back(c / dauthd_zero);
    const double dauthd_median = median(dauthd_growth);
    g_rows.push_back({"  cost at " + std::to_string(level) + " / cost at 0 (ratio column: dauthd's)",
                      fixed(median(stock_growth), 2) + "x", fixed(dauthd_median, 2) + "x", spread(dauthd_growth),
                      "<= 1.50", met(dauthd_median <= 1.5 && dauthd_median <= median(stock_growth)),
                      load_average()});
  }
}

// ---- proxied requests ----------------------------------------------------------------------------------------

void measure_proxy(const Options& options) {
  std::printf("\n-- proxy: client -> dauthd A -> DTLS -> dauthd B -> valve vs client -> valve --\n");
  Deployment d({options.dauthd_path, "bench-dauthd-proxy", ""});
  d.start();
  const Op direct{{"127.0.0.1", d.ports.at("valve")}, transport::ClientCredentials::plain(), get_time(""), 205};
  Op proxied{{"127.0.0.1", d.ports.at("a_local")}, transport::ClientCredentials::plain(), {}, 205};
  proxied.request.proxy_uri = "coap://CAE-valve/time";
  proxied.request.originator = "CAE-meter";
  ClientPool pool(16);
  pool.warm_up(direct, "coap-server-notls");
  // The first proxied request sets up the AE-pair session (B fetches the key from the MEF, A retries).
  pool.warm_up(proxied, "the proxied path");
  const std::vector<pid_t> valve{d.children.at("valve")};
  const std::vector<pid_t> path{d.children.at("a"), d.children.at("b"), d.children.at("valve")};
  Side direct_one{"direct", valve, repeat(direct), false};
  Side proxied_one{"proxied", path, repeat(proxied), false};
  interleave(pool, 1, {&direct_one, &proxied_one}, options.rounds, options.latency_samples, "proxy 1 outstanding");
  Side direct_many{"direct", valve, repeat(direct), false};
  Side proxied_many{"proxied", path, repeat(proxied), false};
  interleave(pool, 16, {&direct_many, &proxied_many}, options.rounds, options.proxy_requests, "proxy 16 outstanding");

  std::vector<double> rate_ratio;
  for (std::size_t i = 0; i < proxied_many.per_second.size(); ++i) {
    rate_ratio.push_back(proxied_many.per_second[i] / direct_many.per_second[i]);
  }
  const double proxied_rate = median(proxied_many.per_second);
  g_rows.push_back({"proxied requests/s, 16 outstanding (ratio: proxied/direct)",
                    fixed(median(direct_many.per_second), 0) + "/s", fixed(proxied_rate, 0) + "/s",
                    spread(rate_ratio), ">= 20000/s", met(proxied_rate >= 20000), load_average()});
  std::vector<double> added_p50;
  std::vector<double> added_p99;
  for (std::size_t i = 0; i < proxied_one.latencies_p50.size(); ++i) {
    added_p50.push_back(proxied_one.latencies_p50[i] - direct_one.latencies_p50[i]);
    added_p99.push_back(proxied_one.latencies_p99[i] - direct_one.latencies_p99[i]);
  }
  g_rows.push_back({"added latency p50, one at a time (ratio: added us)",
                    fixed(median(direct_one.latencies_p50), 0) + " us",
                    fixed(median(proxied_one.latencies_p50), 0) + " us", spread(added_p50, 0), "<= 200 us",
                    met(median(added_p50) <= 200), load_average()});
  g_rows.push_back({"added latency p99, one at a time (ratio: added us)",
                    fixed(median(direct_one.latencies_p99), 0) + " us",
                    fixed(median(proxied_one.latencies_p99), 0) + " us", spread(added_p99, 0), "", "", load_average()});
  g_rows.push_back({"server CPU/request, 16 outst. (valve | A + B + valve)",
                    fixed(median(direct_many.cpu_us_per_op), 0) + " us",
                    fixed(median(proxied_many.cpu_us_per_op), 0) + " us", "", "", "", load_average()});
}

// ---- the MEF -----------------------------------------------------------------------------------------------------

void measure_mef(const Options& options) {
  std::printf("\n-- mef: enrolments with gateway B observing /fetchCredentials vs handshake + GET, same MEF --\n");
  Deployment d({options.dauthd_path, "bench-dauthd-mef", ""});
  start_without_a(d);
  // B observes the MEF's feed for CAE-valve, which every enrolment of meter names, once its valve is enrolled
  // (its first attempt, before that, backs off for about a second).
  wait_for_log(d, "b", "feed mef=" + std::string(kMefFqdn) + " subscribing as", 30);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const transport::Peer mef{"127.0.0.1", d.ports.at("mef")};
  const auto credentials = transport::ClientCredentials::psk(std::string("meter@") + kMefFqdn,
                                                             read_key_file(d.dir / "keys" / "meter.kpm"), kMefFqdn);
  transport::Request revoked;
  revoked.path = {"mef", "revoked"};
  transport::Request enrolment = rspf::enrolment_request("CAE-meter", rspf::EnrolmentRequest{});
  const Op handshake_op{mef, credentials.clone(), revoked, 205};
  const Op enrolment_op{mef, credentials.clone(), enrolment, 204};
  ClientPool pool(options.mef_in_flight);
  pool.warm_up(handshake_op, "the MEF (GET /mef/revoked)");
  pool.warm_up(enrolment_op, "the MEF (enrolment)");
  Side handshake{"handshake+GET", {d.children.at("mef")}, repeat(handshake_op)};
  Side enrolments{"enrolment", {d.children.at("mef")}, repeat(enrolment_op)};
  const double b_before = cpu_microseconds(d.children.at("b"));
  interleave(pool, options.mef_in_flight, {&handshake, &enrolments}, options.rounds, options.ops, "mef");
  const double b_per_enrolment = (cpu_microseconds(d.children.at("b")) - b_before) / (options.rounds * options.ops);
  std::vector<double> cpu_ratio;
  std::vector<double> rate_ratio;
  for (std::size_t i = 0; i < handshake.cpu_us_per_op.size(); ++i) {
    cpu_ratio.push_back(handshake.cpu_us_per_op[i] / enrolments.cpu_us_per_op[i]);
    rate_ratio.push_back(enrolments.per_second[i] / handshake.per_second[i]);
  }
  const std::string in_flight = std::to_string(options.mef_in_flight);
  g_rows.push_back({"MEF enrolment vs PSK handshake+GET, " + in_flight + " in flight, B observing",
                    fixed(median(handshake.cpu_us_per_op), 0) + " us",
                    fixed(median(enrolments.cpu_us_per_op), 0) + " us", spread(cpu_ratio), ">= 0.80",
                    met(median(cpu_ratio) >= 0.8), load_average()});
  g_rows.push_back({"  (information: the same as wall-clock rates, enrolments/s / GETs/s)",
                    fixed(median(handshake.per_second), 0) + "/s", fixed(median(enrolments.per_second), 0) + "/s",
                    spread(rate_ratio), "", "", load_average()});
  std::printf("  gateway B (the observing target) spent %.0f us of CPU per enrolment (notifications, key fetches)\n",
              b_per_enrolment);
}

// ---- idle memory -------------------------------------------------------------------------------------------------

std::string rss_text(const std::map<std::string, long>& m) {
  return fixed(m.at("VmRSS") / 1024.0, 2) + " MB";
}

void print_memory(const std::string& what, pid_t pid) {
  const auto m = memory_status(pid);
  std::printf("  %s: VmRSS %ld kB = RssAnon %ld + RssFile %ld + RssShmem %ld (VmHWM %ld kB)\n", what.c_str(),
              m.at("VmRSS"), m.at("RssAnon"), m.at("RssFile"), m.at("RssShmem"), m.at("VmHWM"));
  const auto mappings = resident_by_mapping(pid);
  std::map<std::string, long> parts;  // shared libraries, the executable, heap, other anonymous memory
  for (const auto& [name, kib] : mappings) {
    if (name.find(".so") != std::string::npos) {
      parts["libraries"] += kib;
    } else if (name == "[heap]" || name == "[anonymous]" || name == "[stack]") {
      parts[name] += kib;
    } else {
      parts["executable and other"] += kib;
    }
  }
  std::printf("    by kind (kB):");
  for (const auto& [kind, kib] : parts) std::printf(" %s %ld,", kind.c_str(), kib);
  std::printf("\n    largest mappings (kB):");
  int shown = 0;
  for (const auto& [name, kib] : mappings) {
    if (kib == 0 || shown++ == 14) break;
    std::printf(" %s %ld,", name.c_str(), kib);
  }
  std::printf("\n");
}

void stop_node(Deployment& d, const std::string& node) {
  const pid_t pid = d.children.at(node);
  ::kill(pid, SIGTERM);
  int status = 0;
  ::waitpid(pid, &status, 0);
  d.children.erase(node);
}

void measure_rss(const Options& options) {
  std::printf("\n-- rss: idle memory of an MEF dauthd, empty and with %d enrolees enrolled --\n", options.enrolees);
  Deployment d({options.dauthd_path, "bench-dauthd-rss", ""});
  std::map<std::string, long> stock_idle;
  {
    StockServer stock(d.dir, "idle", true, "");
    std::this_thread::sleep_for(std::chrono::seconds(1));
    stock_idle = memory_status(stock.pid);
    print_memory("coap-server-gnutls (PSK), idle", stock.pid);
  }
  d.start_dauthd("mef");
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const auto empty = memory_status(d.children.at("mef"));
  print_memory("MEF dauthd, no enrolment stored (2 enrolee rows)", d.children.at("mef"));
  stop_node(d, "mef");

  // N more enrolee rows, each with its own pre-provisioned key, naming the valve as target (nobody observes).
  std::string rows;
  for (int i = 0; i < options.enrolees; ++i) {
    const std::string name = "e" + std::to_string(i);
    const auto key_file = d.dir / "keys" / (name + ".kpm");
    write_private(key_file, random_hex(32));
    rows += "[[mef.enrolee]]\nkpm_id = \"" + name + "@" + kMefFqdn + "\"\nkpm_file = \"" + key_file.string() +
            "\"\nenrolee_id = \"CAE-" + name + "\"\ntargets = [\"CAE-valve\"]\n\n";
  }
  d.replace_in_config("mef", "[[mef.enrolee]]\nkpm_id = \"meter@", rows + "[[mef.enrolee]]\nkpm_id = \"meter@");
  const auto start_begin = Clock::now();
  d.start_dauthd("mef");
  std::printf("  MEF with %d more rows started in %.1f s\n", options.enrolees,
              std::chrono::duration<double>(Clock::now() - start_begin).count());
  std::this_thread::sleep_for(std::chrono::seconds(1));
  const auto configured = memory_status(d.children.at("mef"));
  print_memory("MEF dauthd, " + std::to_string(options.enrolees) + " more rows configured, none enrolled yet",
               d.children.at("mef"));

  // Each enrols once through the real path: PSK handshake with its KpmID + POST /mef/enrolment, 16 in flight.
  const transport::Peer mef{"127.0.0.1", d.ports.at("mef")};
  const auto encoded = rspf::encode(rspf::EnrolmentRequest{}, rspf::ContentFormat::cbor);
  const OpSource enrol_each = [&](int i) {
    const std::string name = "e" + std::to_string(i);
    Op op{mef,
          transport::ClientCredentials::psk(name + "@" + kMefFqdn, read_key_file(d.dir / "keys" / (name + ".kpm")),
                                            kMefFqdn),
          {}, 204};
    op.request.method = transport::Method::post;
    op.request.path = {"mef", "enrolment"};
    op.request.content_format = static_cast<std::uint16_t>(rspf::ContentFormat::cbor);
    op.request.originator = "CAE-" + name;
    op.request.payload = encoded;
    return op;
  };
  ClientPool pool(16);
  const auto enrolled = pool.run(16, enrol_each, options.enrolees, true);
  std::printf("  %d enrolments in %.1f s (%.0f/s), %d failed%s%s\n", options.enrolees, enrolled.seconds,
              options.enrolees / enrolled.seconds, enrolled.failures, enrolled.failures ? ", first: " : "",
              enrolled.first_failure.c_str());
  pool.close_all();
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const auto after = memory_status(d.children.at("mef"));
  print_memory("MEF dauthd, " + std::to_string(options.enrolees) + " enrolled, idle after enrolling",
               d.children.at("mef"));
  stop_node(d, "mef");
  d.start_dauthd("mef");
  std::this_thread::sleep_for(std::chrono::seconds(2));
  const auto restarted = memory_status(d.children.at("mef"));
  print_memory("MEF dauthd, " + std::to_string(options.enrolees) + " enrolled, idle after a restart",
               d.children.at("mef"));

  const auto split = [](const std::map<std::string, long>& m) {
    return fixed(m.at("VmRSS") / 1024.0, 2) + " MB (anon " + fixed(m.at("RssAnon") / 1024.0, 1) +
           ", file " + fixed(m.at("RssFile") / 1024.0, 1) + ")";
  };
  const std::string n = std::to_string(options.enrolees);
  const long limit_kib = 8 * 1024;
  g_rows.push_back({"idle RSS, MEF with " + n + " enrolees, after a restart", rss_text(stock_idle), split(restarted),
                    "", "<= 8 MB", met(restarted.at("VmRSS") <= limit_kib), load_average()});
  g_rows.push_back({"idle RSS, MEF with " + n + " enrolees, after enrolling them", rss_text(stock_idle), split(after),
                    "", "<= 8 MB", met(after.at("VmRSS") <= limit_kib), load_average()});
  g_rows.push_back({"idle RSS, MEF with " + n + " rows configured, none enrolled", rss_text(stock_idle),
                    split(configured), "", "", "", load_average()});
  g_rows.push_back({"idle RSS, MEF without enrolments (2 rows)", rss_text(stock_idle), split(empty), "", "", "",
                    load_average()});
  if (enrolled.failures != 0) g_rows.back().measure += " (enrolments failed!)";
}

// ---- main ----------------------------------------------------------------------------------------------------

std::vector<int> parse_int_list(const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::stoi(item));
  return out;
}

[[noreturn]] void usage(const std::string& problem) {
  std::fprintf(stderr,
               "bench_dauthd: %s\nusage: bench_dauthd [--only psk,psk-x509,x509,live,proxy,mef,rss] [--rounds N] "
               "[--ops N] [--clients N] [--live 0,1000,5000] [--holder-size N] [--proxy-requests N] "
               "[--latency-samples N] [--mef-in-flight N] [--enrolees N]\n",
               problem.c_str());
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options options;
  if (const char* other = std::getenv("BENCH_DAUTHD")) options.dauthd_path = other;
  const std::set<std::string> measures = {"psk", "psk-x509", "x509", "live", "proxy", "mef", "rss"};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) usage(flag + " needs a value");
    const std::string value = argv[++i];
    try {
      if (flag == "--only") {
        std::stringstream in(value);
        std::string item;
        while (std::getline(in, item, ',')) {
          if (measures.count(item) == 0) usage("unknown measure '" + item + "'");
          options.only.insert(item);
        }
      } else if (flag == "--rounds") {
        options.rounds = std::stoi(value);
      } else if (flag == "--ops") {
        options.ops = std::stoi(value);
      } else if (flag == "--clients") {
        options.clients = static_cast<std::size_t>(std::stoi(value));
      } else if (flag == "--live") {
        options.live = parse_int_list(value);
      } else if (flag == "--holder-size") {
        options.holder_size = std::stoi(value);
      } else if (flag == "--proxy-requests") {
        options.proxy_requests = std::stoi(value);
      } else if (flag == "--latency-samples") {
        options.latency_samples = std::stoi(value);
      } else if (flag == "--mef-in-flight") {
        options.mef_in_flight = static_cast<std::size_t>(std::stoi(value));
      } else if (flag == "--enrolees") {
        options.enrolees = std::stoi(value);
      } else {
        usage("unknown option " + flag);
      }
    } catch (const std::invalid_argument&) {
      usage(flag + " " + value + ": not a number");
    }
  }
  if (options.rounds < 1 || options.ops < 1 || options.clients < 1 || options.holder_size < 1 ||
      options.holder_size > 180 || options.mef_in_flight < 1 || options.enrolees < 1) {
    usage("values must be positive (--holder-size at most 180: a holder uses about 5 fds per session and its sockets must stay below fd 1000)");
  }
  return options;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  ::signal(SIGPIPE, SIG_IGN);
  std::printf("bench_dauthd: dauthd=%s backend=%s rounds=%d ops=%d clients=%zu load %s\n",
              options.dauthd_path.c_str(), std::string(transport::to_string(transport::compiled_backend())).c_str(),
              options.rounds, options.ops, options.clients, load_average().c_str());
  const std::vector<std::pair<std::string, std::function<void(const Options&)>>> measures = {
      {"psk", measure_psk},     {"x509", measure_x509}, {"live", measure_live}, {"proxy", measure_proxy},
      {"mef", measure_mef},     {"rss", measure_rss}};
  int failed = 0;
  for (const auto& [name, run] : measures) {
    const bool selected = name == "x509" ? options.wants("x509") || options.wants("psk-x509") : options.wants(name);
    if (!selected) continue;
    try {
      run(options);
    } catch (const std::exception& error) {
      ++failed;
      std::printf("  %s FAILED: %s\n", name.c_str(), error.what());
      g_rows.push_back({name + ": FAILED (" + error.what() + ")", "", "", "", "", "NO", load_average()});
    }
    std::fflush(stdout);
  }
  print_summary();
  return failed == 0 ? 0 : 1;
}

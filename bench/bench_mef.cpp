// bench_mef: MEF enrolments per second (PSK RSPF, full exchange: new DTLS-PSK session, POST /mef/enrolment,
// exporter, Ke/KeID derivation and the durable KeyStore put before the 2.04) as a ratio of the bare PSK handshake
// rate of the same Node type (new session + one GET to a trivial route), both measured in this run.
//
// Target (issue 4): >= 0.7x. No pass/fail: the table is for the reader.
// Headline: N enrolees in flight at once (N client Nodes, each its own session cache, each with one exchange
// outstanding; when it completes, that client's sessions are closed and its next exchange starts). A MEF serving
// many enrolees is bounded by CPU, not by one fdatasync per enrolment: enrolments arriving while a flush runs share
// the next one (group commit, keystore.hpp put_when_durable). The baseline runs in the same harness with the same
// N, so both sides see the same client work and the same loop.
// Information: the sequential case (N = 1, the same function), where every enrolment waits for its own fdatasync;
// the whole Enrolee exchange (one at a time, adds the Enrolee's own durable put and checks); the file system's
// fdatasync rate (probes), and the fdatasyncs timed inside the MEF's store with the entries each made durable.
// Rounds alternate baseline and MEF so that machine noise hits both; the median round rate of each is compared.
// The machine's load matters: on a shared VM, run it several times.
//
// Usage: bench_mef [exchanges per round=300] [rounds=5] [in flight=8]
// For profiling one side alone (strace -c, callgrind): BENCH_MEF_ONLY=baseline|mef|enrolee runs that phase only
// (baseline and mef with the N given, enrolee one at a time) and prints its rate, no ratio.
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "dauth/crypto/keystore.hpp"
#include "dauth/rspf/enrolee.hpp"
#include "dauth/rspf/mef.hpp"
#include "dauth/rspf/messages.hpp"

using namespace dauth;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kFqdn = "mef.bench.example";
constexpr const char* kKpmId = "meter@mef.bench.example";
constexpr int kMaxInFlight = 64;  // each client Node holds sockets and a libcoap context; far below any fd limit

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "bench_mef: %s\n", what.c_str());
  std::exit(1);
}

template <class T>
T must(Result<T> result, const char* what) {
  if (!result.ok()) die(std::string(what) + ": " + result.error().to_string());
  return std::move(*result);
}

std::unique_ptr<transport::Node> make_node(std::optional<transport::PskLookup> lookup) {
  transport::NodeConfig config;
  if (lookup) {
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = 0;
    config.psk_lookup = std::move(*lookup);
  }
  auto node = must(transport::Node::create(std::move(config)), "node");
  node->set_failure_observer([](const transport::Failure& f) {
    std::fprintf(stderr, "%s\n", transport::format_failure(f).c_str());
  });
  return node;
}

// Drives nodes from one thread, like the daemon: one epoll over all of their fds. After a wait only the nodes whose
// fd is ready are processed, plus any node not processed for 5 ms (a backstop for libcoap's timers, which run inside
// process_ready()). Processing idle nodes costs system calls (libcoap re-arms its timerfd and polls its sockets)
// that would grow with N and distort the ratio.
class Pump {
 public:
  explicit Pump(std::vector<transport::Node*> nodes)
      : nodes_(std::move(nodes)), last_processed_(nodes_.size()), ready_(nodes_.size()) {
    epoll_ = ::epoll_create1(EPOLL_CLOEXEC);
    if (epoll_ < 0) die(std::string("epoll_create1: ") + std::strerror(errno));
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      epoll_event event{};
      event.events = EPOLLIN;
      event.data.u64 = i;
      if (::epoll_ctl(epoll_, EPOLL_CTL_ADD, nodes_[i]->fd(), &event) != 0) {
        die("epoll_ctl(ADD) of a node's fd: " + std::string(std::strerror(errno)));
      }
    }
  }
  ~Pump() { ::close(epoll_); }
  Pump(const Pump&) = delete;
  Pump& operator=(const Pump&) = delete;

  // Processes until done() (called after every pass; it may start new work) returns true. Exits after 30 s.
  void run_until(const std::function<bool()>& done) {
    constexpr auto kBackstop = std::chrono::milliseconds(5);
    auto now = Clock::now();
    const auto give_up = now + std::chrono::seconds(30);
    std::fill(last_processed_.begin(), last_processed_.end(), now);
    while (!done()) {
      if (now > give_up) die("a round hung for 30 s");
      const auto backstop_due = *std::min_element(last_processed_.begin(), last_processed_.end()) + kBackstop;
      const auto wait = std::chrono::ceil<std::chrono::milliseconds>(std::max(backstop_due - now, Clock::duration{}));
      const int ready = ::epoll_wait(epoll_, ready_.data(), static_cast<int>(ready_.size()),
                                     static_cast<int>(wait.count()));
      if (ready < 0 && errno != EINTR) die(std::string("epoll_wait: ") + std::strerror(errno));
      now = Clock::now();
      for (int i = 0; i < ready; ++i) {
        const auto node = ready_[static_cast<std::size_t>(i)].data.u64;
        nodes_[node]->process_ready();
        last_processed_[node] = now;
      }
      for (std::size_t node = 0; node < nodes_.size(); ++node) {
        if (now - last_processed_[node] < kBackstop) continue;
        nodes_[node]->process_ready();
        last_processed_[node] = now;
      }
    }
  }

 private:
  std::vector<transport::Node*> nodes_;
  std::vector<Clock::time_point> last_processed_;
  std::vector<epoll_event> ready_;
  int epoll_ = -1;
};

// One kind of exchange: a request to a server node and the answer code that counts as success.
struct Exchange {
  transport::Node* server;
  const transport::Request* request;
  int expected_code;
};

// Runs `count` exchanges over `clients`, each client with at most one outstanding, each exchange on a new DTLS
// session (a client's sessions are closed when its exchange completes, before its next one starts). Returns the
// elapsed time; exits on any failure or unexpected code. One client is the sequential case.
Clock::duration run_exchanges(Pump& pump, const std::vector<transport::Node*>& clients,
                              const transport::ClientCredentials& credentials, const Exchange& exchange, int count) {
  const transport::Peer server{"127.0.0.1", exchange.server->secure_port()};
  std::vector<std::optional<Result<transport::Response>>> answers(clients.size());
  std::vector<std::size_t> finished;  // clients whose answer arrived since the last pass
  int started = 0;
  int completed = 0;
  auto start_on = [&](std::size_t client) {
    ++started;
    clients[client]->request(server, credentials, *exchange.request,
                             [&answers, &finished, client](Result<transport::Response> r, const transport::Session*) {
                               answers[client].emplace(std::move(r));
                               finished.push_back(client);
                             });
  };
  const auto begin = Clock::now();
  for (std::size_t client = 0; client < clients.size() && started < count; ++client) start_on(client);
  // Answers are handled between passes, outside the Node's callbacks, as the sequential bench always did.
  pump.run_until([&] {
    while (!finished.empty()) {
      const std::vector<std::size_t> arrived = std::move(finished);
      finished.clear();
      for (const std::size_t client : arrived) {
        auto& answer = *answers[client];
        if (!answer.ok()) die("exchange failed: " + answer.error().to_string());
        if (answer->code != exchange.expected_code) die("exchange answered " + rspf::coap_code_text(answer->code));
        answers[client].reset();
        ++completed;
        clients[client]->close_client_sessions();
        if (started < count) start_on(client);
      }
    }
    return completed == count;
  });
  return Clock::now() - begin;
}

// One Enrolee enrolment at a time (the Enrolee serves one enrolment per call).
Clock::duration run_enrolments(Pump& pump, rspf::Enrolee& enrolee, int count) {
  const auto begin = Clock::now();
  for (int i = 0; i < count; ++i) {
    std::optional<Result<void>> outcome;
    enrolee.enrol([&](Result<void> r) { outcome.emplace(std::move(r)); });
    pump.run_until([&] { return outcome.has_value(); });
    if (!outcome->ok()) die("Enrolee: " + outcome->error().to_string());
  }
  return Clock::now() - begin;
}

double rate(int count, Clock::duration elapsed) {
  return count / std::chrono::duration<double>(elapsed).count();
}

// Cost of one 200-byte write + fdatasync on the key store's file system, seconds: appended (the file grows, so
// fdatasync also writes the inode), or over written zeros (what the key store's preallocated journal does:
// docs/keystore-format.md), the floor of one durable put.
double fdatasync_cost(const std::filesystem::path& dir, int count, bool over_zero_fill) {
  const auto path = dir / "fdatasync.probe";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) die("cannot open " + path.string());
  const std::string entry(200, 'x');
  if (over_zero_fill) {
    const std::string zeros(entry.size() * static_cast<std::size_t>(count), '\0');
    if (::pwrite(fd, zeros.data(), zeros.size(), 0) != static_cast<ssize_t>(zeros.size()) || ::fsync(fd) != 0) {
      die("probe fill failed");
    }
  }
  const auto start = Clock::now();
  for (int i = 0; i < count; ++i) {
    const auto at = static_cast<off_t>(entry.size()) * i;
    if (::pwrite(fd, entry.data(), entry.size(), at) != static_cast<ssize_t>(entry.size()) || ::fdatasync(fd) != 0) {
      die("probe write/fdatasync failed");
    }
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count() / count;
  ::close(fd);
  std::filesystem::remove(path);
  return seconds;
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// The MEF store's fdatasyncs during one MEF phase.
struct SyncRound {
  double seconds_each = 0;       // time waiting in one fdatasync
  double entries_each = 0;       // journal entries one fdatasync made durable
  double seconds_per_entry = 0;  // sync time per enrolment: what a sequential enrolee waits for
};

SyncRound sync_round(const crypto::KeyStore::SyncStats& before, const crypto::KeyStore::SyncStats& after) {
  const auto syncs = static_cast<double>(after.syncs - before.syncs);
  const auto entries = static_cast<double>(after.entries - before.entries);
  const double seconds = std::chrono::duration<double>(after.time - before.time).count();
  if (syncs == 0 || entries == 0) die("the MEF's store made no fdatasync during a MEF phase");
  return SyncRound{seconds / syncs, entries / syncs, seconds / entries};
}

// Per-phase results of every round.
struct Series {
  std::vector<double> baseline;
  std::vector<double> mef;
  std::vector<SyncRound> syncs;
};

void print_row(const char* what, double per_second, double ratio, const char* note = nullptr) {
  std::printf("%-60s %12.1f %8.2f", what, per_second, ratio);
  if (note != nullptr) std::printf("   %s", note);
  std::printf("\n");
}

void print_syncs(const char* what, const std::vector<SyncRound>& rounds) {
  std::vector<double> seconds;
  std::vector<double> entries;
  for (const auto& round : rounds) {
    seconds.push_back(round.seconds_each);
    entries.push_back(round.entries_each);
  }
  const double each = median(seconds);
  std::printf("%-60s %12.1f            (%.0f us each, %.2f entries per fdatasync)\n", what, 1.0 / each, each * 1e6,
              median(entries));
}

void print_rounds(const char* what, const Series& series) {
  std::printf("%s (baseline / MEF per second):", what);
  for (std::size_t round = 0; round < series.baseline.size(); ++round) {
    std::printf(" [%.0f / %.0f]", series.baseline[round], series.mef[round]);
  }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  const int per_round = argc > 1 ? std::atoi(argv[1]) : 300;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 5;
  const int in_flight = argc > 3 ? std::atoi(argv[3]) : 8;
  if (argc > 4 || per_round <= 0 || rounds <= 0 || in_flight <= 0 || in_flight > kMaxInFlight) {
    die("usage: bench_mef [exchanges per round > 0] [rounds > 0] [in flight 1-" + std::to_string(kMaxInFlight) + "]");
  }

  const auto dir = std::filesystem::temp_directory_path() / ("bench_mef." + std::to_string(::getpid()));
  std::filesystem::create_directories(dir / "mef");
  std::filesystem::create_directories(dir / "enrolee");
  ::chmod((dir / "mef").c_str(), 0700);
  ::chmod((dir / "enrolee").c_str(), 0700);
  const SecretBuffer master_key = SecretBuffer::random(crypto::kMasterKeySize);
  const SecretBuffer kpm = SecretBuffer::random(32);

  // MEF: Node + KeyStore on disk + Mef, one enrolee row.
  auto mef_store = must(crypto::KeyStore::open(dir / "mef", master_key.clone()), "MEF store");
  crypto::EnroleeRecord row;
  row.credential_id = kKpmId;
  row.kpm = kpm.clone();
  row.enrolee_id = "CAE-meter";
  row.targets = {"CAE-valve"};
  row.enrolment_lifetime_s = 3600;
  if (auto stored = mef_store.put(std::move(row)); !stored.ok()) die(stored.error().to_string());
  rspf::PskLookupSlot slot;
  auto mef_node = make_node(slot.lookup());
  rspf::MefConfig mef_config;
  mef_config.fqdn = kFqdn;
  mef_config.log = [](rspf::LogKind, const std::string&, const std::string&) {};
  auto mef = must(rspf::Mef::create(*mef_node, mef_store, std::move(mef_config)), "MEF");
  slot.bind(mef->psk_lookup());  // the Mef also joins its store's flush notifications to mef_node (add_watch)

  // Baseline: the same Node type with a fixed PSK and a trivial route.
  auto baseline_node = make_node([&kpm](const transport::PskRequest& request) -> Result<transport::PskGrant> {
    if (request.identity != kKpmId) return make_error(Errc::not_found, "unknown identity");
    return transport::PskGrant{kpm.clone(), {}, {}};
  });
  baseline_node->add_route(transport::Method::get, {"ping"}, transport::Access::secure,
                           [](const transport::Session&, const transport::Request&, transport::Responder out) {
                             out.respond(transport::Response::with_text(205, "pong"));
                           });

  // Client nodes: each its own session cache. Both phases run through the same pump (all clients and both
  // servers), so their loop costs are the same.
  std::vector<std::unique_ptr<transport::Node>> client_nodes;
  std::vector<transport::Node*> clients;
  for (int i = 0; i < in_flight; ++i) {
    client_nodes.push_back(make_node(std::nullopt));
    clients.push_back(client_nodes.back().get());
  }
  const std::vector<transport::Node*> one_client{clients.front()};
  auto with_servers = [&](std::vector<transport::Node*> nodes) {
    nodes.push_back(baseline_node.get());
    nodes.push_back(mef_node.get());
    return nodes;
  };
  Pump concurrent_pump(with_servers(clients));
  Pump sequential_pump(with_servers(one_client));

  const auto credentials = transport::ClientCredentials::psk(kKpmId, kpm.clone(), kFqdn);
  transport::Request ping;
  ping.method = transport::Method::get;
  ping.path = {"ping"};
  transport::Request enrolment = rspf::enrolment_request("CAE-meter", rspf::EnrolmentRequest{});
  const Exchange baseline_exchange{baseline_node.get(), &ping, 205};
  const Exchange mef_exchange{mef_node.get(), &enrolment, 204};

  // Whole Enrolee (information): its own client node and store.
  auto enrolee_store = must(crypto::KeyStore::open(dir / "enrolee", master_key.clone()), "Enrolee store");
  if (auto stored = enrolee_store.put(crypto::BootstrapKeyRecord{kKpmId, kpm.clone(), "CAE-meter"}); !stored.ok()) {
    die(stored.error().to_string());
  }
  auto enrolee_node = make_node(std::nullopt);
  rspf::EnroleeConfig enrolee_config;
  enrolee_config.kpm_id = kKpmId;
  enrolee_config.mef_address = transport::Peer{"127.0.0.1", mef_node->secure_port()};
  enrolee_config.log = [](rspf::LogKind, const std::string&, const std::string&) {};
  auto enrolee = must(rspf::Enrolee::create(*enrolee_node, enrolee_store, std::move(enrolee_config)), "Enrolee");
  Pump enrolee_pump({enrolee_node.get(), mef_node.get()});

  auto clean_up = [&] {
    slot.unbind();
    enrolee.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  };

  // Warm-up: the first handshakes pay one-time backend initialisation, each client node its own.
  const int warm_up = std::max(10, 2 * in_flight);
  (void)run_exchanges(concurrent_pump, clients, credentials, baseline_exchange, warm_up);
  (void)run_exchanges(concurrent_pump, clients, credentials, mef_exchange, warm_up);

  if (const char* only = std::getenv("BENCH_MEF_ONLY")) {
    const std::string phase = only;
    const int count = per_round * rounds;
    Clock::duration elapsed{};
    if (phase == "baseline") {
      elapsed = run_exchanges(concurrent_pump, clients, credentials, baseline_exchange, count);
    } else if (phase == "mef") {
      elapsed = run_exchanges(concurrent_pump, clients, credentials, mef_exchange, count);
    } else if (phase == "enrolee") {
      elapsed = run_enrolments(enrolee_pump, *enrolee, count);
    } else {
      die("BENCH_MEF_ONLY must be baseline, mef or enrolee");
    }
    std::printf("bench_mef: %s only: %.1f per second over %d exchanges, %d in flight\n", phase.c_str(),
                rate(count, elapsed), count, phase == "enrolee" ? 1 : in_flight);
    clean_up();
    return 0;
  }

  // Each round: concurrent baseline, concurrent MEF, then (unless N is 1 already) sequential baseline and MEF,
  // then the whole Enrolee. Every phase of a round sees about the same machine load.
  auto run_round = [&](Pump& pump, const std::vector<transport::Node*>& these, Series& series) {
    series.baseline.push_back(rate(per_round, run_exchanges(pump, these, credentials, baseline_exchange, per_round)));
    const auto before = mef_store.sync_stats();
    series.mef.push_back(rate(per_round, run_exchanges(pump, these, credentials, mef_exchange, per_round)));
    series.syncs.push_back(sync_round(before, mef_store.sync_stats()));
  };
  Series concurrent;
  Series sequential;
  std::vector<double> enrolee_rates;
  for (int round = 0; round < rounds; ++round) {
    run_round(concurrent_pump, clients, concurrent);
    if (in_flight > 1) run_round(sequential_pump, one_client, sequential);
    enrolee_rates.push_back(rate(per_round, run_enrolments(enrolee_pump, *enrolee, per_round)));
  }
  const Series& one_at_a_time = in_flight > 1 ? sequential : concurrent;

  const double append_sync_seconds = fdatasync_cost(dir, per_round, false);
  const double sync_seconds = fdatasync_cost(dir, per_round, true);
  std::printf("bench_mef: %d rounds x %d exchanges, %d in flight, TLS backend %s, key stores in %s\n", rounds,
              per_round, in_flight, std::string(transport::to_string(transport::compiled_backend())).c_str(),
              dir.c_str());
  std::printf("%-60s %12s %8s\n", "measurement (median round)", "per second", "ratio");

  const double baseline = median(concurrent.baseline);
  const double mef_rate = median(concurrent.mef);
  if (in_flight > 1) {
    std::printf("%d enrolees in flight (%d client nodes, one exchange each):\n", in_flight, in_flight);
  } else {
    std::printf("1 in flight (sequential: one enrolee at a time waits for each fdatasync):\n");
  }
  print_row("  baseline: PSK handshake + GET /ping (trivial route)", baseline, 1.0);
  print_row("  MEF: PSK handshake + POST /mef/enrolment + durable put", mef_rate, mef_rate / baseline,
            "(target >= 0.70)");
  print_syncs("  fdatasync inside the MEF's puts", concurrent.syncs);

  const double sequential_baseline = median(one_at_a_time.baseline);
  if (in_flight > 1) {
    const double sequential_mef = median(sequential.mef);
    std::printf("1 in flight (sequential):\n");
    print_row("  baseline: PSK handshake + GET /ping (trivial route)", sequential_baseline, 1.0);
    print_row("  MEF: PSK handshake + POST /mef/enrolment + durable put", sequential_mef,
              sequential_mef / sequential_baseline, "(information: one enrolee at a time waits for each fdatasync)");
    print_syncs("  fdatasync inside the MEF's puts", sequential.syncs);
  }
  // One at a time, the loop idles while the enrolment's fdatasync runs: take that time out per round.
  std::vector<double> without_sync_ratios;
  for (std::size_t round = 0; round < one_at_a_time.mef.size(); ++round) {
    const double seconds = 1.0 / one_at_a_time.mef[round] - one_at_a_time.syncs[round].seconds_per_entry;
    if (seconds > 0) without_sync_ratios.push_back((1.0 / seconds) / one_at_a_time.baseline[round]);
  }
  if (!without_sync_ratios.empty()) {
    std::printf("%-60s %12s %8.2f   (information: median of per-round ratios)\n",
                "  MEF with its own fdatasync time taken out", "", median(without_sync_ratios));
  }
  const double enrolee_rate = median(enrolee_rates);
  print_row("  whole Enrolee exchange (+ Enrolee's durable put)", enrolee_rate, enrolee_rate / sequential_baseline,
            "(information)");
  std::printf("the key stores' file system (probes, after the rounds):\n");
  std::printf("%-60s %12.1f\n", "  append 200 bytes + fdatasync (grows the file)", 1.0 / append_sync_seconds);
  std::printf("%-60s %12.1f\n", "  write over zero fill + fdatasync (one put's floor)", 1.0 / sync_seconds);

  print_rounds(("rounds, " + std::to_string(in_flight) + " in flight").c_str(), concurrent);
  if (in_flight > 1) print_rounds("rounds, sequential", sequential);
  std::printf("rounds, whole Enrolee (sequential) per second:");
  for (const double enrolee_round : enrolee_rates) std::printf(" [%.0f]", enrolee_round);
  std::printf("\nMEF enrolment records stored: %zu\n", mef_store.size(crypto::RecordKind::enrolment_key));

  clean_up();
  return 0;
}

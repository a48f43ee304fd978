// bench_mef: MEF enrolments per second (PSK RSPF, full exchange: new DTLS-PSK session, POST /mef/enrolment,
// exporter, Ke/KeID derivation and the durable KeyStore put before the 2.04) as a ratio of the bare PSK handshake
// rate of the same Node type (new session + one GET to a trivial route), both measured in this run.
//
// Target (issue 4): >= 0.7x. No pass/fail: the table is for the reader. Rounds alternate baseline and MEF so that
// machine noise hits both; the median round rate of each is compared.
// Usage: bench_mef [exchanges per round=200] [rounds=3]
// Also reported (information): the whole Enrolee exchange, which adds the Enrolee's own durable put and checks.
// For profiling one side alone (strace -c, callgrind): BENCH_MEF_ONLY=baseline|mef|enrolee runs that phase only
// and prints its rate, no ratio.
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
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

// Drives every node until done (single thread, like the daemon).
void pump(const std::vector<transport::Node*>& nodes, const std::function<bool()>& done) {
  const int epoll = ::epoll_create1(EPOLL_CLOEXEC);
  for (auto* node : nodes) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = node->fd();
    ::epoll_ctl(epoll, EPOLL_CTL_ADD, node->fd(), &event);
  }
  const auto end = Clock::now() + std::chrono::seconds(30);
  while (!done()) {
    if (Clock::now() > end) die("an exchange hung for 30 s");
    epoll_event event{};
    (void)::epoll_wait(epoll, &event, 1, 5);
    for (auto* node : nodes) node->process_ready();
  }
  ::close(epoll);
}

// One request on a new session (the client node's sessions are closed first); exits on any failure.
void exchange(transport::Node& client, transport::Node& server, const transport::ClientCredentials& credentials,
              const transport::Request& request, int expected_code) {
  client.close_client_sessions();
  std::optional<Result<transport::Response>> answer;
  client.request(transport::Peer{"127.0.0.1", server.secure_port()}, credentials, request,
                 [&](Result<transport::Response> r, const transport::Session*) { answer.emplace(std::move(r)); });
  pump({&client, &server}, [&] { return answer.has_value(); });
  if (!answer->ok()) die("exchange failed: " + answer->error().to_string());
  if ((*answer)->code != expected_code) die("exchange answered " + rspf::coap_code_text((*answer)->code));
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

}  // namespace

int main(int argc, char** argv) {
  const int per_round = argc > 1 ? std::atoi(argv[1]) : 200;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 3;
  if (per_round <= 0 || rounds <= 0) die("usage: bench_mef [exchanges per round > 0] [rounds > 0]");

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
  mef_config.log = [](const std::string&) {};
  auto mef = must(rspf::Mef::create(*mef_node, mef_store, std::move(mef_config)), "MEF");
  slot.bind(mef->psk_lookup());

  // Baseline: the same Node type with a fixed PSK and a trivial route.
  auto baseline_node = make_node([&kpm](const transport::PskRequest& request) -> Result<SecretBuffer> {
    if (request.identity != kKpmId) return make_error(Errc::not_found, "unknown identity");
    return kpm.clone();
  });
  baseline_node->add_route(transport::Method::get, {"ping"}, transport::Access::secure,
                           [](const transport::Session&, const transport::Request&, transport::Responder out) {
                             out.respond(transport::Response::with_text(205, "pong"));
                           });

  auto client = make_node(std::nullopt);
  const auto credentials = transport::ClientCredentials::psk(kKpmId, kpm.clone(), kFqdn);
  transport::Request ping;
  ping.method = transport::Method::get;
  ping.path = {"ping"};
  transport::Request enrolment;
  enrolment.method = transport::Method::post;
  enrolment.path = {"mef", "enrolment"};
  enrolment.content_format = static_cast<std::uint16_t>(rspf::ContentFormat::cbor);
  enrolment.originator = "CAE-meter";
  enrolment.payload = rspf::encode(rspf::EnrolmentRequest{}, rspf::ContentFormat::cbor);

  // Whole Enrolee (information): its own client node and store.
  auto enrolee_store = must(crypto::KeyStore::open(dir / "enrolee", master_key.clone()), "Enrolee store");
  if (auto stored = enrolee_store.put(crypto::BootstrapKeyRecord{kKpmId, kpm.clone(), "CAE-meter"}); !stored.ok()) {
    die(stored.error().to_string());
  }
  auto enrolee_node = make_node(std::nullopt);
  rspf::EnroleeConfig enrolee_config;
  enrolee_config.kpm_id = kKpmId;
  enrolee_config.mef_address = transport::Peer{"127.0.0.1", mef_node->secure_port()};
  enrolee_config.log = [](const std::string&) {};
  auto enrolee = must(rspf::Enrolee::create(*enrolee_node, enrolee_store, std::move(enrolee_config)), "Enrolee");

  // Warm-up (first handshakes pay one-time backend initialisation).
  for (int i = 0; i < 10; ++i) {
    exchange(*client, *baseline_node, credentials, ping, 205);
    exchange(*client, *mef_node, credentials, enrolment, 204);
  }

  std::vector<double> baseline_rates;
  std::vector<double> mef_rates;
  std::vector<double> enrolee_rates;
  std::vector<double> mef_sync_seconds;  // the MEF store's own fdatasync wait per enrolment, per round
  if (const char* only = std::getenv("BENCH_MEF_ONLY")) {
    const std::string phase = only;
    const auto start = Clock::now();
    for (int i = 0; i < per_round * rounds; ++i) {
      if (phase == "baseline") {
        exchange(*client, *baseline_node, credentials, ping, 205);
      } else if (phase == "mef") {
        exchange(*client, *mef_node, credentials, enrolment, 204);
      } else if (phase == "enrolee") {
        std::optional<Result<void>> outcome;
        enrolee->enrol([&](Result<void> r) { outcome.emplace(std::move(r)); });
        pump({enrolee_node.get(), mef_node.get()}, [&] { return outcome.has_value(); });
        if (!outcome->ok()) die("Enrolee: " + outcome->error().to_string());
      } else {
        die("BENCH_MEF_ONLY must be baseline, mef or enrolee");
      }
    }
    std::printf("bench_mef: %s only: %.1f per second over %d exchanges\n", phase.c_str(),
                rate(per_round * rounds, Clock::now() - start), per_round * rounds);
    slot.unbind();
    enrolee.reset();
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
    return 0;
  }
  for (int round = 0; round < rounds; ++round) {
    auto start = Clock::now();
    for (int i = 0; i < per_round; ++i) exchange(*client, *baseline_node, credentials, ping, 205);
    baseline_rates.push_back(rate(per_round, Clock::now() - start));

    const auto syncs_before = mef_store.sync_stats();
    start = Clock::now();
    for (int i = 0; i < per_round; ++i) exchange(*client, *mef_node, credentials, enrolment, 204);
    mef_rates.push_back(rate(per_round, Clock::now() - start));
    const auto syncs_after = mef_store.sync_stats();
    mef_sync_seconds.push_back(std::chrono::duration<double>(syncs_after.time - syncs_before.time).count() /
                               static_cast<double>(syncs_after.syncs - syncs_before.syncs));

    start = Clock::now();
    for (int i = 0; i < per_round; ++i) {
      std::optional<Result<void>> outcome;
      enrolee->enrol([&](Result<void> r) { outcome.emplace(std::move(r)); });
      pump({enrolee_node.get(), mef_node.get()}, [&] { return outcome.has_value(); });
      if (!outcome->ok()) die("Enrolee: " + outcome->error().to_string());
    }
    enrolee_rates.push_back(rate(per_round, Clock::now() - start));
  }

  const double append_sync_seconds = fdatasync_cost(dir, per_round, false);
  const double sync_seconds = fdatasync_cost(dir, per_round, true);
  const double baseline = median(baseline_rates);
  const double mef_rate = median(mef_rates);
  const double enrolee_rate = median(enrolee_rates);
  std::printf("bench_mef: %d rounds x %d exchanges, TLS backend %s, key stores in %s\n", rounds, per_round,
              std::string(transport::to_string(transport::compiled_backend())).c_str(), dir.c_str());
  std::printf("%-58s %12s %8s\n", "measurement (median round)", "per second", "ratio");
  std::printf("%-58s %12.1f %8.2f\n", "baseline: PSK handshake + GET /ping (trivial route)", baseline, 1.0);
  std::printf("%-58s %12.1f %8.2f   (target >= 0.70)\n", "MEF: PSK handshake + POST /mef/enrolment + durable put",
              mef_rate, mef_rate / baseline);
  std::printf("%-58s %12.1f %8.2f   (information)\n", "whole Enrolee exchange (+ Enrolee's durable put)",
              enrolee_rate, enrolee_rate / baseline);
  std::printf("%-58s %12.1f\n", "append + fdatasync on the store's file system (grows the file)",
              1.0 / append_sync_seconds);
  std::printf("%-58s %12.1f\n", "write over zero fill + fdatasync (the put's floor)", 1.0 / sync_seconds);
  // The MEF's own fdatasync wait, timed inside the key store during the rounds (the probe above runs later, on a
  // disk that may be busier or quieter by then).
  const double in_put_sync = median(mef_sync_seconds);
  std::printf("%-58s %12.1f   (%.0f us each)\n", "fdatasync inside the MEF's puts (median round)", 1.0 / in_put_sync,
              in_put_sync * 1e6);
  std::vector<double> without_sync_ratios;  // per round, against that round's baseline
  for (std::size_t round = 0; round < mef_rates.size(); ++round) {
    const double seconds = 1.0 / mef_rates[round] - mef_sync_seconds[round];
    if (seconds > 0) without_sync_ratios.push_back((1.0 / seconds) / baseline_rates[round]);
  }
  if (!without_sync_ratios.empty()) {
    std::printf("%-58s %12s %8.2f   (information: median of per-round ratios)\n",
                "MEF with its own fdatasync time taken out", "", median(without_sync_ratios));
  }
  std::printf("rounds (baseline / MEF / Enrolee per second):");
  for (int round = 0; round < rounds; ++round) {
    std::printf(" [%.0f / %.0f / %.0f]", baseline_rates[static_cast<std::size_t>(round)],
                mef_rates[static_cast<std::size_t>(round)], enrolee_rates[static_cast<std::size_t>(round)]);
  }
  std::printf("\nMEF enrolment records stored: %zu\n", mef_store.size(crypto::RecordKind::enrolment_key));

  slot.unbind();
  enrolee.reset();
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  return 0;
}

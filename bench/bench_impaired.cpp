// bench_impaired: dauthd itself over an impaired path, against the stock libcoap tools over the same impairment in
// the same run. Every impaired hop goes through its own dauth_impair_relay (docs/impairment-relay.md), seeds fixed.
//
//   part 1, PSK enrolment (the goal: 100 % within 60 s, p95 <= 1.5 x the anchor's p95):
//     enrolment: dauthctl enrol CAE-meter --wait 60 -> dauthd A --DTLS-PSK--> [relay] --> dauthd MEF
//     anchor:    coap-client-gnutls --DTLS-PSK--> [relay] --> coap-server-gnutls   (one handshake + one GET, as an
//                enrolment is one handshake + one POST)
//     relays:    10 % loss each way, 100 +- 30 ms each way.
//     With BENCH_IMPAIRED_ANCHOR_RETRY=1 also (not a goal; about a minute more): the anchor started again after
//     each failure until it succeeds within 60 s. The stock client gives up a stalled handshake after about 5 s,
//     so the anchor's successes alone are its lucky exchanges, while one dauthd enrolment retries inside.
//   part 2, proxied AE requests:
//     proxied:   coap-client-notls --> dauthd A --DTLS--> [relay] --> dauthd B --> coap-server-notls (the valve)
//     direct:    coap-client-notls --> [relay] --> coap-server-notls (the same valve)
//     relays:    10 % loss each way, no delay. One impaired hop on each path; every CoAP sender on them (the stock
//                client, dauthd A) keeps libcoap 4.3.1's retransmission defaults (ACK_TIMEOUT 2 s, ACK_RANDOM_FACTOR
//                1.5, MAX_RETRANSMIT 4; docs/timeouts.md B1).
//
// Each attempt is one process (dauthctl, coap-client) timed by wall clock from fork to exit, so process start-up
// counts on both sides; dauthctl polls the outcome every 100 ms (docs/timeouts.md D6). Success: dauthctl's exit
// code 0; for the stock tools the answer's payload in their output (they exit 0 even when the handshake failed).
// Attempts of the two kinds alternate, so a busy machine slows both alike. The deployment is bench_deployment.hpp
// (pre-provisioned PSKs only).
//
// Usage: bench_impaired [enrolments=20] [requests=30]   (0 skips that part)
//   BENCH_IMPAIRED_N=<enrolments> when argv gives none; BENCH_IMPAIRED_SEED=<base> moves the four fixed seeds;
//   BENCH_IMPAIRED_ANCHOR_RETRY=1 adds the retried anchor; BENCH_KEEP_DIR=1 keeps the temporary directories with
//   the dauthd logs.
// Progress on stderr, results on stdout. Reports, never asserts: exit 0 unless the set-up fails.
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bench_deployment.hpp"
#include "impair_relay_process.hpp"

using namespace dauth::bench;
using dauth::test::ImpairProfile;
using dauth::test::ImpairRelay;

namespace {

// The budget: dauthctl --wait and coap-client -B; a failure counts as this in "p95 with failures".
constexpr int kBudgetSeconds = 60;
constexpr std::uint64_t kDefaultSeedBase = 20261206;
// The anchor's payload: coap-server's default resource "/" ("This is a test server made with libcoap ...").
const std::string kAnchorPayload = "This is a test server";

std::string join(const std::vector<std::string>& words) {
  std::string out;
  for (const auto& w : words) out += (out.empty() ? "" : " ") + w;
  return out;
}

std::string load_average() {
  std::string text;
  std::getline(std::ifstream("/proc/loadavg"), text);
  return text;
}

// The timed attempts of one kind.
struct Series {
  std::string name;
  std::vector<double> successes;         // seconds
  std::vector<double> with_failures;     // seconds, a failure counted as kBudgetSeconds
  std::map<std::string, int> reasons;    // why attempts failed (for enrolments: also attempts retried by dauthd)
  int attempts = 0;

  void add(bool ok, double seconds) {
    ++attempts;
    if (ok) successes.push_back(seconds);
    with_failures.push_back(ok ? seconds : kBudgetSeconds);
  }
  std::optional<double> p(double q) const {
    return successes.empty() ? std::nullopt : std::optional<double>(percentile(successes, q));
  }
  double p95_with_failures() const { return percentile(with_failures, 0.95); }
};

std::string seconds_text(std::optional<double> value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.3f", value.value_or(0));
  return value ? buffer : "-";
}

std::string ratio_text(std::optional<double> a, std::optional<double> b) {
  if (!a || !b || *b <= 0) return "-";
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.2fx", *a / *b);
  return buffer;
}

struct Ratio {
  const char* label;
  const Series* subject;
  const Series* baseline;
};

void print_table(const std::vector<const Series*>& rows, const std::vector<Ratio>& ratios) {
  std::printf("%-36s %7s %8s %8s %8s %16s\n", "", "ok", "p50 s", "p95 s", "max s", "p95 s, fail=60");
  for (const Series* s : rows) {
    const std::string ok = std::to_string(s->successes.size()) + "/" + std::to_string(s->attempts);
    std::printf("%-36s %7s %8s %8s %8s %16.3f\n", s->name.c_str(), ok.c_str(), seconds_text(s->p(0.5)).c_str(),
                seconds_text(s->p(0.95)).c_str(), seconds_text(s->p(1.0)).c_str(), s->p95_with_failures());
  }
  for (const auto& r : ratios) {
    std::printf("%-36s %7s %8s %8s %8s %16s\n", r.label, "", ratio_text(r.subject->p(0.5), r.baseline->p(0.5)).c_str(),
                ratio_text(r.subject->p(0.95), r.baseline->p(0.95)).c_str(),
                ratio_text(r.subject->p(1.0), r.baseline->p(1.0)).c_str(),
                ratio_text(r.subject->p95_with_failures(), r.baseline->p95_with_failures()).c_str());
  }
  for (const Series* s : rows) {
    for (const auto& [reason, count] : s->reasons) {
      std::printf("  %s: %d x %s\n", s->name.c_str(), count, reason.c_str());
    }
  }
}

// The lines of `output` that say why something failed: dauthctl's "dauthctl: ..." lines without the changing
// numbers' context, libcoap's ERR lines without their timestamp.
std::vector<std::string> failure_lines(const std::string& output) {
  std::vector<std::string> lines;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("dauthctl: ", 0) == 0) {
      const auto failed = line.find(" failed: ");
      line = failed == std::string::npos ? line.substr(10) : line.substr(failed + 9);
      line = line.substr(0, line.find("; dauthd tries again"));
      lines.push_back(line);
    } else if (const auto err = line.find(" ERR "); err != std::string::npos) {
      lines.push_back(line.substr(line.find_first_not_of(' ', err + 5)));
    }
  }
  return lines;
}

void print_relay(const std::string& name, std::uint64_t seed, ImpairRelay& relay) {
  auto s = relay.stats();
  std::printf("  relay %-22s seed %llu: up lost %llu of %llu, down lost %llu of %llu\n", name.c_str(),
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(s["up_dropped_loss"]),
              static_cast<unsigned long long>(s["up_received"]),
              static_cast<unsigned long long>(s["down_dropped_loss"]),
              static_cast<unsigned long long>(s["down_received"]));
}

// The named counters of `dauthctl --json stats` on a node, those present.
void print_counters(const Deployment& d, const std::string& node, const std::vector<std::string>& names) {
  const auto result = run_command({DAUTHCTL_PATH, "--json", "-s", d.control_socket(node).string(), "stats"});
  const auto stats = nlohmann::json::parse(result.output, nullptr, false);
  std::printf("  dauthd %s stats:", node.c_str());
  if (stats.is_discarded() || !stats.is_object()) {
    std::printf(" (dauthctl stats failed: %s)\n", result.output.c_str());
    return;
  }
  for (const auto& name : names) {
    if (stats.contains(name)) std::printf(" %s=%s", name.c_str(), stats[name].dump().c_str());
  }
  std::printf("\n");
}

// ---- part 1: enrolment vs anchor -----------------------------------------------------------------------------------

void enrolment_vs_anchor(int rounds, std::uint64_t seed_base, bool retry_anchor) {
  const ImpairProfile profile = ImpairProfile::lossy(0.10, 100, 30);
  const std::uint64_t mef_seed = seed_base + 1;
  const std::uint64_t anchor_seed = seed_base + 2;

  Deployment d({DAUTHD_PATH, "bench-impaired-enrol", ""});
  ImpairRelay mef_relay(d.ports.at("mef"), mef_seed, profile);
  d.replace_in_config("a", "mef_address = \"" + d.address("mef") + "\"",
                      "mef_address = \"127.0.0.1:" + std::to_string(mef_relay.port()) + "\"");

  // The anchor: the stock DTLS-PSK server and client. Their key is on argv because the stock tools take it only
  // there; it is a throw-away key of this run, never printed.
  // coap-server -p P listens for CoAP on P and for DTLS on P + 1, each over UDP and TCP.
  const std::uint16_t anchor_port = dauth::test::free_loopback_ports(2, dauth::test::PortUse::udp_and_tcp);
  const std::string identity = "bench-anchor";
  std::string key = random_hex(16);
  key.pop_back();
  d.children["anchor"] = spawn({"coap-server-gnutls", "-A", "127.0.0.1", "-p", std::to_string(anchor_port), "-k", key},
                               d.dir / "anchor.log");
  const auto anchor_get = [&](std::uint16_t port, int budget_seconds) {
    return run_command({"coap-client-gnutls", "-B", std::to_string(budget_seconds), "-u", identity, "-k", key,
                        "coaps://127.0.0.1:" + std::to_string(port) + "/"});
  };
  for (int i = 0;; ++i) {
    if (anchor_get(static_cast<std::uint16_t>(anchor_port + 1), 5).output.find(kAnchorPayload) != std::string::npos) {
      break;
    }
    if (i == 50) throw std::runtime_error("coap-server-gnutls does not answer; see " + (d.dir / "anchor.log").string());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ImpairRelay anchor_relay(static_cast<std::uint16_t>(anchor_port + 1), anchor_seed, profile);

  std::cerr << "part 1: starting the MEF and gateway A (enrolling through the relay)\n";
  d.start_dauthd("mef");
  d.start_dauthd("a");
  const auto first_start = std::chrono::steady_clock::now();
  d.wait_enrolled("a", "CAE-meter", 2 * kBudgetSeconds);
  const double first = std::chrono::duration<double>(std::chrono::steady_clock::now() - first_start).count();

  Series enrol{"dauthd enrolment (dauthctl enrol)", {}, {}, {}, 0};
  Series anchor{"anchor (coap-client-gnutls GET)", {}, {}, {}, 0};
  // Not in the issue (see the top of the file): what an application retrying the stock client would see.
  Series anchor_retried{"anchor retried until ok, <= 60 s", {}, {}, {}, 0};
  for (int round = 1; round <= rounds; ++round) {
    const auto e = run_command({DAUTHCTL_PATH, "-s", d.control_socket("a").string(), "enrol", "CAE-meter", "--wait",
                                std::to_string(kBudgetSeconds)});
    enrol.add(e.exit_code == 0, e.seconds);
    for (const auto& line : failure_lines(e.output)) ++enrol.reasons[(e.exit_code == 0 ? "retried: " : "") + line];

    const auto a = anchor_get(anchor_relay.port(), kBudgetSeconds);
    const bool anchor_ok = a.output.find(kAnchorPayload) != std::string::npos;
    anchor.add(anchor_ok, a.seconds);
    if (!anchor_ok) {
      const auto lines = failure_lines(a.output);
      ++anchor.reasons[lines.empty() ? "no answer, no error printed" : lines.back()];
    }
    double until_ok = a.seconds;
    bool retried_ok = anchor_ok;
    int tries = 1;
    for (; retry_anchor && !retried_ok && until_ok < kBudgetSeconds; ++tries) {
      const auto again = anchor_get(anchor_relay.port(), std::max(1, kBudgetSeconds - static_cast<int>(until_ok)));
      until_ok += again.seconds;
      retried_ok = again.output.find(kAnchorPayload) != std::string::npos && until_ok <= kBudgetSeconds;
    }
    anchor_retried.add(retried_ok, until_ok);
    std::fprintf(stderr, "  round %d/%d: enrolment %.2f s %s, anchor %.2f s %s", round, rounds, e.seconds,
                 e.exit_code == 0 ? "ok" : "FAILED", a.seconds, anchor_ok ? "ok" : "FAILED");
    if (retry_anchor) std::fprintf(stderr, " (until ok: %.2f s, %d tries)", until_ok, tries);
    std::fprintf(stderr, "\n");
  }

  std::printf("\n== part 1: PSK enrolment vs stock DTLS-PSK GET, %d each, interleaved ==\n", rounds);
  std::printf("relay profile, both relays: %s (each way)\n", join(profile.arguments()).c_str());
  std::printf("first enrolment after start (not in the statistics): %.2f s\n", first);
  if (retry_anchor) {
    print_table({&enrol, &anchor, &anchor_retried},
                {{"ratio enrolment / anchor", &enrol, &anchor},
                 {"ratio enrolment / anchor retried", &enrol, &anchor_retried}});
  } else {
    print_table({&enrol, &anchor}, {{"ratio enrolment / anchor", &enrol, &anchor}});
  }
  print_relay("in front of the MEF", mef_seed, mef_relay);
  print_relay("in front of the anchor", anchor_seed, anchor_relay);
  print_counters(d, "a",
                 {"enrolments_started_total", "enrolments_succeeded_total", "enrolments_failed_total",
                  "enrolee_handshakes_completed_total", "enrolee_handshakes_failed_total",
                  "enrolee_handshakes_restarted_total", "enrolee_client_requests_failed_total"});
  print_counters(d, "mef",
                 {"mef_handshakes_completed_total", "mef_handshakes_failed_total", "mef_requests_served_total"});

  const int ok = static_cast<int>(enrol.successes.size());
  std::printf("goal: enrol success 100 %% within %d s: %s (%d/%d)\n", kBudgetSeconds,
              ok == rounds ? "met" : "missed", ok, rounds);
  // dauthd counted strictly (a failure is 60 s), the anchor by its successes (a failed anchor counted as 60 s would
  // inflate its p95 and make the goal easy).
  const auto anchor_p95 = anchor.p(0.95);
  if (anchor_p95) {
    const double ratio = enrol.p95_with_failures() / *anchor_p95;
    std::printf("goal: enrol p95 <= 1.5x anchor p95: %s (%.2fx: enrolment p95 %.2f s with failures as %d s, "
                "anchor p95 %.2f s of its successes)\n",
                ratio <= 1.5 ? "met" : "missed", ratio, enrol.p95_with_failures(), kBudgetSeconds, *anchor_p95);
  } else {
    std::printf("goal: enrol p95 <= 1.5x anchor p95: not measurable (no anchor exchange succeeded)\n");
  }
  if (retry_anchor) {
    std::printf("(against the anchor retried until ok: %s, its p95 %.2f s with failures as %d s)\n",
                ratio_text(enrol.p95_with_failures(), anchor_retried.p95_with_failures()).c_str(),
                anchor_retried.p95_with_failures(), kBudgetSeconds);
  } else if (anchor.successes.size() < static_cast<std::size_t>(rounds)) {
    std::printf("(the anchor failed %d of %d times: its p95 is that of its lucky exchanges; "
                "BENCH_IMPAIRED_ANCHOR_RETRY=1 also measures it retried until ok)\n",
                rounds - static_cast<int>(anchor.successes.size()), rounds);
  }
}

// ---- part 2: proxied requests vs direct ----------------------------------------------------------------------------

void proxied_vs_direct(int rounds, std::uint64_t seed_base) {
  const ImpairProfile profile = ImpairProfile::lossy(0.10, 0, 0);
  const std::uint64_t peer_seed = seed_base + 3;
  const std::uint64_t direct_seed = seed_base + 4;

  Deployment d({DAUTHD_PATH, "bench-impaired-proxy", ""});
  ImpairRelay peer_relay(d.ports.at("b_peer"), peer_seed, profile);
  d.replace_in_config("a", "address = \"" + d.address("b_peer") + "\"",
                      "address = \"127.0.0.1:" + std::to_string(peer_relay.port()) + "\"");
  std::cerr << "part 2: starting the MEF, the valve and gateways A and B (A reaches B through the relay)\n";
  d.start();
  ImpairRelay direct_relay(d.ports.at("valve"), direct_seed, profile);

  // A fresh marker PUT straight to the valve: an answer can only contain it if the request really reached it.
  std::string marker = random_hex(8);
  marker.pop_back();
  const std::string valve_uri = "coap://" + d.address("valve") + "/example_data";
  for (int i = 0;; ++i) {
    run_command({"coap-client-notls", "-B", "5", "-m", "put", "-e", marker, valve_uri});
    if (run_command({"coap-client-notls", "-B", "5", valve_uri}).output.find(marker) != std::string::npos) break;
    if (i == 20) throw std::runtime_error("the valve (coap-server-notls) does not keep a PUT");
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }

  const std::vector<std::string> proxied_get = {"coap-client-notls", "-B", std::to_string(kBudgetSeconds), "-m",
                                                "get", "-P", "coap://" + d.address("a_local"), "-O", "279,CAE-meter",
                                                "coap://CAE-valve/example_data"};
  const std::vector<std::string> direct_get = {"coap-client-notls", "-B", std::to_string(kBudgetSeconds),
                                               "coap://127.0.0.1:" + std::to_string(direct_relay.port()) +
                                                   "/example_data"};
  const auto reason_of = [](const CommandResult& r) {
    const auto lines = failure_lines(r.output);
    if (!lines.empty()) return lines.back();
    std::string text = r.output.substr(0, r.output.find('\n'));
    return text.empty() ? std::string("no answer") : "answer '" + text + "'";
  };

  // The first proxied request sets up the AE-pair session (B fetches the key from the MEF, A retries;
  // docs/PROTOCOL.md §4).
  // Reported, not part of the statistics.
  std::string first_text = "failed 3 times";
  for (int i = 1; i <= 3; ++i) {
    const auto r = run_command(proxied_get);
    if (r.output.find(marker) != std::string::npos) {
      char buffer[64];
      std::snprintf(buffer, sizeof buffer, "%.2f s (try %d)", r.seconds, i);
      first_text = buffer;
      break;
    }
    std::cerr << "  warm-up try " << i << " failed: " << reason_of(r) << "\n";
  }

  Series proxied{"proxied (client -> A -> B -> valve)", {}, {}, {}, 0};
  Series direct{"direct (client -> valve)", {}, {}, {}, 0};
  for (int round = 1; round <= rounds; ++round) {
    const auto p = run_command(proxied_get);
    const bool p_ok = p.output.find(marker) != std::string::npos;
    proxied.add(p_ok, p.seconds);
    if (!p_ok) ++proxied.reasons[reason_of(p)];
    const auto q = run_command(direct_get);
    const bool q_ok = q.output.find(marker) != std::string::npos;
    direct.add(q_ok, q.seconds);
    if (!q_ok) ++direct.reasons[reason_of(q)];
    std::fprintf(stderr, "  round %d/%d: proxied %.3f s %s, direct %.3f s %s\n", round, rounds, p.seconds,
                 p_ok ? "ok" : "FAILED", q.seconds, q_ok ? "ok" : "FAILED");
  }

  std::printf("\n== part 2: proxied AE request vs direct request, %d each, interleaved ==\n", rounds);
  std::printf("relay profile, both relays: %s (each way); impaired hop: A -> B (proxied), client -> valve (direct)\n",
              join(profile.arguments()).c_str());
  std::printf("CoAP retransmission on the impaired hop: libcoap 4.3.1 defaults on both paths (ACK_TIMEOUT 2 s, "
              "ACK_RANDOM_FACTOR 1.5, MAX_RETRANSMIT 4)\n");
  std::printf("first proxied request (AE-pair handshake, key retrieval by B; not in the statistics): %s\n",
              first_text.c_str());
  print_table({&proxied, &direct}, {{"ratio proxied / direct", &proxied, &direct}});
  std::printf("success rate: proxied %.0f %%, direct %.0f %%\n",
              100.0 * static_cast<double>(proxied.successes.size()) / rounds,
              100.0 * static_cast<double>(direct.successes.size()) / rounds);
  print_relay("A -> B", peer_seed, peer_relay);
  print_relay("in front of the valve", direct_seed, direct_relay);
  print_counters(d, "a",
                 {"proxy_requests_total", "proxy_forwarded_total", "proxy_retries_total", "proxy_failed_total",
                  "peer_handshakes_completed_total", "peer_handshakes_failed_total",
                  "peer_handshakes_restarted_total", "peer_client_requests_failed_total"});
}

int count_argument(int argc, char** argv, int index, const char* environment, int fallback) {
  if (argc > index) return std::max(0, std::atoi(argv[index]));
  if (environment != nullptr) {
    if (const char* value = std::getenv(environment)) return std::max(0, std::atoi(value));
  }
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const int enrolments = count_argument(argc, argv, 1, "BENCH_IMPAIRED_N", 20);
  const int requests = count_argument(argc, argv, 2, nullptr, 30);
  const char* seed_text = std::getenv("BENCH_IMPAIRED_SEED");
  const std::uint64_t seed_base = seed_text != nullptr ? std::strtoull(seed_text, nullptr, 10) : kDefaultSeedBase;
  const bool retry_anchor = std::getenv("BENCH_IMPAIRED_ANCHOR_RETRY") != nullptr;
  ::signal(SIGPIPE, SIG_IGN);
  const auto start = std::chrono::steady_clock::now();

  std::printf("bench_impaired: enrolments=%d requests=%d seed base=%llu (relay seeds base+1 .. base+4)\n", enrolments,
              requests, static_cast<unsigned long long>(seed_base));
  std::printf("dauthd=%s dauthctl=%s\n", DAUTHD_PATH, DAUTHCTL_PATH);
  std::printf("load average at start: %s\n", load_average().c_str());
  std::fflush(stdout);
  try {
    if (enrolments > 0) enrolment_vs_anchor(enrolments, seed_base, retry_anchor);
    std::fflush(stdout);
    if (requests > 0) proxied_vs_direct(requests, seed_base);
  } catch (const std::exception& error) {
    std::cerr << "bench_impaired: " << error.what() << "\n";
    return 1;
  }
  std::printf("\nload average at end: %s; total %.0f s\n", load_average().c_str(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return 0;
}

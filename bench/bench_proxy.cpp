// bench_proxy: proxied request latency and throughput through two dauthds, against a direct request to the same
// CoAP server measured in the same run (issue 5).
//
//   direct:   client --CoAP--> coap-server-notls
//   proxied:  client --CoAP (Proxy-Uri, oneM2M-FR)--> dauthd A --DTLS-PSK (AE-pair key)--> dauthd B --CoAP-->
//             coap-server-notls
//
// Set-up like the e2e tests and the demo, pre-provisioned keys only (bench_deployment.hpp): an MEF dauthd and two
// gateway dauthds on 127.0.0.1 (fresh keys, state directories and ports in a temporary directory), AE "meter" on
// A, AE "valve" on B served by coap-server-notls. The load comes from transport/ Nodes in this process with plain
// credentials, so process start-up does not count. "N outstanding" uses N client Nodes, each with its own session
// and one request in flight (the AE side keeps RFC 7252's NSTART = 1), so the N requests share A's one DTLS session
// to B, B's separate responses on it, and B's one plain session to the valve: peer.nstart / peer.local_nstart
// decide how many of them are in flight at once.
//
// With --esprim (issue 17) a third path: the same proxied request with ESPrim (PROTOCOL.md §7): A protects meter's
// request end to end (peer.address esprim = "required"), B opens it, delivers it to the valve and protects the
// answer, on the same DTLS session between A and B. The two proxied paths are one deployment and one target AE:
// peer.address esprim is a live key, so each round rewrites it in A's config and reloads A (control "reload", like
// SIGHUP) before measuring that path; what differs between them is only the protection. A's esprim_answered_total
// counter must grow by every request of the ESPrim path and by none of the plain one, else the run fails.
//
// Usage: bench_proxy [--esprim] [sequential=2000] [throughput_requests=4000] [rounds=3] [nstart]
//   nstart: written as peer.nstart and peer.local_nstart of both gateways; omitted: dauthd's defaults.
//   BENCH_PROXY_DAUTHD=<path> runs another dauthd build (e.g. a saved "before" binary; then omit nstart if it
//   predates the key).
// Prints the median over interleaved rounds (a busy machine slows both paths alike within a round), the
// proxied/direct ratios and, with --esprim, the ESPrim/plain ratios with their spread over rounds. Reports, does
// not assert.
#include <signal.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bench_deployment.hpp"
#include "dauth/transport/transport.hpp"

using namespace dauth;
using namespace dauth::bench;
using Clock = std::chrono::steady_clock;

namespace {

// ---- the load ----------------------------------------------------------------------------------------------------

struct Target {
  const char* name;
  transport::Peer peer;
  transport::Request request;
  std::optional<bool> esprim;  // proxied paths: gateway A's peer.address esprim = "required" (true) or "off"
};

struct Clients {
  std::vector<std::unique_ptr<transport::Node>> nodes;  // one session each
  int failures = 0;

  explicit Clients(std::size_t count) {
    for (std::size_t i = 0; i < count; ++i) {
      auto node = transport::Node::create(transport::NodeConfig{});
      if (!node) throw std::runtime_error("client node: " + node.error().message);
      (*node)->set_failure_observer([](const transport::Failure&) {});
      nodes.push_back(std::move(node).value());
    }
  }

  // One request on node i; the completion records success and calls done.
  void send(std::size_t i, const Target& target, std::function<void()> done) {
    nodes[i]->request(target.peer, transport::ClientCredentials::plain(), target.request,
                      [this, done = std::move(done)](Result<transport::Response> response, const transport::Session*) {
                        if (!response || response->code != 205) ++failures;
                        done();
                      });
  }

  // Drives every node until finished() (epoll over their fds; each Node reports its own next deadline).
  void run(const std::function<bool()>& finished) {
    const int epoll = ::epoll_create1(EPOLL_CLOEXEC);
    for (std::size_t i = 0; i < nodes.size(); ++i) {
      epoll_event event{};
      event.events = EPOLLIN;
      event.data.u64 = i;
      ::epoll_ctl(epoll, EPOLL_CTL_ADD, nodes[i]->fd(), &event);
    }
    const auto limit = Clock::now() + std::chrono::seconds(120);
    while (!finished() && Clock::now() < limit) {
      auto timeout = std::chrono::milliseconds(1000);
      for (auto& node : nodes) timeout = std::min(timeout, node->next_timeout());
      epoll_event events[64];
      const int ready = ::epoll_wait(epoll, events, 64, static_cast<int>(timeout.count()));
      if (ready == 0) {
        for (auto& node : nodes) node->process_ready();
      }
      for (int e = 0; e < ready; ++e) nodes[events[e].data.u64]->process_ready();
    }
    ::close(epoll);
  }

  // Sequential requests on the first node: per-request latency in microseconds.
  std::vector<double> latencies(const Target& target, int count) {
    std::vector<double> out;
    for (int i = 0; i < count; ++i) {
      bool done = false;
      const auto start = Clock::now();
      send(0, target, [&] { done = true; });
      run([&] { return done; });
      out.push_back(std::chrono::duration<double, std::micro>(Clock::now() - start).count());
    }
    return out;
  }

  // `total` requests with one outstanding per node (nodes.size() outstanding): requests per second.
  double throughput(const Target& target, int total) {
    int sent = 0;
    int completed = 0;
    std::function<void(std::size_t)> next = [&](std::size_t i) {
      if (sent >= total) return;
      ++sent;
      send(i, target, [&, i] {
        ++completed;
        next(i);
      });
    };
    const auto start = Clock::now();
    for (std::size_t i = 0; i < nodes.size(); ++i) next(i);
    run([&] { return completed >= total; });
    return completed / std::chrono::duration<double>(Clock::now() - start).count();
  }
};

double median(std::vector<double> values) { return percentile(std::move(values), 0.5); }

// CPU time a process has run, in microseconds (/proc/<pid>/schedstat, nanoseconds; dauthd and coap-server-notls are
// single-threaded). Unlike wall-clock rates it hardly depends on what else the shared machine runs.
double cpu_microseconds(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/schedstat");
  double nanoseconds = 0;
  in >> nanoseconds;
  return nanoseconds / 1000.0;
}

// A counter from a node's control "stats" reply (docs/control-protocol.md); -1 if it is not there.
long long stats_counter(const Deployment& deployment, const std::string& node, const std::string& name) {
  const std::string reply = control(deployment.control_socket(node), "{\"verb\":\"stats\"}\n");
  const std::string key = "\"" + name + "\":";
  const auto at = reply.find(key);
  return at == std::string::npos ? -1 : std::atoll(reply.c_str() + at + key.size());
}

// Sets gateway A's peer.address esprim for CAE-valve and reloads A (a live key: no restart, sessions kept).
void set_esprim(Deployment& deployment, bool required) {
  const std::string on = "esprim = \"required\"";
  const std::string off = "esprim = \"off\"";
  deployment.replace_in_config("a", required ? off : on, required ? on : off);
  const std::string reply = control(deployment.control_socket("a"), "{\"verb\":\"reload\"}\n");
  if (reply.find("\"ok\":true") == std::string::npos) throw std::runtime_error("reload of gateway A: " + reply);
}

// Per-round ratios b/a: "median (min..max)".
std::string ratio_spread(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> ratios;
  for (std::size_t i = 0; i < a.size() && i < b.size(); ++i) ratios.push_back(b[i] / a[i]);
  char text[64];
  std::snprintf(text, sizeof text, "%.2fx (%.2f..%.2f)", percentile(ratios, 0.5),
                *std::min_element(ratios.begin(), ratios.end()), *std::max_element(ratios.begin(), ratios.end()));
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const bool with_esprim = !args.empty() && args.front() == "--esprim";
  if (with_esprim) args.erase(args.begin());
  const auto number = [&](std::size_t i, int otherwise) {
    return i < args.size() ? std::atoi(args[i].c_str()) : otherwise;
  };
  const int sequential = number(0, 2000);
  const int throughput_requests = number(1, 4000);
  const int rounds = std::max(1, number(2, 3));
  const std::string nstart = args.size() > 3 ? std::to_string(std::max(1, number(3, 1))) : "";
  const std::size_t windows[] = {1, 4, 16};
  const int warm_up = 10;  // requests on each path before it is measured in a round (after a reload of A)
  ::signal(SIGPIPE, SIG_IGN);

  try {
    const char* other_dauthd = std::getenv("BENCH_PROXY_DAUTHD");
    Deployment deployment({other_dauthd != nullptr ? other_dauthd : DAUTHD_PATH, "bench-proxy", nstart});
    if (with_esprim) {
      const std::string b_address = "address = \"" + deployment.address("b_peer") + "\"";
      deployment.replace_in_config("a", b_address, b_address + "\nesprim = \"off\"");
    }
    deployment.start();

    Target direct{"direct", {"127.0.0.1", deployment.ports.at("valve")}, {}, std::nullopt};
    direct.request.path = {"time"};
    Target proxied{"proxied", {"127.0.0.1", deployment.ports.at("a_local")}, {}, false};
    proxied.request.proxy_uri = "coap://CAE-valve/time";
    proxied.request.originator = "CAE-meter";
    Target esprim = proxied;
    esprim.name = "esprim";
    esprim.esprim = true;
    std::vector<const Target*> targets{&direct, &proxied};
    if (with_esprim) targets.push_back(&esprim);

    bool esprim_now = false;  // A's peer.address esprim as last loaded
    const auto select = [&](const Target& target) {
      if (target.esprim && *target.esprim != esprim_now) {
        set_esprim(deployment, *target.esprim);
        esprim_now = *target.esprim;
      }
    };

    Clients clients(*std::max_element(std::begin(windows), std::end(windows)));
    // The first proxied request sets up the AE-pair session: B fetches the key from the MEF, A retries
    // (PROTOCOL.md §4). The first ESPrim request fetches a receiver rand object from B, and B the SUID 23 key from
    // the MEF. Reported, not part of the statistics.
    const auto first = clients.latencies(proxied, 1).front();
    double first_esprim = 0;
    if (with_esprim) {
      select(esprim);
      first_esprim = clients.latencies(esprim, 1).front();
    }
    for (const Target* target : targets) {
      select(*target);
      clients.latencies(*target, warm_up);
    }
    if (clients.failures != 0) {
      std::cerr << "bench_proxy: the warm-up requests failed; logs in " << deployment.dir << "\n";
      return 1;
    }

    std::printf("backend=%s sequential=%d throughput_requests=%d rounds=%d dauthd=%s%s\n",
                std::string(transport::to_string(transport::compiled_backend())).c_str(), sequential,
                throughput_requests, rounds, deployment.dauthd_path.c_str(), with_esprim ? " --esprim" : "");
    std::printf("peer.nstart = peer.local_nstart = %s\n",
                nstart.empty() ? "dauthd's default (see dauthd.toml(5))" : nstart.c_str());
    std::printf("first proxied request (AE-pair DTLS handshake, key retrieval by B, A's retry): %.1f ms\n",
                first / 1000.0);
    if (with_esprim) {
      std::printf("first ESPrim request (receiver rand object from B, B's SUID 23 key from the MEF): %.1f ms\n",
                  first_esprim / 1000.0);
    }

    std::map<std::string, std::vector<double>> p50;
    std::map<std::string, std::vector<double>> p99;
    std::map<std::string, std::map<std::size_t, std::vector<double>>> rate;
    // Server CPU per request by window and process ("servers": the sum).
    std::map<std::string, std::map<std::size_t, std::map<std::string, std::vector<double>>>> cpu;
    int wrong_path = 0;
    for (int round = 0; round < rounds; ++round) {
      // Odd rounds measure ESPrim before plain: neither path always follows the other (or a reload).
      auto order = targets;
      if (with_esprim && round % 2 == 1) std::swap(order[1], order[2]);
      for (const Target* target : order) {
        select(*target);
        const long long answered_before = stats_counter(deployment, "a", "esprim_answered_total");
        clients.latencies(*target, warm_up);
        const auto samples = clients.latencies(*target, sequential);
        p50[target->name].push_back(percentile(samples, 0.50));
        p99[target->name].push_back(percentile(samples, 0.99));
        for (const std::size_t window : windows) {
          Clients load(window);
          // Server-side CPU per request: the valve alone (direct), or dauthd A + dauthd B + the valve (proxied).
          std::vector<std::string> servers{"valve"};
          if (target->esprim) servers.insert(servers.end(), {"a", "b"});
          std::map<std::string, double> before;
          for (const auto& node : servers) before[node] = cpu_microseconds(deployment.children.at(node));
          rate[target->name][window].push_back(load.throughput(*target, throughput_requests));
          double sum = 0;
          for (const auto& node : servers) {
            const double used = cpu_microseconds(deployment.children.at(node)) - before[node];
            cpu[target->name][window][node].push_back(used / throughput_requests);
            sum += used;
          }
          cpu[target->name][window]["servers"].push_back(sum / throughput_requests);
          clients.failures += load.failures;
        }
        // The path measured is the one meant: every request of the ESPrim path was answered protected, none of
        // the plain one.
        if (target->esprim) {
          const long long answered = stats_counter(deployment, "a", "esprim_answered_total") - answered_before;
          const long long expected =
              *target->esprim ? warm_up + sequential + static_cast<long long>(std::size(windows)) * throughput_requests
                              : 0;
          if (answered != expected) {
            std::fprintf(stderr, "bench_proxy: path %s: A answered %lld ESPrim requests, expected %lld\n",
                         target->name, answered, expected);
            ++wrong_path;
          }
        }
      }
      std::printf("  round %d: p50", round + 1);
      for (const Target* target : targets) std::printf(" %s %.0f us", target->name, p50[target->name].back());
      std::printf("; %zu outstanding:", windows[2]);
      for (const Target* target : targets) {
        std::printf(" %s %.0f/s", target->name, rate[target->name][windows[2]].back());
      }
      std::printf("\n");
      std::fflush(stdout);
    }

    std::printf("\n%-36s %10s %10s", "median over rounds", "direct", "proxied");
    if (with_esprim) std::printf(" %10s", "esprim");
    std::printf(" %15s", "proxied/direct");
    if (with_esprim) std::printf("  %-24s", "esprim/proxied (spread)");
    std::printf("\n");
    const auto row = [&](const std::string& what, const std::vector<double>& d, const std::vector<double>& p,
                         const std::vector<double>& e) {
      // Rows of the dauthds alone have no direct counterpart.
      if (d.empty()) {
        std::printf("%-36s %10s %10.1f", what.c_str(), "-", median(p));
      } else {
        std::printf("%-36s %10.1f %10.1f", what.c_str(), median(d), median(p));
      }
      if (with_esprim) std::printf(" %10.1f", median(e));
      if (d.empty()) {
        std::printf(" %15s", "-");
      } else {
        std::printf(" %14.2fx", median(p) / median(d));
      }
      if (with_esprim) std::printf("  %-24s", ratio_spread(p, e).c_str());
      std::printf("\n");
    };
    row("latency p50 (us)", p50["direct"], p50["proxied"], p50["esprim"]);
    row("latency p99 (us)", p99["direct"], p99["proxied"], p99["esprim"]);
    for (const std::size_t window : windows) {
      row("throughput, " + std::to_string(window) + " outstanding (req/s)", rate["direct"][window],
          rate["proxied"][window], rate["esprim"][window]);
    }
    for (const std::size_t window : windows) {
      row("server CPU/request, " + std::to_string(window) + " outst. (us)", cpu["direct"][window]["servers"],
          cpu["proxied"][window]["servers"], cpu["esprim"][window]["servers"]);
    }
    for (const char* node : {"a", "b"}) {
      for (const std::size_t window : windows) {
        row(std::string("  dauthd ") + (node[0] == 'a' ? "A" : "B") + " CPU/req, " + std::to_string(window) +
                " outst. (us)",
            {}, cpu["proxied"][window][node], cpu["esprim"][window][node]);
      }
    }
    std::printf("(server CPU: coap-server-notls for direct; dauthd A + dauthd B + coap-server-notls for proxied%s)\n",
                with_esprim ? " and esprim" : "");
    if (with_esprim) {
      std::vector<double> added;  // per round: what ESPrim adds to the proxied request's p50
      for (std::size_t round = 0; round < p50["esprim"].size(); ++round) {
        added.push_back(p50["esprim"][round] - p50["proxied"][round]);
      }
      std::printf("added p50 latency, esprim - proxied: %.0f us (per round %.0f..%.0f)\n", median(added),
                  *std::min_element(added.begin(), added.end()), *std::max_element(added.begin(), added.end()));
      std::printf("esprim/proxied: median of the per-round ratios (lowest..highest); %s\n",
                  rounds % 2 == 0 ? "each path went first in half of the rounds"
                                  : "odd rounds measured plain first, even ones ESPrim first");
    }
    std::printf("failed requests: %d\n", clients.failures);
    return clients.failures == 0 && wrong_path == 0 ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "bench_proxy: " << error.what() << "\n";
    return 1;
  }
}

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
// Usage: bench_proxy [sequential=2000] [throughput_requests=4000] [rounds=3] [nstart]
//   nstart: written as peer.nstart and peer.local_nstart of both gateways; omitted: dauthd's defaults.
//   BENCH_PROXY_DAUTHD=<path> runs another dauthd build (e.g. a saved "before" binary; then omit nstart if it
//   predates the key).
// Prints the median over interleaved rounds (a busy machine slows both paths alike within a round) and the
// proxied/direct ratios. Reports, does not assert.
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

}  // namespace

int main(int argc, char** argv) {
  const int sequential = argc > 1 ? std::atoi(argv[1]) : 2000;
  const int throughput_requests = argc > 2 ? std::atoi(argv[2]) : 4000;
  const int rounds = std::max(1, argc > 3 ? std::atoi(argv[3]) : 3);
  const std::string nstart = argc > 4 ? std::to_string(std::max(1, std::atoi(argv[4]))) : "";
  const std::size_t windows[] = {1, 4, 16};
  ::signal(SIGPIPE, SIG_IGN);

  try {
    const char* other_dauthd = std::getenv("BENCH_PROXY_DAUTHD");
    Deployment deployment({other_dauthd != nullptr ? other_dauthd : DAUTHD_PATH, "bench-proxy", nstart});
    deployment.start();

    Target direct{"direct", {"127.0.0.1", deployment.ports.at("valve")}, {}};
    direct.request.path = {"time"};
    Target proxied{"proxied", {"127.0.0.1", deployment.ports.at("a_local")}, {}};
    proxied.request.proxy_uri = "coap://CAE-valve/time";
    proxied.request.originator = "CAE-meter";

    Clients clients(*std::max_element(std::begin(windows), std::end(windows)));
    // The first proxied request sets up the AE-pair session: B fetches the key from the MEF, A retries
    // (PROTOCOL.md §4). Reported, not part of the statistics.
    const auto first = clients.latencies(proxied, 1).front();
    clients.latencies(direct, 10);
    clients.latencies(proxied, 10);
    if (clients.failures != 0) {
      std::cerr << "bench_proxy: the warm-up requests failed; logs in " << deployment.dir << "\n";
      return 1;
    }

    std::printf("backend=%s sequential=%d throughput_requests=%d rounds=%d dauthd=%s\n",
                std::string(transport::to_string(transport::compiled_backend())).c_str(), sequential,
                throughput_requests, rounds, deployment.dauthd_path.c_str());
    std::printf("peer.nstart = peer.local_nstart = %s\n",
                nstart.empty() ? "dauthd's default (see dauthd.toml(5))" : nstart.c_str());
    std::printf("first proxied request (AE-pair DTLS handshake, key retrieval by B, A's retry): %.1f ms\n",
                first / 1000.0);

    std::map<std::string, std::vector<double>> p50;
    std::map<std::string, std::vector<double>> p99;
    std::map<std::string, std::map<std::size_t, std::vector<double>>> rate;
    std::map<std::string, std::map<std::size_t, std::vector<double>>> cpu;
    for (int round = 0; round < rounds; ++round) {
      for (const Target* target : {&direct, &proxied}) {
        const auto samples = clients.latencies(*target, sequential);
        p50[target->name].push_back(percentile(samples, 0.50));
        p99[target->name].push_back(percentile(samples, 0.99));
      }
      for (const std::size_t window : windows) {
        for (const Target* target : {&direct, &proxied}) {
          Clients load(window);
          // Server-side CPU per request: the valve alone (direct), or dauthd A + dauthd B + the valve (proxied).
          std::vector<pid_t> servers{deployment.children.at("valve")};
          if (target == &proxied) {
            servers.push_back(deployment.children.at("a"));
            servers.push_back(deployment.children.at("b"));
          }
          double cpu_before = 0;
          for (const pid_t pid : servers) cpu_before -= cpu_microseconds(pid);
          rate[target->name][window].push_back(load.throughput(*target, throughput_requests));
          double cpu_used = cpu_before;
          for (const pid_t pid : servers) cpu_used += cpu_microseconds(pid);
          cpu[target->name][window].push_back(cpu_used / throughput_requests);
          clients.failures += load.failures;
        }
      }
      std::printf("  round %d: p50 direct %.0f us, proxied %.0f us; %zu outstanding: direct %.0f/s, proxied %.0f/s\n",
                  round + 1, p50["direct"].back(), p50["proxied"].back(), windows[2],
                  rate["direct"][windows[2]].back(), rate["proxied"][windows[2]].back());
    }

    std::printf("\n%-34s %12s %12s %16s\n", "median over rounds", "direct", "proxied", "proxied/direct");
    const auto row = [](const std::string& what, double a, double b) {
      std::printf("%-34s %12.1f %12.1f %15.2fx\n", what.c_str(), a, b, b / a);
    };
    row("latency p50 (us)", median(p50["direct"]), median(p50["proxied"]));
    row("latency p99 (us)", median(p99["direct"]), median(p99["proxied"]));
    for (const std::size_t window : windows) {
      row("throughput, " + std::to_string(window) + " outstanding (req/s)", median(rate["direct"][window]),
          median(rate["proxied"][window]));
    }
    for (const std::size_t window : windows) {
      row("server CPU/request, " + std::to_string(window) + " outst. (us)", median(cpu["direct"][window]),
          median(cpu["proxied"][window]));
    }
    std::printf("(server CPU: coap-server-notls for direct; dauthd A + dauthd B + coap-server-notls for proxied)\n");
    std::printf("failed requests: %d\n", clients.failures);
    return clients.failures == 0 ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "bench_proxy: " << error.what() << "\n";
    return 1;
  }
}

// bench_proxy: proxied request latency and throughput through two dauthds, against a direct request to the same
// CoAP server measured in the same run (issue 5).
//
//   direct:   client --CoAP--> coap-server-notls
//   proxied:  client --CoAP (Proxy-Uri, oneM2M-FR)--> dauthd A --DTLS-PSK (AE-pair key)--> dauthd B --CoAP-->
//             coap-server-notls
//
// Set-up like the e2e tests and the demo, pre-provisioned keys only: an MEF dauthd and two gateway dauthds on
// 127.0.0.1 (fresh keys, state directories and ports in a temporary directory), AE "meter" on A, AE "valve" on B
// served by coap-server-notls. The load comes from transport/ Nodes in this process with plain credentials, so
// process start-up does not count. "N outstanding" uses N client Nodes, each with its own session and one request
// in flight (the AE side keeps RFC 7252's NSTART = 1), so the N requests share A's one DTLS session to B, B's
// separate responses on it, and B's one plain session to the valve: peer.nstart / peer.local_nstart decide how
// many of them are in flight at once.
//
// Usage: bench_proxy [sequential=2000] [throughput_requests=4000] [rounds=3] [nstart]
//   nstart: written as peer.nstart and peer.local_nstart of both gateways; omitted: dauthd's defaults.
//   BENCH_PROXY_DAUTHD=<path> runs another dauthd build (e.g. a saved "before" binary; then omit nstart if it
//   predates the key).
// Prints the median over interleaved rounds (a busy machine slows both paths alike within a round) and the
// proxied/direct ratios. Reports, does not assert.
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dauth/transport/transport.hpp"

using namespace dauth;
using Clock = std::chrono::steady_clock;

namespace {

// ---- the deployment ----------------------------------------------------------------------------------------------

std::uint16_t free_udp_port() {
  const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof address;
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    throw std::runtime_error("no free UDP port");
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

void write_private(const std::filesystem::path& path, const std::string& text) {
  std::ofstream(path) << text;
  ::chmod(path.c_str(), 0600);
}

std::string random_hex(std::size_t bytes) {
  std::ifstream urandom("/dev/urandom", std::ios::binary);
  std::string out;
  static const char* const kDigits = "0123456789abcdef";
  for (std::size_t i = 0; i < bytes; ++i) {
    const auto byte = static_cast<unsigned char>(urandom.get());
    out += kDigits[byte >> 4];
    out += kDigits[byte & 15];
  }
  return out + "\n";
}

// A child process that dies with the benchmark, even if the benchmark aborts (no orphans on a shared machine).
pid_t spawn(const std::vector<std::string>& argv, const std::filesystem::path& log) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  ::dup2(fd, 1);
  ::dup2(fd, 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  ::execvp(args[0], args.data());
  std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
  ::_exit(127);
}

// One control-protocol request (docs/control-protocol.md); the reply line, or "" if the socket is not there yet.
std::string control(const std::filesystem::path& socket_path, const std::string& request) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, socket_path.c_str(), sizeof address.sun_path - 1);
  std::string reply;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0 &&
      ::send(fd, request.data(), request.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(request.size())) {
    char buffer[4096];
    ssize_t n = 0;
    while (reply.find('\n') == std::string::npos && (n = ::recv(fd, buffer, sizeof buffer, 0)) > 0) {
      reply.append(buffer, static_cast<std::size_t>(n));
    }
  }
  ::close(fd);
  return reply;
}

struct Deployment {
  std::filesystem::path dir;
  std::map<std::string, std::uint16_t> ports;
  std::map<std::string, pid_t> children;

  std::string dauthd_path = DAUTHD_PATH;

  explicit Deployment(const std::string& nstart_setting) {
    if (const char* other = std::getenv("BENCH_PROXY_DAUTHD")) dauthd_path = other;
    char dir_template[] = "/tmp/dauth-bench-proxy-XXXXXX";
    if (::mkdtemp(dir_template) == nullptr) throw std::runtime_error("mkdtemp failed");
    dir = dir_template;
    for (const char* name : {"mef", "a_peer", "a_local", "b_peer", "b_local", "valve"}) ports[name] = free_udp_port();
    for (const char* sub : {"keys", "mef", "mef/state", "a", "a/state", "b", "b/state"}) {
      std::filesystem::create_directory(dir / sub);
      ::chmod((dir / sub).c_str(), 0700);
    }
    for (const char* name : {"meter", "valve"}) {
      write_private(dir / "keys" / (std::string(name) + ".kpm"), random_hex(32));
    }
    for (const char* node : {"mef", "a", "b"}) write_private(dir / node / "master.key", random_hex(32));
    const auto port = [&](const char* name) { return std::to_string(ports.at(name)); };
    const auto daemon_section = [&](const std::string& node) {
      return "[daemon]\nstate_directory = \"" + (dir / node / "state").string() + "\"\ncontrol_socket = \"" +
             (dir / node / "control").string() + "\"\nmaster_key_source = \"file\"\nmaster_key_file = \"" +
             (dir / node / "master.key").string() + "\"\nlog_level = \"info\"\n\n";
    };
    const std::string nstart_keys =
        nstart_setting.empty() ? "" : "nstart = " + nstart_setting + "\nlocal_nstart = " + nstart_setting + "\n";
    const auto enrolee_section = [&](const char* local) {
      return "[enrolee]\nmef_address = \"127.0.0.1:" + port("mef") + "\"\nmef_fqdn = \"mef.bench.test\"\n" +
             "local_listen = \"127.0.0.1:" + port(local) + "\"\n\n";
    };
    const auto mef_row = [&](const std::string& name, const std::string& target) {
      return "[[mef.enrolee]]\nkpm_id = \"" + name + "@mef.bench.test\"\nkpm_file = \"" +
             (dir / "keys" / (name + ".kpm")).string() + "\"\nenrolee_id = \"CAE-" + name + "\"\ntargets = [\"CAE-" +
             target + "\"]\n\n";
    };
    const auto local_ae = [&](const std::string& name, const std::string& endpoint) {
      return "[[enrolee.ae]]\nid = \"CAE-" + name + "\"\n" + endpoint + "kpm_id = \"" + name +
             "@mef.bench.test\"\nkpm_file = \"" + (dir / "keys" / (name + ".kpm")).string() + "\"\n\n";
    };
    write_private(dir / "mef.toml", daemon_section("mef") + "[mef]\nfqdn = \"mef.bench.test\"\nlisten = \"127.0.0.1:" +
                                        port("mef") + "\"\n\n" + mef_row("meter", "valve") + mef_row("valve", "meter"));
    write_private(dir / "a.toml", daemon_section("a") + enrolee_section("a_local") + local_ae("meter", "") +
                                      "[peer]\nlisten = \"127.0.0.1:" + port("a_peer") + "\"\n" + nstart_keys +
                                      "\n[[peer.address]]\nae_id = \"CAE-valve\"\naddress = \"127.0.0.1:" +
                                      port("b_peer") + "\"\n");
    write_private(dir / "b.toml", daemon_section("b") + enrolee_section("b_local") +
                                      local_ae("valve", "endpoint = \"127.0.0.1:" + port("valve") + "\"\n") +
                                      "[peer]\nlisten = \"127.0.0.1:" + port("b_peer") + "\"\n" + nstart_keys +
                                      "\n[[peer.address]]\nae_id = \"CAE-meter\"\naddress = \"127.0.0.1:" +
                                      port("a_peer") + "\"\n\n[[peer.policy]]\npeer = \"CAE-meter\"\n" +
                                      "local_aes = [\"CAE-valve\"]\nmethods = [\"GET\"]\n");
  }

  ~Deployment() {
    for (const auto& [name, pid] : children) ::kill(pid, SIGTERM);
    for (const auto& [name, pid] : children) {
      int status = 0;
      ::waitpid(pid, &status, 0);
    }
    std::error_code ignored;
    std::filesystem::remove_all(dir, ignored);
  }

  void start_dauthd(const std::string& node) {
    children[node] = spawn({dauthd_path, "--config", (dir / (node + ".toml")).string()}, dir / (node + ".log"));
    for (int i = 0; i < 200; ++i) {
      if (control(dir / node / "control", "{\"verb\":\"status\"}\n").find("\"ok\":true") != std::string::npos) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    throw std::runtime_error("dauthd " + node + " did not start; see " + (dir / (node + ".log")).string());
  }

  void wait_enrolled(const std::string& node, const std::string& ae_id) {
    const std::string request = "{\"verb\":\"enrol.status\",\"args\":{\"ae_id\":\"" + ae_id + "\"}}\n";
    for (int i = 0; i < 600; ++i) {
      if (control(dir / node / "control", request).find("\"state\":\"enrolled\"") != std::string::npos) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    throw std::runtime_error(ae_id + " on " + node + " did not enrol");
  }

  void start() {
    start_dauthd("mef");
    children["valve"] = spawn({"coap-server-notls", "-A", "127.0.0.1", "-p", std::to_string(ports.at("valve"))},
                              dir / "valve.log");
    start_dauthd("b");
    start_dauthd("a");
    wait_enrolled("b", "CAE-valve");
    wait_enrolled("a", "CAE-meter");
  }
};

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

double percentile(std::vector<double> values, double p) {
  std::sort(values.begin(), values.end());
  const auto index = static_cast<std::size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[index];
}

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
    Deployment deployment(nstart);
    deployment.start();

    Target direct{"direct", {"127.0.0.1", deployment.ports.at("valve")}, {}};
    direct.request.path = {"time"};
    Target proxied{"proxied", {"127.0.0.1", deployment.ports.at("a_local")}, {}};
    proxied.request.proxy_uri = "coap://CAE-valve/time";
    proxied.request.originator = "CAE-meter";

    Clients clients(*std::max_element(std::begin(windows), std::end(windows)));
    // The first proxied request sets up the AE-pair session: B fetches the key from the MEF, A retries
    // (SPEC.md §4). Reported, not part of the statistics.
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

#include "bench_deployment.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace dauth::bench {

namespace {

// The child side of spawn() and run_command(): dies with the benchmark, output to `out_fd`, then exec.
[[noreturn]] void exec_child(const std::vector<std::string>& argv, int out_fd) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  ::dup2(null_fd, 0);
  ::dup2(out_fd, 1);
  ::dup2(out_fd, 2);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  ::execvp(args[0], args.data());
  std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
  ::_exit(127);
}

int exit_code_of(int status) {
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

}  // namespace

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

pid_t spawn(const std::vector<std::string>& argv, const std::filesystem::path& log) {
  const pid_t pid = ::fork();
  if (pid != 0) return pid;
  exec_child(argv, ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
}

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

CommandResult run_command(const std::vector<std::string>& argv) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe2: ") + std::strerror(errno));
  const auto start = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) exec_child(argv, fds[1]);
  ::close(fds[1]);
  CommandResult result;
  char buffer[4096];
  ssize_t n = 0;
  while ((n = ::read(fds[0], buffer, sizeof buffer)) > 0 || (n < 0 && errno == EINTR)) {
    if (n > 0) result.output.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.exit_code = exit_code_of(status);
  return result;
}

double percentile(std::vector<double> values, double p) {
  std::sort(values.begin(), values.end());
  const auto index = static_cast<std::size_t>(p * static_cast<double>(values.size() - 1) + 0.5);
  return values[index];
}

Deployment::Deployment(const DeploymentOptions& options)
    : dauthd_path(options.dauthd_path), keep_dir(std::getenv("BENCH_KEEP_DIR") != nullptr) {
  std::string dir_template = "/tmp/dauth-" + options.name + "-XXXXXX";
  if (::mkdtemp(dir_template.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  dir = dir_template;
  for (const char* name : {"mef", "a_peer", "a_local", "b_peer", "b_local"}) ports[name] = test::free_loopback_port();
  ports["valve"] = test::free_loopback_port(test::PortUse::udp_and_tcp);  // coap-server-notls
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
      options.nstart.empty() ? "" : "nstart = " + options.nstart + "\nlocal_nstart = " + options.nstart + "\n";
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

Deployment::~Deployment() {
  for (const auto& [name, pid] : children) ::kill(pid, SIGTERM);
  for (const auto& [name, pid] : children) {
    int status = 0;
    ::waitpid(pid, &status, 0);
  }
  if (keep_dir) {
    std::cerr << "kept " << dir.string() << " (BENCH_KEEP_DIR)\n";
    return;
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

std::string Deployment::address(const std::string& port_name) const {
  return "127.0.0.1:" + std::to_string(ports.at(port_name));
}

void Deployment::replace_in_config(const std::string& node, const std::string& from, const std::string& to) {
  const auto path = dir / (node + ".toml");
  std::stringstream text;
  text << std::ifstream(path).rdbuf();
  std::string config = text.str();
  std::size_t at = config.find(from);
  if (at == std::string::npos) throw std::runtime_error(path.string() + ": no '" + from + "' to replace");
  for (; at != std::string::npos; at = config.find(from, at + to.size())) config.replace(at, from.size(), to);
  write_private(path, config);
}

void Deployment::start_dauthd(const std::string& node) {
  children[node] = spawn({dauthd_path, "--config", (dir / (node + ".toml")).string()}, dir / (node + ".log"));
  for (int i = 0; i < 200; ++i) {
    if (control(control_socket(node), "{\"verb\":\"status\"}\n").find("\"ok\":true") != std::string::npos) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  throw std::runtime_error("dauthd " + node + " did not start; see " + (dir / (node + ".log")).string());
}

void Deployment::start_valve() {
  children["valve"] = spawn({"coap-server-notls", "-A", "127.0.0.1", "-p", std::to_string(ports.at("valve"))},
                            dir / "valve.log");
}

void Deployment::wait_enrolled(const std::string& node, const std::string& ae_id, int limit_seconds) {
  const std::string request = "{\"verb\":\"enrol.status\",\"args\":{\"ae_id\":\"" + ae_id + "\"}}\n";
  for (int i = 0; i < limit_seconds * 10; ++i) {
    if (control(control_socket(node), request).find("\"state\":\"enrolled\"") != std::string::npos) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  throw std::runtime_error(ae_id + " on " + node + " did not enrol within " + std::to_string(limit_seconds) + " s");
}

void Deployment::start() {
  start_dauthd("mef");
  start_valve();
  start_dauthd("b");
  start_dauthd("a");
  wait_enrolled("b", "CAE-valve");
  wait_enrolled("a", "CAE-meter");
}

}  // namespace dauth::bench

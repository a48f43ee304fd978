// bench_token: what keeping private keys in a PKCS#11 token costs dauth, against the same keys as PEM files in the
// same run. SoftHSM2 is software, so the difference is dauth's (and GnuTLS's) overhead of going through PKCS#11:
// a C_Sign per handshake through p11-kit instead of an in-process signature.
//
// X.509 handshakes: two transport/ servers as child processes, one with its key as a PEM file and one with the same
// key imported into a throwaway SoftHSM2 token (pkcs11: URI); the same client (file key) opens one new session per
// request, sequentially, alternating between the two in interleaved rounds. Mode "both" also puts the client's key
// in the token (the client signs its CertificateVerify there).
// Certificate issuance: the MEF's EST issuing step (crypto::CertificateAuthority::issue) with the CA key in memory
// vs in the token, in this process, as many issuances as handshakes.
// Usage: bench_token [handshakes=400] [rounds=5]
// Prints per mode the median rate of each server, the median ratio token/file with the spread (min..max) of the
// per-round ratios, and the server CPU per handshake (from /proc/<pid>/schedstat, same rounds).
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dauth/crypto/token.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/transport/transport.hpp"
#include "loopback_ports.hpp"

using namespace dauth;
using Clock = std::chrono::steady_clock;

namespace {

constexpr const char* kTokenLabel = "dauth-bench";
constexpr const char* kPin = "bench-pin-1234";  // a throwaway token's PIN: no secret

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

bool run(const std::string& command) { return std::system(command.c_str()) == 0; }

// CA, server and client certificates (openssl), and a SoftHSM2 token of its own holding both keys.
bool make_pki_and_token(const std::filesystem::path& dir) {
  const std::string d = dir.string();
  const std::string pki =
      "set -e; cd '" + d + "'; "
      "openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null; "
      "openssl req -x509 -new -key ca.key -subj /CN=BenchCA -days 2 -out ca.pem "
      "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null; "
      "for n in server client; do openssl ecparam -name prime256v1 -genkey -noout -out $n.key 2>/dev/null; "
      "openssl req -new -key $n.key -subj /CN=$n -out $n.csr 2>/dev/null; "
      "printf 'subjectAltName=URI://bench.example/in-cse/CAE-%s\\nextendedKeyUsage=serverAuth,clientAuth\\n' $n "
      "> $n.ext; openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile $n.ext "
      "-out $n.pem 2>/dev/null; openssl pkcs8 -topk8 -nocrypt -in $n.key -out $n.p8; done; "
      "openssl pkcs8 -topk8 -nocrypt -in ca.key -out ca.p8; "
      "mkdir tokens; printf 'directories.tokendir = %s/tokens\\nobjectstore.backend = file\\nlog.level = ERROR\\n' "
      "'" + d + "' > softhsm2.conf";
  if (!run(pki)) return false;
  setenv("SOFTHSM2_CONF", (dir / "softhsm2.conf").c_str(), 1);  // the servers (children) inherit it
  const std::string token = std::string("softhsm2-util --init-token --free --label ") + kTokenLabel +
                            " --so-pin 12345678 --pin " + kPin + " >/dev/null";
  if (!run(token)) return false;
  int id = 1;
  for (const char* name : {"server", "client", "ca"}) {
    const std::string import = "softhsm2-util --import '" + d + "/" + name + ".p8' --token " + kTokenLabel +
                               " --label " + name + " --id 0" + std::to_string(id++) + " --pin " + kPin +
                               " >/dev/null";
    if (!run(import)) return false;
  }
  return true;
}

transport::X509Credentials credentials(const std::filesystem::path& dir, const std::string& name, bool in_token) {
  transport::X509Credentials out{read_file(dir / (name + ".pem")), SecretBuffer(), read_file(dir / "ca.pem")};
  if (in_token) {
    out.token_key = transport::TokenKey{std::string("pkcs11:token=") + kTokenLabel + ";object=" + name +
                                            ";type=private",
                                        std::make_shared<const SecretBuffer>(SecretBuffer::copy_of(ByteView::of(kPin)))};
  } else {
    out.private_key_pem = SecretBuffer::copy_of(ByteView::of(read_file(dir / (name + ".key"))));
  }
  return out;
}

// A server in a child process that dies with the benchmark, GET anything -> 2.05.
pid_t start_server(const std::filesystem::path& dir, std::uint16_t port, bool key_in_token) {
  std::fflush(stdout);  // the child must not print the parent's buffered lines again
  const pid_t pid = fork();
  if (pid != 0) return pid;
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  transport::NodeConfig config;
  config.secure_addresses = {"127.0.0.1"};
  config.secure_port = port;
  config.x509 = credentials(dir, "server", key_in_token);
  config.limits.max_handshakes = 1000;
  config.limits.max_sessions = 5000;
  auto node = transport::Node::create(std::move(config));
  if (!node.ok()) {
    std::cerr << "server: " << node.error().to_string() << "\n";
    _exit(1);
  }
  (*node)->set_failure_observer([](const transport::Failure&) {});
  (*node)->add_route(transport::Method::get, {}, transport::Access::secure,
                     [](const transport::Session&, const transport::Request&, transport::Responder responder) {
                       responder.respond(transport::Response::with_text(205, "hello"));
                     });
  (*node)->run_until([] { return false; }, std::chrono::hours(1));
  _exit(0);
}

// CPU time the process has run, in ns (schedstat: finer than the clock ticks of /proc/<pid>/stat).
std::uint64_t cpu_ns(pid_t pid) {
  std::ifstream schedstat("/proc/" + std::to_string(pid) + "/schedstat");
  std::uint64_t ns = 0;
  schedstat >> ns;
  return ns;
}

struct Client {
  std::unique_ptr<transport::Node> node;
  transport::Peer peer;
  transport::ClientCredentials credentials;
  int failures = 0;
  std::string last_error;

  Client(std::uint16_t port, transport::ClientCredentials with) : peer{"127.0.0.1", port}, credentials(std::move(with)) {
    transport::NodeConfig config;
    config.limits.max_client_sessions = 900;
    node = std::move(*transport::Node::create(std::move(config)));
    node->set_failure_observer([](const transport::Failure&) {});
  }
  bool one_request() {
    bool done = false;
    bool ok = false;
    node->request(peer, credentials, transport::Request{}, [&](Result<transport::Response> response,
                                                               const transport::Session*) {
      done = true;
      ok = response.ok();
      if (!ok) last_error = response.error().to_string();
    });
    node->run_until([&] { return done; }, std::chrono::seconds(10));
    node->close_client_sessions();
    return ok;
  }
  bool wait_until_serving() {
    for (int attempt = 0; attempt < 50; ++attempt) {
      if (one_request()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }
  // Sequential full handshakes (one new session per request).
  double handshakes_per_second(int count) {
    const auto start = Clock::now();
    for (int i = 0; i < count; ++i) {
      if (!one_request()) ++failures;
    }
    return count / std::chrono::duration<double>(Clock::now() - start).count();
  }
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// AE-ID certificates issued from one CSR by the CA, `count` times; returns issuances per second (0 on an error).
double issuances_per_second(const crypto::CertificateAuthority& ca, const crypto::CertificateRequest& request,
                            int count) {
  const auto start = Clock::now();
  for (int i = 0; i < count; ++i) {
    const std::time_t now = std::time(nullptr);
    crypto::IssueParams params{Bytes{0x01, static_cast<std::uint8_t>(i >> 8), static_cast<std::uint8_t>(i)}, now,
                               now + 3600};
    if (!ca.issue(request, "CAE-bench", params).ok()) return 0;
  }
  return count / std::chrono::duration<double>(Clock::now() - start).count();
}

// The MEF's EST issuing step alone (crypto::CertificateAuthority::issue: mbedTLS writes the certificate, the CA key
// signs it), with the same CA key in memory and in the token, interleaved rounds, CPU of this process.
bool bench_issuance(const std::filesystem::path& dir, int issuances, int rounds) {
  auto token = crypto::Token::open(crypto::TokenOptions{}, SecretBuffer::copy_of(ByteView::of(kPin)));
  auto token_key = token.ok() ? token->private_key(std::string("pkcs11:token=") + kTokenLabel + ";object=ca")
                              : Result<crypto::PrivateKey>(token.error());
  auto file_key = crypto::PrivateKey::load_file((dir / "ca.key").string());
  auto certificate = crypto::Certificate::load_file((dir / "ca.pem").string());
  auto certificate_again = crypto::Certificate::load_file((dir / "ca.pem").string());
  auto subject = crypto::PrivateKey::generate_p256();
  if (!token_key.ok() || !file_key.ok() || !certificate.ok() || !certificate_again.ok() || !subject.ok()) {
    std::cerr << "issuance set-up: " << (token_key.ok() ? "" : token_key.error().to_string()) << "\n";
    return false;
  }
  auto file_ca = crypto::CertificateAuthority::from(std::move(*certificate), std::move(*file_key));
  auto token_ca = crypto::CertificateAuthority::from(std::move(*certificate_again), std::move(*token_key));
  auto request = crypto::CertificateRequest::create(*subject, "CAE-bench");
  if (!file_ca.ok() || !token_ca.ok() || !request.ok()) {
    std::cerr << "issuance set-up: " << (token_ca.ok() ? "" : token_ca.error().to_string()) << "\n";
    return false;
  }
  std::vector<double> file_rates, token_rates, ratios, file_cpu_us, token_cpu_us, cpu_ratios;
  const int per_round = std::max(1, issuances / rounds);
  const pid_t self = getpid();
  for (int round = 0; round < rounds; ++round) {
    std::uint64_t before = cpu_ns(self);
    file_rates.push_back(issuances_per_second(*file_ca, *request, per_round));
    file_cpu_us.push_back(static_cast<double>(cpu_ns(self) - before) / 1000.0 / per_round);
    before = cpu_ns(self);
    token_rates.push_back(issuances_per_second(*token_ca, *request, per_round));
    token_cpu_us.push_back(static_cast<double>(cpu_ns(self) - before) / 1000.0 / per_round);
    if (file_rates.back() == 0 || token_rates.back() == 0) {
      std::cerr << "an issuance failed\n";
      return false;
    }
    ratios.push_back(token_rates.back() / file_rates.back());
    cpu_ratios.push_back(token_cpu_us.back() / file_cpu_us.back());
  }
  std::printf("CA key in the token: issuances/s (median) file %.1f, token %.1f, token/file %.2f, per-round "
              "%.2f..%.2f\n",
              median(file_rates), median(token_rates), median(ratios), *std::min_element(ratios.begin(), ratios.end()),
              *std::max_element(ratios.begin(), ratios.end()));
  std::printf("CA key in the token: CPU per issuance (median, this process; SoftHSM runs in it) file %.0f us, token "
              "%.0f us, token/file %.2f, per-round %.2f..%.2f\n",
              median(file_cpu_us), median(token_cpu_us), median(cpu_ratios),
              *std::min_element(cpu_ratios.begin(), cpu_ratios.end()),
              *std::max_element(cpu_ratios.begin(), cpu_ratios.end()));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  const int handshakes = argc > 1 ? std::atoi(argv[1]) : 400;
  // Interleaved rounds: a noisy, shared machine slows both servers alike within one round.
  const int rounds = std::max(1, argc > 2 ? std::atoi(argv[2]) : 5);
  if (transport::compiled_backend() != transport::Backend::gnutls) {
    std::cerr << "keys in a PKCS#11 token need the GnuTLS build\n";
    return 1;
  }
  char dir_template[] = "/tmp/dauth-bench-token-XXXXXX";
  const std::filesystem::path dir = mkdtemp(dir_template);
  if (!make_pki_and_token(dir)) {
    std::cerr << "making the PKI or the SoftHSM2 token failed (openssl, softhsm2-util)\n";
    return 1;
  }
  std::printf("X.509 handshakes, %d per server in %d interleaved rounds, key as a PEM file vs in a SoftHSM2 token\n",
              handshakes, rounds);
  int failures = 0;
  for (const bool client_in_token : {false, true}) {
    const char* mode = client_in_token ? "both keys" : "server key";
    const std::uint16_t file_port = dauth::test::free_loopback_port();
    const std::uint16_t token_port = dauth::test::free_loopback_port();
    const pid_t file_server = start_server(dir, file_port, false);
    const pid_t token_server = start_server(dir, token_port, true);
    // The file server's client keeps its key in a file; the token server's holds it where the mode says.
    Client file_client(file_port, transport::ClientCredentials::certificate(credentials(dir, "client", false), "", ""));
    Client token_client(token_port,
                        transport::ClientCredentials::certificate(credentials(dir, "client", client_in_token), "", ""));
    // The token server loads its key before this process touches the token: SoftHSM2 processes that read one
    // token directory at the same moment may miss the token (seen as "no token matches it" at start).
    Client probe(token_port, transport::ClientCredentials::certificate(credentials(dir, "client", false), "", ""));
    if (!file_client.wait_until_serving() || !probe.wait_until_serving() || !token_client.wait_until_serving()) {
      std::cerr << mode << ": a server does not answer: " << file_client.last_error << token_client.last_error
                << "\n";
      kill(file_server, SIGKILL);
      kill(token_server, SIGKILL);
      return 1;
    }
    std::vector<double> file_rates, token_rates, ratios, file_cpu_us, token_cpu_us, cpu_ratios;
    const int per_round = std::max(1, handshakes / rounds);
    for (int round = 0; round < rounds; ++round) {
      std::uint64_t before = cpu_ns(file_server);
      file_rates.push_back(file_client.handshakes_per_second(per_round));
      file_cpu_us.push_back(static_cast<double>(cpu_ns(file_server) - before) / 1000.0 / per_round);
      before = cpu_ns(token_server);
      token_rates.push_back(token_client.handshakes_per_second(per_round));
      token_cpu_us.push_back(static_cast<double>(cpu_ns(token_server) - before) / 1000.0 / per_round);
      ratios.push_back(token_rates.back() / file_rates.back());
      cpu_ratios.push_back(token_cpu_us.back() / file_cpu_us.back());
      std::printf("  %s round %d: file %.1f/s %.0f us server CPU, token %.1f/s %.0f us server CPU\n", mode, round + 1,
                  file_rates.back(), file_cpu_us.back(), token_rates.back(), token_cpu_us.back());
    }
    kill(file_server, SIGKILL);
    kill(token_server, SIGKILL);
    waitpid(file_server, nullptr, 0);
    waitpid(token_server, nullptr, 0);
    failures += file_client.failures + token_client.failures;
    std::printf("%s in the token: handshakes/s (median) file %.1f, token %.1f, token/file %.2f, per-round "
                "%.2f..%.2f\n",
                mode, median(file_rates), median(token_rates), median(ratios),
                *std::min_element(ratios.begin(), ratios.end()), *std::max_element(ratios.begin(), ratios.end()));
    std::printf("%s in the token: server CPU per handshake (median) file %.0f us, token %.0f us, token/file %.2f, "
                "per-round %.2f..%.2f\n",
                mode, median(file_cpu_us), median(token_cpu_us), median(cpu_ratios),
                *std::min_element(cpu_ratios.begin(), cpu_ratios.end()),
                *std::max_element(cpu_ratios.begin(), cpu_ratios.end()));
  }
  std::printf("failed requests: %d\n", failures);
  if (!bench_issuance(dir, handshakes, rounds)) failures += 1;
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
  return failures == 0 ? 0 : 1;
}

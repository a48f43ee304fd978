// Helpers for the transport tests: pumping several Nodes in one thread, a Node served from a background thread
// while a stock client runs as a child process, and certificates made by the openssl command (an independent
// producer).
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "dauth/transport/transport.hpp"
#include "support.hpp"

namespace dauth::test {

using namespace std::chrono_literals;

// Runs process_ready() on every node until done() or max elapsed (an upper bound, not a timed assertion).
bool pump(const std::vector<transport::Node*>& nodes, const std::function<bool()>& done,
          std::chrono::milliseconds max = 20s);

// Collects failure reports of a node.
struct FailureLog {
  std::vector<transport::Failure> failures;
  transport::FailureObserver observer() {
    return [this](const transport::Failure& failure) { failures.push_back(failure); };
  }
  bool has(transport::FailureKind kind, const std::string& identity) const;
  std::string text() const;
};

// Serves node from a background thread until destroyed; the test thread must not touch node meanwhile.
class BackgroundNode {
 public:
  explicit BackgroundNode(transport::Node& node);
  ~BackgroundNode();
  BackgroundNode(const BackgroundNode&) = delete;
  BackgroundNode& operator=(const BackgroundNode&) = delete;

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A PSK table in memory, as the key store will provide it.
transport::PskLookup psk_table(std::map<std::string, std::string> keys);
SecretBuffer secret(const std::string& text);

// Certificates and keys made with the openssl command line in dir:
//   ca.pem/ca.key (trusted), rogue.pem/rogue.key (another CA), server.*, client.* (SAN URI = AE-ID),
//   nouri.* (client cert with a dNSName only), rogueclient.* (issued by rogue), expired.* (2020),
//   rpk_a.key / rpk_b.key / rpk_c.key (SEC1 EC keys) with rpk_*.id (RFC 6920 names of their SPKI) and rpk_*.pub
//   (the SPKI as PEM, for gnutls-cli --rawpkfile).
struct Pki {
  explicit Pki(const TempDir& dir);
  std::string text(const std::string& name) const;
  transport::X509Credentials credentials(const std::string& name) const;  // name.pem + name.key + ca.pem
  std::filesystem::path path(const std::string& name) const { return dir / name; }
  std::filesystem::path dir;
};

inline const std::string kServerAeId = "//m2m.example.net/in-cse/CAE-server-01";
inline const std::string kClientAeId = "//m2m.example.net/in-cse/CAE-client-01";

// A node with a coaps endpoint on 127.0.0.1:secure_port (0: ephemeral) whose GET /hello returns
// "<kind>:<identity>" and whose GET /ekm returns the hex of a 32-byte RFC 5705 export with label
// "EXPORTER-dauth-test". A test that binds the port again after the server stopped takes one from
// free_loopback_port().
std::unique_ptr<transport::Node> make_server(transport::NodeConfig config, std::uint16_t secure_port = 0);
std::string hex_of(const SecretBuffer& secret);
std::string text_of(const Bytes& bytes);

// What a client saw of one request: its result and, when a session carried it, what that session reported at the
// time (hex of the 32-byte "EXPORTER-dauth-test" export, cipher suite, the authenticated server, counters).
struct CallResult {
  bool done = false;
  std::optional<Result<transport::Response>> result;
  std::string client_export;
  std::string cipher;
  transport::PeerIdentity peer;
  transport::SessionCounters counters;
};
transport::ResponseHandler record_into(CallResult& call);

// A GET for the given Uri-Path segments.
transport::Request get_request(std::vector<std::string> path);

// A node without endpoints (client only) with the given limits.
std::unique_ptr<transport::Node> make_client_node(transport::Limits limits = {});

// Sends request from client to peer and pumps server and client until it completes (REQUIREs that it does).
CallResult request_and_wait(transport::Node& server, transport::Node& client, const transport::Peer& peer,
                            const transport::ClientCredentials& credentials, transport::Request request);

}  // namespace dauth::test

// A three-node deployment on 127.0.0.1 for the end-to-end tests: the MEF and gateways A and B of the demo
// (scripts/demo.d/*.toml.in), AE "valve" served by coap-server-notls behind B, fresh keys and state directories
// under one TempDir, ports from free_loopback_port() at set-up. Waits are bounded polls, never timed assertions.
#pragma once

#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "dauth/crypto/onem2m.hpp"
#include "dauth/secret.hpp"
#include "dauth/transport/transport.hpp"
#include "daemon_process.hpp"
#include "loopback_ports.hpp"
#include "support.hpp"

namespace dauth::test {

class Deployment {
 public:
  Deployment();
  ~Deployment();

  // node: "mef", "a" (gateway A), "b" (gateway B).
  void start(const std::string& node);
  void stop(const std::string& node, int signal_number);  // returns after the process exited
  std::optional<int> last_exit(const std::string& node) const;
  bool running(const std::string& node) const;
  void start_valve();
  // Another local AE server (coap-server-notls) on 127.0.0.1:port, stopped with the Deployment.
  void start_ae_server(const std::string& name, std::uint16_t port);
  // A further port from free_loopback_port() (UDP and TCP free), also substituted as @NAME@ by edit_config() callers.
  std::uint16_t add_port(const std::string& name);
  // Extra environment entries ("NAME=value") for the node's next start().
  void set_environment(const std::string& node, std::vector<std::string> environment);
  // Rewrites the node's configuration file (before start(), or before a restart / SIGHUP).
  void edit_config(const std::string& node, const std::function<std::string(std::string)>& edit);

  CommandResult ctl(const std::string& node, std::vector<std::string> args) const;
  nlohmann::json ctl_json(const std::string& node, std::vector<std::string> args) const;  // --json, ok required
  // One control-protocol request straight on the socket; the "result" object (ok required).
  nlohmann::json verb(const std::string& node, const std::string& name, const nlohmann::json& args) const;
  // Polls enrol.status until the AE is enrolled (true) or the limit passes (false).
  bool wait_enrolled(const std::string& node, const std::string& ae_id, int limit_seconds = 60) const;

  // coap-client-notls through gateway A's local endpoint with oneM2M-FR = originator (-v 6 so that error codes
  // are printed).
  CommandResult proxied(const std::string& originator, const std::string& method, const std::string& path,
                        const std::string& payload = {}) const;
  // The same to another target AE.
  CommandResult proxied_to(const std::string& originator, const std::string& target, const std::string& method,
                           const std::string& path, const std::string& payload = {}) const;
  // coap-client-notls straight to the valve server.
  CommandResult direct(const std::string& method, const std::string& path, const std::string& payload = {}) const;

  // Inserts `line` into the node's config file after the first line equal to `after` (e.g. "[daemon]"); call
  // before start(). Throws if `after` is not there.
  void insert_config_line(const std::string& node, const std::string& after, const std::string& line);
  // Sends a signal without waiting; wait_exit() then collects the exit status (nullopt if still running at the
  // limit) and appends the run's output to log(node), like stop().
  void signal(const std::string& node, int signal_number) const;
  std::optional<int> wait_exit(const std::string& node, std::chrono::seconds limit);
  // Output of the node's current (or last) run so far; wait_for_log() polls it for `text`.
  std::string run_log(const std::string& node) const;
  bool wait_for_log(const std::string& node, const std::string& text, int limit_seconds = 30) const;

  std::filesystem::path state(const std::string& node) const;
  std::filesystem::path dir() const { return dir_.path(); }
  std::filesystem::path log(const std::string& node) const;
  std::string master_key_hex(const std::string& node) const;
  std::vector<std::string> key_files_hex() const;  // every Kpm and master key as written
  std::string all_logs() const;
  const std::map<std::string, std::uint16_t>& ports() const { return ports_; }

 private:
  std::string node_dir(const std::string& node) const;
  TempDir dir_;
  std::map<std::string, std::uint16_t> ports_;
  std::map<std::string, std::unique_ptr<DaemonProcess>> processes_;
  std::map<std::string, std::optional<int>> exits_;
  std::map<std::string, std::vector<std::string>> environments_;
  std::unique_ptr<DaemonProcess> valve_;
  std::map<std::string, std::unique_ptr<DaemonProcess>> ae_servers_;
};

// `text` with every `from` replaced by `to` (configuration templates and edits).
std::string replace_all(std::string text, const std::string& from, const std::string& to);

// scripts/demo.d/make-pki with these arguments ("ca <prefix> <CN>", "leaf <ca> <prefix> <CN> <SAN>", "demo <dir>").
CommandResult make_pki(std::vector<std::string> args);

// True when coap-client-notls, coap-server-notls and openssl are installed (libcoap3-bin).
bool have_stock_tools();

// Starts the MEF, the valve server, gateways B and A, and REQUIREs that valve and meter get enrolled.
void start_all(Deployment& d);

// A fresh random value PUT straight to the valve server: a proxied answer can only contain it if the request
// really reached that server.
std::string put_marker(const Deployment& d);
// The same straight to another local AE's CoAP server on 127.0.0.1:port (e.g. one started with start_ae_server).
std::string put_marker_at(std::uint16_t port);

// Certificate peer sessions: meter also enrols for an AE-ID certificate over EST, both gateways trust the MEF CA
// for peers and A reaches valve with X.509; then start_all() and a restart of B, which presents the certificate
// fixed at its start (valve's is issued only after it first started).
void start_with_certificate_peer_sessions(Deployment& d);

// A usage-constrained key as gateway `node` would derive it: read from its stopped key store (master key from the
// deployment) for local AE enrolee_id's enrolment, with `suid` and target AE-ID `target` (TS-0003 §10.3.7).
// REQUIREs that the AE is enrolled there.
struct StoredTargetKey {
  std::string ke_id;
  SecretBuffer key;
  std::string target;  // the target AE, named as SNI (PROTOCOL.md §2)
};
StoredTargetKey stored_target_key(const Deployment& d, const std::string& node, const std::string& enrolee_id,
                                  crypto::Suid suid, const std::string& target);

// One request from a fresh client Node, run until its answer (or 30 s): a request made by hand, with an originator
// or payload of the test's choosing.
Result<transport::Response> request_once(const transport::Peer& peer, const transport::ClientCredentials& credentials,
                                         const transport::Request& request);

}  // namespace dauth::test

// In a TEST_CASE: warns and returns when have_stock_tools() is false (a macro because it returns from the caller).
#define DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS()                                       \
  do {                                                                            \
    if (!::dauth::test::have_stock_tools()) {                                     \
      WARN("coap-client-notls / coap-server-notls / openssl missing; skipped");   \
      return;                                                                     \
    }                                                                             \
  } while (false)

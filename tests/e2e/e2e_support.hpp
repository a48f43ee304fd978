// A three-node deployment on 127.0.0.1 for the end-to-end tests: the MEF and gateways A and B of the demo
// (scripts/demo.d/*.toml.in), AE "valve" served by coap-server-notls behind B, fresh keys and state directories
// under one TempDir, ports picked free at set-up. Waits are bounded polls, never timed assertions.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "daemon_process.hpp"
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
  // coap-client-notls straight to the valve server.
  CommandResult direct(const std::string& method, const std::string& path, const std::string& payload = {}) const;

  std::filesystem::path state(const std::string& node) const;
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
  std::unique_ptr<DaemonProcess> valve_;
};

// True when coap-client-notls, coap-server-notls and openssl are installed (libcoap3-bin).
bool have_stock_tools();

}  // namespace dauth::test

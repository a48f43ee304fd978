#include "e2e_support.hpp"

#include "dauth/crypto/keystore.hpp"

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <fstream>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace dauth::test {

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (std::size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
  return text;
}

namespace {

const char* kConfigOf(const std::string& node) {
  return node == "mef" ? "mef" : node == "a" ? "gateway-a" : "gateway-b";
}

}  // namespace

CommandResult make_pki(std::vector<std::string> args) {
  args.insert(args.begin(), {"bash", (std::filesystem::path(DAUTH_SOURCE_DIR) / "scripts" / "demo.d" / "make-pki").string()});
  return run_command(args);
}

bool have_stock_tools() {
  return have_program("coap-client-notls") && have_program("coap-server-notls") && have_program("openssl");
}

Deployment::Deployment() {
  for (const char* name : {"MEF_PORT", "A_PEER", "A_LOCAL", "B_PEER", "B_LOCAL"}) ports_[name] = free_loopback_port();
  ports_["VALVE_PORT"] = free_loopback_port(PortUse::udp_and_tcp);  // coap-server-notls, or a test's own socket
  for (const char* sub : {"keys", "mef", "mef/state", "a", "a/state", "b", "b/state"}) {
    std::filesystem::create_directory(dir_ / sub);
    std::filesystem::permissions(dir_ / sub, std::filesystem::perms::owner_all, std::filesystem::perm_options::replace);
  }
  auto random_hex = [] {
    const auto result = run_command({"openssl", "rand", "-hex", "32"});
    if (result.exit_code != 0) throw std::runtime_error("openssl rand failed: " + result.output);
    return result.output;
  };
  for (const char* name : {"meter", "intruder"}) {
    write_file(dir_ / "keys" / (std::string(name) + ".kpm"), random_hex(), 0600);
  }
  for (const char* node : {"mef", "a", "b"}) write_file(dir_ / node / "master.key", random_hex(), 0600);
  // The demo's certificates (MEF CA and FQDN certificate, device CA, valve's device certificate).
  if (const auto pki = make_pki({"demo", dir_.path().string()}); pki.exit_code != 0) {
    throw std::runtime_error("scripts/demo.d/make-pki demo failed: " + pki.output);
  }
  for (const char* config : {"mef", "gateway-a", "gateway-b"}) {
    std::string text =
        read_text_file(std::filesystem::path(DAUTH_SOURCE_DIR) / "scripts" / "demo.d" / (std::string(config) + ".toml.in"));
    text = replace_all(text, "@DIR@", dir_.path().string());
    for (const auto& [name, port] : ports_) text = replace_all(text, "@" + name + "@", std::to_string(port));
    write_file(dir_ / (std::string(config) + ".toml"), text, 0600);
  }
}

Deployment::~Deployment() {
  valve_.reset();
  ae_servers_.clear();
  for (auto& [node, process] : processes_) {
    if (process) {
      process->signal(SIGTERM);
      process->wait(std::chrono::seconds(10));
    }
  }
}

std::string Deployment::node_dir(const std::string& node) const { return (dir_ / node).string(); }
std::filesystem::path Deployment::state(const std::string& node) const { return dir_ / node / "state"; }
std::filesystem::path Deployment::log(const std::string& node) const { return dir_ / (node + ".log"); }

void Deployment::start(const std::string& node) {
  // Each run appends to the node's log (restarts keep the earlier lines for the no-secret check).
  const auto run_log = dir_ / (node + ".run.log");
  processes_[node] = std::make_unique<DaemonProcess>(
      std::vector<std::string>{DAUTHD_PATH, "--config", (dir_ / (std::string(kConfigOf(node)) + ".toml")).string()},
      environments_[node], run_log);
  exits_[node].reset();
  if (!wait_for_control_socket(dir_ / node / "control")) {
    throw std::runtime_error("dauthd " + node + " did not open its control socket: " + read_text_file(run_log));
  }
  // The control socket answers before the roles run? No: Roles start in set_up() before READY; still poll status.
  for (int i = 0; i < 100; ++i) {
    if (ctl(node, {"status"}).exit_code == 0) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  throw std::runtime_error("dauthd " + node + " does not answer status");
}

void Deployment::stop(const std::string& node, int signal_number) {
  auto& process = processes_[node];
  if (!process) return;
  process->signal(signal_number);
  exits_[node] = process->wait();
  std::ofstream(log(node), std::ios::app) << read_text_file(dir_ / (node + ".run.log"));
  process.reset();
}

std::optional<int> Deployment::last_exit(const std::string& node) const {
  const auto it = exits_.find(node);
  return it == exits_.end() ? std::nullopt : it->second;
}

bool Deployment::running(const std::string& node) const {
  const auto it = processes_.find(node);
  return it != processes_.end() && it->second != nullptr;
}

void Deployment::start_valve() {
  valve_ = std::make_unique<DaemonProcess>(
      std::vector<std::string>{"/usr/bin/env", "coap-server-notls", "-A", "127.0.0.1", "-p",
                               std::to_string(ports_.at("VALVE_PORT"))},
      std::vector<std::string>{}, dir_ / "valve.log");
  // Ready when it answers a direct GET.
  for (int i = 0; i < 100; ++i) {
    if (direct("get", "time").output.find("4.") == std::string::npos &&
        !direct("get", "time").output.empty()) {
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  throw std::runtime_error("coap-server-notls did not answer");
}

void Deployment::start_ae_server(const std::string& name, std::uint16_t port) {
  ae_servers_[name] = std::make_unique<DaemonProcess>(
      std::vector<std::string>{"/usr/bin/env", "coap-server-notls", "-A", "127.0.0.1", "-p", std::to_string(port)},
      std::vector<std::string>{}, dir_ / (name + ".log"));
  const std::string uri = "coap://127.0.0.1:" + std::to_string(port) + "/time";
  for (int i = 0; i < 100; ++i) {
    const auto answer = run_command({"coap-client-notls", "-B", "5", uri});
    if (answer.exit_code == 0 && !answer.output.empty() && answer.output.find("4.") == std::string::npos) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  throw std::runtime_error("coap-server-notls " + name + " did not answer");
}

void Deployment::set_environment(const std::string& node, std::vector<std::string> environment) {
  environments_[node] = std::move(environment);
}

std::uint16_t Deployment::add_port(const std::string& name) {
  ports_[name] = free_loopback_port(PortUse::udp_and_tcp);  // for start_ae_server() too
  return ports_[name];
}

void Deployment::edit_config(const std::string& node, const std::function<std::string(std::string)>& edit) {
  const auto file = dir_ / (std::string(kConfigOf(node)) + ".toml");
  write_file(file, edit(read_text_file(file)), 0600);
}

CommandResult Deployment::ctl(const std::string& node, std::vector<std::string> args) const {
  std::vector<std::string> argv = {DAUTHCTL_PATH, "-s", (dir_ / node / "control").string()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv);
}

nlohmann::json Deployment::ctl_json(const std::string& node, std::vector<std::string> args) const {
  args.insert(args.begin(), "--json");
  const auto result = ctl(node, args);
  if (result.exit_code != 0) throw std::runtime_error("dauthctl " + node + " failed: " + result.output);
  return nlohmann::json::parse(result.output);
}

nlohmann::json Deployment::verb(const std::string& node, const std::string& name, const nlohmann::json& args) const {
  const auto reply = control_exchange(dir_ / node / "control", nlohmann::json{{"verb", name}, {"args", args}}.dump() + "\n");
  const auto parsed = nlohmann::json::parse(reply, nullptr, false);
  if (parsed.is_discarded() || !parsed.value("ok", false)) {
    throw std::runtime_error("control verb " + name + " on " + node + " failed: " + reply);
  }
  return parsed["result"];
}

bool Deployment::wait_enrolled(const std::string& node, const std::string& ae_id, int limit_seconds) const {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(limit_seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    const auto reply = control_exchange(dir_ / node / "control",
                                        R"({"verb":"enrol.status","args":{"ae_id":")" + ae_id + "\"}}\n");
    const auto parsed = nlohmann::json::parse(reply, nullptr, false);
    if (!parsed.is_discarded() && parsed.value("ok", false) &&
        parsed["result"].value("state", "") == "enrolled") {
      return true;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return false;
}

CommandResult Deployment::proxied(const std::string& originator, const std::string& method, const std::string& path,
                                  const std::string& payload) const {
  return proxied_to(originator, "CAE-valve", method, path, payload);
}

CommandResult Deployment::proxied_to(const std::string& originator, const std::string& target,
                                     const std::string& method, const std::string& path,
                                     const std::string& payload) const {
  std::vector<std::string> argv = {"coap-client-notls", "-v", "6", "-B", "20", "-m", method, "-P",
                                   "coap://127.0.0.1:" + std::to_string(ports_.at("A_LOCAL")), "-O",
                                   "279," + originator};
  if (!payload.empty()) {
    argv.push_back("-e");
    argv.push_back(payload);
  }
  argv.push_back("coap://" + target + "/" + path);
  return run_command(argv);
}

CommandResult Deployment::direct(const std::string& method, const std::string& path, const std::string& payload) const {
  std::vector<std::string> argv = {"coap-client-notls", "-B", "5", "-m", method};
  if (!payload.empty()) {
    argv.push_back("-e");
    argv.push_back(payload);
  }
  argv.push_back("coap://127.0.0.1:" + std::to_string(ports_.at("VALVE_PORT")) + "/" + path);
  return run_command(argv);
}

std::string Deployment::master_key_hex(const std::string& node) const {
  auto text = read_text_file(dir_ / node / "master.key");
  while (!text.empty() && text.back() == '\n') text.pop_back();
  return text;
}

std::vector<std::string> Deployment::key_files_hex() const {
  std::vector<std::string> keys;
  for (const char* name : {"meter", "intruder"}) {
    auto text = read_text_file(dir_ / "keys" / (std::string(name) + ".kpm"));
    while (!text.empty() && text.back() == '\n') text.pop_back();
    keys.push_back(text);
  }
  for (const char* node : {"mef", "a", "b"}) keys.push_back(master_key_hex(node));
  return keys;
}

void Deployment::insert_config_line(const std::string& node, const std::string& after, const std::string& line) {
  const auto path = dir_ / (std::string(kConfigOf(node)) + ".toml");
  std::istringstream in(read_text_file(path));
  std::string text;
  bool inserted = false;
  for (std::string current; std::getline(in, current);) {
    text += current + "\n";
    if (!inserted && current == after) {
      text += line + "\n";
      inserted = true;
    }
  }
  if (!inserted) throw std::runtime_error(path.string() + ": no line " + after);
  write_file(path, text, 0600);
}

void Deployment::signal(const std::string& node, int signal_number) const {
  const auto it = processes_.find(node);
  if (it != processes_.end() && it->second) it->second->signal(signal_number);
}

std::optional<int> Deployment::wait_exit(const std::string& node, std::chrono::seconds limit) {
  auto& process = processes_[node];
  if (!process) return exits_[node];
  const auto status = process->wait(limit);
  if (!status) return std::nullopt;
  exits_[node] = status;
  std::ofstream(log(node), std::ios::app) << read_text_file(dir_ / (node + ".run.log"));
  process.reset();
  return status;
}

std::string Deployment::run_log(const std::string& node) const {
  const auto path = dir_ / (node + ".run.log");
  return std::filesystem::exists(path) ? read_text_file(path) : std::string();
}

bool Deployment::wait_for_log(const std::string& node, const std::string& text, int limit_seconds) const {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(limit_seconds);
  while (std::chrono::steady_clock::now() < deadline) {
    if (run_log(node).find(text) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

std::string Deployment::all_logs() const {
  std::string text;
  for (const char* node : {"mef", "a", "b"}) {
    if (std::filesystem::exists(log(node))) text += read_text_file(log(node));
    const auto run_log = dir_ / (std::string(node) + ".run.log");
    if (std::filesystem::exists(run_log)) text += read_text_file(run_log);
  }
  return text;
}

void start_all(Deployment& d) {
  d.start("mef");
  d.start_valve();
  d.start("b");
  d.start("a");
  REQUIRE(d.wait_enrolled("b", "CAE-valve"));
  REQUIRE(d.wait_enrolled("a", "CAE-meter"));
}

std::string put_marker(const Deployment& d) {
  const auto marker = run_command({"openssl", "rand", "-hex", "8"}).output.substr(0, 16);
  const auto put = d.direct("put", "example_data", marker);
  REQUIRE(put.exit_code == 0);
  return marker;
}

std::string put_marker_at(std::uint16_t port) {
  const auto marker = run_command({"openssl", "rand", "-hex", "8"}).output.substr(0, 16);
  REQUIRE(run_command({"coap-client-notls", "-B", "5", "-m", "put", "-e", marker,
                       "coap://127.0.0.1:" + std::to_string(port) + "/example_data"})
              .exit_code == 0);
  return marker;
}

StoredTargetKey stored_target_key(const Deployment& d, const std::string& node, const std::string& enrolee_id,
                                  crypto::Suid suid, const std::string& target) {
  auto master = secret_from_hex(d.master_key_hex(node));
  REQUIRE(master.ok());
  auto store = crypto::KeyStore::open(d.state(node), std::move(master).value());
  REQUIRE(store.ok());
  StoredTargetKey found;
  store->for_each(crypto::RecordKind::enrolment_key, [&](const crypto::Record& record) {
    const auto& e = std::get<crypto::EnrolmentKeyRecord>(record);
    if (e.enrolee_id != enrolee_id) return;
    auto key = crypto::derive_usage_constrained_key(e.ke, suid, target);
    REQUIRE(key.ok());
    found.ke_id = e.ke_id;
    found.key = std::move(key).value();
    found.target = target;
  });
  REQUIRE_FALSE(found.ke_id.empty());
  return found;
}

Result<transport::Response> request_once(const transport::Peer& peer, const transport::ClientCredentials& credentials,
                                         const transport::Request& request) {
  auto node = transport::Node::create(transport::NodeConfig{});
  REQUIRE(node.ok());
  std::optional<Result<transport::Response>> reply;
  (*node)->request(peer, credentials, request,
                   [&](Result<transport::Response> r, const transport::Session*) { reply.emplace(std::move(r)); });
  (*node)->run_until([&] { return reply.has_value(); }, std::chrono::seconds(30));
  REQUIRE(reply.has_value());
  return std::move(*reply);
}

void start_with_certificate_peer_sessions(Deployment& d) {
  const std::string mef_ca = (d.dir() / "mef" / "ca.pem").string();
  d.edit_config("mef", [](std::string text) {
    return std::regex_replace(text, std::regex("enrolee_id = \"CAE-meter\"\n"),
                              "enrolee_id = \"CAE-meter\"\ncertificate_enrolment = true\n");
  });
  d.edit_config("a", [&](std::string text) {
    text = std::regex_replace(text, std::regex("kpm_file = \"([^\"]*)/meter.kpm\"\n"),
                              "kpm_file = \"$1/meter.kpm\"\ncertificate_enrolment = true\n");
    text = std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\ntrust_anchors = [\"" + mef_ca + "\"]\n");
    return std::regex_replace(text, std::regex("(ae_id = \"CAE-valve\"\naddress = \"[^\"]*\"\n)"),
                              "$1credential = \"certificate\"\n");
  });
  d.edit_config("b", [&](std::string text) {
    return std::regex_replace(text, std::regex("\\[peer\\]\n"), "[peer]\ntrust_anchors = [\"" + mef_ca + "\"]\n");
  });
  start_all(d);
  d.stop("b", SIGTERM);
  d.start("b");
  REQUIRE(d.wait_enrolled("b", "CAE-valve"));
}

}  // namespace dauth::test

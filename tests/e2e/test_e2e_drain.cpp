// SIGTERM drain (issue 5): real MEF and gateway dauthds (e2e_support's Deployment); the local AE "valve" behind
// gateway B is a plain-CoAP server run in this process (transport::Node on its own thread) that answers /fast at
// once, /slow after a delay, and /never not at all, so that a request can be held in flight while a gateway stops.
// Outcomes come from what the stock coap-client prints, dauthctl stats, the exit status and dauthd's log lines.
#include <signal.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <map>
#include <mutex>
#include <thread>

#include "dauth/transport/transport.hpp"
#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

using Clock = std::chrono::steady_clock;

class LocalAe {
 public:
  LocalAe(std::uint16_t port, std::chrono::milliseconds slow_delay) : slow_delay_(slow_delay) {
    transport::NodeConfig config;
    config.local_address = "127.0.0.1";
    config.local_port = port;
    auto node = transport::Node::create(std::move(config));
    if (!node) throw std::runtime_error("local AE node: " + node.error().message);
    node_ = std::move(node).value();
    for (const char* path : {"fast", "slow", "never"}) {
      node_->add_route(transport::Method::get, {path}, transport::Access::local,
                       [this, path](const transport::Session&, const transport::Request&,
                                    transport::Responder responder) { on_request(path, std::move(responder)); });
    }
    thread_ = std::thread([this] { run(); });
  }
  ~LocalAe() {
    stop_ = true;
    thread_.join();
  }

  int received(const std::string& path) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = received_.find(path);
    return it == received_.end() ? 0 : it->second;
  }
  bool wait_received(const std::string& path, int count) const {
    for (int i = 0; i < 600 && received(path) < count; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return received(path) >= count;
  }

 private:
  struct Held {
    Clock::time_point due;
    transport::Responder responder;
  };

  // Runs on thread_ (from process_ready()).
  void on_request(const std::string& path, transport::Responder responder) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++received_[path];
    }
    if (path == "fast") {
      responder.respond(transport::Response::with_text(205, "fast answer"));
    } else if (path == "slow") {
      held_.push_back({Clock::now() + slow_delay_, std::move(responder)});
    } else {
      held_.push_back({Clock::time_point::max(), std::move(responder)});  // never answered
    }
  }

  void run() {
    while (!stop_) {
      node_->run_until([this] { return stop_.load(); }, std::chrono::milliseconds(20));
      for (auto& held : held_) {
        if (held.due <= Clock::now() && !held.responder.answered()) {
          held.responder.respond(transport::Response::with_text(205, "slow answer"));
        }
      }
    }
  }

  std::chrono::milliseconds slow_delay_;
  std::unique_ptr<transport::Node> node_;
  std::vector<Held> held_;  // thread_ only; destroyed before node_
  std::thread thread_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mutex_;
  std::map<std::string, int> received_;
};

// coap-client-notls through gateway A in the background (the call returns at once); wait() collects it.
std::unique_ptr<DaemonProcess> proxied_in_background(const Deployment& d, const std::string& path,
                                                     const std::filesystem::path& output) {
  return std::make_unique<DaemonProcess>(
      std::vector<std::string>{"/usr/bin/env", "coap-client-notls", "-v", "6", "-B", "60", "-m", "get", "-P",
                               "coap://127.0.0.1:" + std::to_string(d.ports().at("A_LOCAL")), "-O", "279,CAE-meter",
                               "coap://CAE-valve/" + path},
      std::vector<std::string>{}, output);
}

std::int64_t stat_of(const Deployment& d, const std::string& node, const std::string& name) {
  return d.ctl_json(node, {"stats"}).value(name, std::int64_t{-1});
}

bool wait_stat(const Deployment& d, const std::string& node, const std::string& name, std::int64_t value) {
  for (int i = 0; i < 200; ++i) {
    if (stat_of(d, node, name) == value) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

void start_with_local_ae(Deployment& d) {
  d.start("mef");
  d.start("b");
  d.start("a");
  REQUIRE(d.wait_enrolled("b", "CAE-valve"));
  REQUIRE(d.wait_enrolled("a", "CAE-meter"));
  // The first use sets up the AE-pair session (B fetches the key from the MEF, A retries: PROTOCOL.md §4).
  const auto warm_up = d.proxied("CAE-meter", "get", "fast");
  INFO(warm_up.output);
  REQUIRE(warm_up.output.find("fast answer") != std::string::npos);
}

}  // namespace

TEST_CASE("SIGTERM: a request in flight still gets its answer, a new one gets 5.03, exit 0", "[e2e][drain]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  d.insert_config_line("b", "[daemon]", "shutdown_timeout = 60");
  LocalAe valve(d.ports().at("VALVE_PORT"), std::chrono::milliseconds(2000));
  start_with_local_ae(d);
  REQUIRE(stat_of(d, "a", "peer_client_sessions") == 1);

  const auto client_output = d.log("a").parent_path() / "slow-client.out";
  auto slow = proxied_in_background(d, "slow", client_output);
  REQUIRE(valve.wait_received("slow", 1));  // held by the AE: in flight on both gateways

  d.signal("b", SIGTERM);
  REQUIRE(d.wait_for_log("b", "stopping on SIGTERM"));
  const auto refused = d.proxied("CAE-meter", "get", "fast");
  INFO(refused.output);
  CHECK(refused.output.find("5.03") != std::string::npos);
  CHECK(refused.output.find("fast answer") == std::string::npos);
  CHECK(valve.received("fast") == 1);  // the warm-up only: B did not deliver it

  CHECK(slow->wait(std::chrono::seconds(60)) == std::optional<int>(0));
  const auto answer = read_text_file(client_output);
  INFO(answer);
  CHECK(answer.find("slow answer") != std::string::npos);

  // Drained long before the 60 s shutdown_timeout: B stops as soon as the held request was answered.
  CHECK(d.wait_exit("b", std::chrono::seconds(30)) == std::optional<int>(0));
  const auto b_log = read_text_file(d.log("b"));
  INFO(b_log);
  CHECK(b_log.find("drain complete") != std::string::npos);
  CHECK(b_log.find("abandoned") == std::string::npos);
  // B's teardown sent close_notify: A dropped its client session without waiting for a timeout.
  CHECK(wait_stat(d, "a", "peer_client_sessions", 0));
}

TEST_CASE("SIGTERM: a local AE that never answers is abandoned after shutdown_timeout, and a second SIGTERM exits at once",
          "[e2e][drain]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  d.insert_config_line("b", "[daemon]", "shutdown_timeout = 2");
  d.insert_config_line("a", "[daemon]", "shutdown_timeout = 120");
  LocalAe valve(d.ports().at("VALVE_PORT"), std::chrono::milliseconds(0));
  start_with_local_ae(d);

  auto never = proxied_in_background(d, "never", d.log("a").parent_path() / "never-client.out");
  REQUIRE(valve.wait_received("never", 1));

  // Gateway A: the proxied request waits for B, so A drains; a new local request gets 5.03 from A itself.
  d.signal("a", SIGTERM);
  REQUIRE(d.wait_for_log("a", "stopping on SIGTERM"));
  const auto refused = d.proxied("CAE-meter", "get", "fast");
  INFO(refused.output);
  CHECK(refused.output.find("5.03") != std::string::npos);
  CHECK(valve.received("fast") == 1);
  // A second SIGTERM ends the drain at once (well before A's 120 s shutdown_timeout).
  d.signal("a", SIGTERM);
  CHECK(d.wait_exit("a", std::chrono::seconds(30)) == std::optional<int>(0));
  const auto a_log = read_text_file(d.log("a"));
  INFO(a_log);
  CHECK(a_log.find("SIGTERM during the drain: exiting now") != std::string::npos);
  CHECK(a_log.find("abandoned: proxied request CAE-meter -> CAE-valve GET /never") != std::string::npos);

  // Gateway B: the delivery to the AE never completes; B gives up after its 2 s and still exits 0.
  d.signal("b", SIGTERM);
  CHECK(d.wait_exit("b", std::chrono::seconds(30)) == std::optional<int>(0));
  const auto b_log = read_text_file(d.log("b"));
  INFO(b_log);
  CHECK(b_log.find("daemon.shutdown_timeout (2 s) reached") != std::string::npos);
  CHECK(b_log.find("abandoned: delivery of CAE-meter's GET /never to local AE CAE-valve") != std::string::npos);
}

// Loopback-source mapping (issue 5, PROTOCOL.md §6): enrolee.ae.local_source makes requests from that address the AE's
// without oneM2M-FR, and binds the AE to it. Here in the drain test binary because it is H3's one e2e file.
TEST_CASE("local_source: a request from the mapped address is the AE's, other sources and other AEs get 4.03",
          "[e2e][local_source]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  d.insert_config_line("a", "id = \"CAE-meter\"", "local_source = \"127.0.0.2\"");

  // Two AEs may not share a source: dauthd --check-config names both places.
  const auto config_a = d.log("a").parent_path() / "gateway-a.toml";
  const auto clash = d.log("a").parent_path() / "clash.toml";
  std::string text = read_text_file(config_a);
  const std::string intruder = "id = \"CAE-intruder\"\n";
  text.replace(text.find(intruder), intruder.size(), intruder + "local_source = \"127.0.0.2\"\n");
  write_file(clash, text, 0600);
  const auto checked = run_command({DAUTHD_PATH, "--check-config", "--config", clash.string()});
  INFO(checked.output);
  CHECK(checked.exit_code != 0);
  CHECK(checked.output.find("enrolee.ae[1].local_source = \"127.0.0.2\": already enrolee.ae[0].local_source (" +
                            clash.string() + ":") != std::string::npos);

  start_all(d);
  REQUIRE(d.wait_enrolled("a", "CAE-intruder"));
  const auto marker = put_marker(d);

  const auto get_from = [&](const std::string& source, const std::string& originator) {
    std::vector<std::string> argv = {"coap-client-notls", "-v", "6", "-B", "20", "-a", source, "-m", "get", "-P",
                                     "coap://127.0.0.1:" + std::to_string(d.ports().at("A_LOCAL"))};
    if (!originator.empty()) {
      argv.push_back("-O");
      argv.push_back("279," + originator);
    }
    argv.push_back("coap://CAE-valve/example_data");
    return run_command(argv);
  };

  const auto mapped = get_from("127.0.0.2", "");  // the stock client as is: no oneM2M option at all
  INFO(mapped.output);
  CHECK(mapped.exit_code == 0);
  CHECK(mapped.output.find(marker) != std::string::npos);
  const auto mapped_named = get_from("127.0.0.2", "CAE-meter");
  INFO(mapped_named.output);
  CHECK(mapped_named.output.find(marker) != std::string::npos);

  const auto refused_total = d.ctl_json("a", {"stats"}).value("proxy_rejected_total", 0);
  for (const auto& [source, originator] : std::vector<std::pair<std::string, std::string>>{
           {"127.0.0.2", "CAE-intruder"},  // the mapped source speaking as another AE
           {"127.0.0.1", ""},              // no oneM2M-FR from an unmapped source
           {"127.0.0.1", "CAE-meter"},     // meter's oneM2M-FR from outside its source
       }) {
    const auto refused = get_from(source, originator);
    INFO(source + " " + originator + ": " + refused.output);
    CHECK(refused.output.find("4.03") != std::string::npos);
    CHECK(refused.output.find(marker) == std::string::npos);
  }
  // Refused by A itself (not by B's policy): A's rejection counter saw all three.
  CHECK(d.ctl_json("a", {"stats"}).value("proxy_rejected_total", 0) == refused_total + 3);

  // local_source applies on reload (issue 15: it used to say "reloaded" and keep mapping the old source).
  d.edit_config("a", [](std::string config) {
    const std::string old_source = "local_source = \"127.0.0.2\"";
    return config.replace(config.find(old_source), old_source.size(), "local_source = \"127.0.0.3\"");
  });
  const auto reloaded = d.verb("a", "reload", nlohmann::json::object());
  CHECK(reloaded["last_reload"]["applied"] == nlohmann::json::array({"enrolee.ae.local_source (CAE-meter)"}));
  CHECK(reloaded["restart_pending"] == nlohmann::json::array());
  const auto moved = get_from("127.0.0.3", "");
  INFO(moved.output);
  CHECK(moved.output.find(marker) != std::string::npos);
  const auto old_source = get_from("127.0.0.2", "");
  INFO(old_source.output);
  CHECK(old_source.output.find("4.03") != std::string::npos);
  CHECK(old_source.output.find(marker) == std::string::npos);
}

// The relay path (docs/relay.md) with real dauthds: relay R ([relay] enable, allow B, [[peer.hop_client]] for
// gateway A, [[peer.hop]] to B) and gateway B ([[peer.hop_client]] for R). The test plays gateway A: a transport
// Node presenting A's hop identity to R, sending outer ESPrim messages with a coaps:// Proxy-Uri naming B.
#include <sys/socket.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "daemon_process.hpp"
#include "dauth/secret.hpp"
#include "dauth/transport/address.hpp"
#include "dauth/unique_fd.hpp"
#include "dauth/transport/transport.hpp"
#include "loopback_ports.hpp"
#include "support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

const std::string kMarker = "marker-relay-5d0b9e-never-in-r-log";

std::string random_hex32() {
  const auto result = run_command({"openssl", "rand", "-hex", "32"});
  if (result.exit_code != 0) throw std::runtime_error("openssl rand failed: " + result.output);
  return result.output;
}

class RelayWorld {
 public:
  RelayWorld() {
    for (const char* name : {"R_PEER", "B_PEER", "OTHER_PEER", "SILENT"}) ports_[name] = free_loopback_port();
    for (const char* sub : {"keys", "r", "r/state", "b", "b/state", "a", "a/state"}) {
      std::filesystem::create_directory(dir_ / sub);
      std::filesystem::permissions(dir_ / sub, std::filesystem::perms::owner_all,
                                   std::filesystem::perm_options::replace);
    }
    a_to_r_hex_ = random_hex32();
    write_file(dir_ / "keys" / "a-r.key", a_to_r_hex_, 0600);
    write_file(dir_ / "keys" / "r-b.key", random_hex32(), 0600);
    write_file(dir_ / "keys" / "r-other.key", random_hex32(), 0600);
    for (const char* node : {"r", "b", "a"}) write_file(dir_ / node / "master.key", random_hex32(), 0600);
    const std::string d = dir_.path().string();
    write_r_config("[\"127.0.0.1:" + port("B_PEER") + "\"]", "");
    write_file(dir_ / "b.toml",
               daemon_section("b") + "[peer]\nlisten = \"127.0.0.1:" + port("B_PEER") +
                   "\"\n"
                   "[[peer.hop_client]]\nidentity = \"relay-r\"\nkey_file = \"" + d + "/keys/r-b.key\"\n",
               0600);
    start("b");
    start("r");
    auto node = transport::Node::create(transport::NodeConfig{});
    if (!node) throw std::runtime_error("client node: " + node.error().message);
    client_ = std::move(node).value();
  }
  ~RelayWorld() {
    for (auto& [name, process] : processes_) {
      process->signal(SIGTERM);
      process->wait(std::chrono::seconds(10));
    }
  }

  std::string port(const std::string& name) const { return std::to_string(ports_.at(name)); }

  // R's configuration with relay.allow = `allow` (TOML array text) and `extra` rows appended.
  void write_r_config(const std::string& allow, const std::string& extra) {
    const std::string d = dir_.path().string();
    write_file(dir_ / "r.toml",
               daemon_section("r") + "[peer]\nlisten = \"127.0.0.1:" + port("R_PEER") +
                   "\"\n"
                   "[[peer.hop_client]]\nidentity = \"gateway-a\"\nkey_file = \"" + d + "/keys/a-r.key\"\n"
                   "[[peer.hop]]\nname = \"gateway-b\"\naddress = \"127.0.0.1:" + port("B_PEER") +
                   "\"\nidentity = \"relay-r\"\nkey_file = \"" + d + "/keys/r-b.key\"\n"
                   "[[peer.hop]]\nname = \"other\"\naddress = \"127.0.0.1:" + port("OTHER_PEER") +
                   "\"\nidentity = \"relay-r\"\nkey_file = \"" + d + "/keys/r-other.key\"\n" + extra +
                   "[relay]\nenable = true\nallow = " + allow + "\n",
               0600);
  }
  void write_key(const std::string& name, const std::string& hex) { write_file(dir_ / "keys" / name, hex, 0600); }
  std::string key_path(const std::string& name) const { return (dir_ / "keys" / name).string(); }
  // dauthctl reload (answers once the reload was applied or refused).
  CommandResult reload(const std::string& node) const {
    return run_command({DAUTHCTL_PATH, "-s", (dir_ / node / "control").string(), "reload"});
  }
  // Gateway A: a hop to R and B's address with via (its outer messages go through R); started by start("a").
  void write_a_config(const std::string& via) {
    const std::string d = dir_.path().string();
    write_file(dir_ / "a.toml",
               daemon_section("a") + "[peer]\nlisten = \"127.0.0.1:" + std::to_string(free_loopback_port()) +
                   "\"\n[[peer.hop]]\nname = \"relay-r\"\naddress = \"127.0.0.1:" + port("R_PEER") +
                   "\"\nidentity = \"gateway-a\"\nkey_file = \"" + d + "/keys/a-r.key\"\n"
                   "[[peer.address]]\nae_id = \"CAE-b\"\naddress = \"127.0.0.1:" + port("B_PEER") +
                   "\"\nesprim = \"required\"\nvia = \"" + via + "\"\n",
               0600);
  }
  std::filesystem::path config_of(const std::string& node) const { return dir_ / (node + ".toml"); }
  void start(const std::string& node) {
    processes_[node] = std::make_unique<DaemonProcess>(
        std::vector<std::string>{DAUTHD_PATH, "--config", (dir_ / (node + ".toml")).string()},
        std::vector<std::string>{}, dir_ / (node + ".log"));
    if (!wait_for_control_socket(dir_ / node / "control")) {
      throw std::runtime_error("dauthd " + node + " did not start: " + read_text_file(dir_ / (node + ".log")));
    }
    // The roles (the peer endpoint) are up once `status` answers.
    for (int i = 0; i < 100; ++i) {
      if (run_command({DAUTHCTL_PATH, "-s", (dir_ / node / "control").string(), "status"}).exit_code == 0) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    throw std::runtime_error("dauthd " + node + " does not answer status: " + read_text_file(dir_ / (node + ".log")));
  }

  std::string log_of(const std::string& node) const { return read_text_file(dir_ / (node + ".log")); }

  // Sends `request` to R as gateway A without waiting; `done` gets the outcome while run_client() runs.
  void send_to_r_async(Request request, std::function<void(Result<Response>)> done) {
    auto key = secret_from_hex(a_to_r_hex_.substr(0, 64));
    REQUIRE(key.ok());
    client_->request(transport::Peer{"127.0.0.1", ports_.at("R_PEER")},
                     transport::ClientCredentials::psk("gateway-a", std::move(key).value(), ""), std::move(request),
                     [done](Result<Response> result, const transport::Session*) { done(std::move(result)); });
  }
  bool run_client(const std::function<bool()>& until) { return client_->run_until(until, std::chrono::seconds(60)); }

  // Sends `request` to R as gateway A (its hop identity, with `key_hex` as key) and waits for the outcome.
  Result<Response> send_to_r(Request request, const std::string& key_hex, const std::string& identity = "gateway-a") {
    std::optional<Result<Response>> outcome;
    auto key = secret_from_hex(key_hex.substr(0, 64));
    REQUIRE(key.ok());
    client_->request(transport::Peer{"127.0.0.1", ports_.at("R_PEER")},
                     transport::ClientCredentials::psk(identity, std::move(key).value(), ""), std::move(request),
                     [&](Result<Response> result, const transport::Session*) { outcome = std::move(result); });
    REQUIRE(client_->run_until([&] { return outcome.has_value(); }, std::chrono::seconds(60)));
    return std::move(*outcome);
  }
  Result<Response> send_to_r(Request request) { return send_to_r(std::move(request), a_to_r_hex_); }

  // The outer message of docs/PROTOCOL.md §7 for receiver CAE-b, to R with a Proxy-Uri naming `destination`.
  static Request outer_to(const std::string& destination) {
    Request request;
    request.method = Method::post;
    request.proxy_uri = "coaps://" + destination + "/esprim?to=CAE-b";
    request.content_format = transport::kContentFormatJson;
    const std::string body = R"({"m2m:seci":{"sit":5,"epo":")" + kMarker + R"("}})";
    request.payload.assign(body.begin(), body.end());
    return request;
  }

  std::uint64_t counter(const std::string& node, const std::string& name) const {
    const auto result =
        run_command({DAUTHCTL_PATH, "-s", (dir_ / node / "control").string(), "--json", "stats"});
    INFO(result.output);
    REQUIRE(result.exit_code == 0);
    const auto stats = nlohmann::json::parse(result.output);
    for (const auto& family : stats.at("metrics")) {
      if (family.at("name") == name) return family.at("samples").at(0).at("value").get<std::uint64_t>();
    }
    FAIL("no metric " << name);
    return 0;
  }

  bool wait_for_log(const std::string& node, const std::string& text) const {
    for (int i = 0; i < 100; ++i) {
      if (log_of(node).find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }

  std::string a_to_r_hex_;

 private:
  std::string daemon_section(const std::string& node) const {
    const std::string d = dir_.path().string();
    return "[daemon]\nstate_directory = \"" + d + "/" + node + "/state\"\ncontrol_socket = \"" + d + "/" + node +
           "/control\"\nmaster_key_source = \"file\"\nmaster_key_file = \"" + d + "/" + node +
           "/master.key\"\nlog_level = \"debug\"\n";
  }

  TempDir dir_;
  std::map<std::string, std::uint16_t> ports_;
  std::map<std::string, std::unique_ptr<DaemonProcess>> processes_;
  std::unique_ptr<transport::Node> client_;
};

std::string text_of(const Bytes& bytes) { return std::string(bytes.begin(), bytes.end()); }

}  // namespace

TEST_CASE("relay path: an outer ESPrim message through relay R reaches gateway B and R never sees its content") {
  if (!have_program("openssl")) {
    WARN("openssl not installed; skipped");
    return;
  }
  RelayWorld world;
  auto answer = world.send_to_r(RelayWorld::outer_to("127.0.0.1:" + world.port("B_PEER")));
  INFO(world.log_of("r") + "\n---- b ----\n" + world.log_of("b"));
  REQUIRE(answer.ok());
  // B answered (its /esprim handler, or its refusal of a hop session before one exists): not a relay failure.
  CHECK(answer->code != 502);
  CHECK(answer->code != 503);
  CHECK(answer->code != 504);
  CHECK(answer->code != 505);
  // It arrived at B over R's hop identity...
  CHECK(world.wait_for_log("b", "outer ESPrim message from hop relay-r"));
  CHECK(world.counter("r", "dauth_relay_forwarded_total") == 1);
  CHECK(world.counter("r", "dauth_relay_refused_total") == 0);
  // ...and R, at debug level, logged nothing of the payload.
  CHECK(world.log_of("r").find(kMarker) == std::string::npos);
}

TEST_CASE("relay path: R refuses a destination not in relay.allow and a message other than POST /esprim") {
  if (!have_program("openssl")) {
    WARN("openssl not installed; skipped");
    return;
  }
  RelayWorld world;
  // A destination R has a hop for, but does not allow.
  auto other = world.send_to_r(RelayWorld::outer_to("127.0.0.1:" + world.port("OTHER_PEER")));
  REQUIRE(other.ok());
  CHECK(other->code == 403);
  CHECK(other->content_format == transport::kContentFormatJson);
  CHECK(text_of(other->payload).find("not in relay.allow") != std::string::npos);
  // A GET to an allowed destination: a relay carries outer ESPrim messages only.
  Request get = RelayWorld::outer_to("127.0.0.1:" + world.port("B_PEER"));
  get.method = Method::get;
  get.payload.clear();
  auto refused = world.send_to_r(get);
  REQUIRE(refused.ok());
  CHECK(refused->code == 403);
  CHECK(text_of(refused->payload).find("only outer ESPrim messages") != std::string::npos);
  // Another scheme: 5.05 (RFC 7252 §5.7.2).
  Request plain = RelayWorld::outer_to("127.0.0.1:" + world.port("B_PEER"));
  plain.proxy_uri = "coap://127.0.0.1:" + world.port("B_PEER") + "/esprim?to=CAE-b";
  auto unsupported = world.send_to_r(plain);
  REQUIRE(unsupported.ok());
  CHECK(unsupported->code == 505);
  CHECK(world.counter("r", "dauth_relay_refused_total") == 3);
  CHECK(world.counter("r", "dauth_relay_forwarded_total") == 0);
  CHECK(world.log_of("b").find("outer ESPrim message from hop") == std::string::npos);
}

TEST_CASE("relay path: a hop session may carry only outer ESPrim messages and a wrong hop key gets no session") {
  if (!have_program("openssl")) {
    WARN("openssl not installed; skipped");
    return;
  }
  RelayWorld world;
  Request get;
  get.method = Method::get;
  get.path = {"status"};
  auto refused = world.send_to_r(get);
  REQUIRE(refused.ok());
  CHECK(refused->code == 403);
  CHECK(text_of(refused->payload).find("authenticates no AE") != std::string::npos);
  INFO(world.log_of("r"));
  CHECK(world.wait_for_log("r", "hop identity 'gateway-a' authenticates no AE"));
  CHECK(world.counter("r", "dauth_relay_refused_total") == 1);

  // The right identity with another key: DTLS never completes (no alert with a wrong PSK), nothing is relayed.
  const std::string wrong = random_hex32();
  auto outcome = world.send_to_r(RelayWorld::outer_to("127.0.0.1:" + world.port("B_PEER")), wrong);
  CHECK_FALSE(outcome.ok());
  CHECK(world.counter("r", "dauth_relay_forwarded_total") == 0);
  CHECK(world.log_of("b").find("outer ESPrim message from hop") == std::string::npos);
}

TEST_CASE("relay path: a reload replaces relay.allow and the hop-client table, keys read again") {
  if (!have_program("openssl")) {
    WARN("openssl not installed; skipped");
    return;
  }
  RelayWorld world;
  const std::string to_b = "127.0.0.1:" + world.port("B_PEER");
  // A hop identity R does not know yet: no session.
  const std::string c_key = random_hex32();
  world.write_key("c-r.key", c_key);
  CHECK_FALSE(world.send_to_r(RelayWorld::outer_to(to_b), c_key, "gateway-c").ok());
  // Reload: gateway-c added, B no longer allowed.
  world.write_r_config("[]", "[[peer.hop_client]]\nidentity = \"gateway-c\"\nkey_file = \"" +
                                 world.key_path("c-r.key") + "\"\n");
  const auto reloaded = world.reload("r");
  INFO(reloaded.output + world.log_of("r"));
  REQUIRE(reloaded.exit_code == 0);
  auto refused = world.send_to_r(RelayWorld::outer_to(to_b), c_key, "gateway-c");
  REQUIRE(refused.ok());
  CHECK(refused->code == 403);
  CHECK(text_of(refused->payload).find("not in relay.allow") != std::string::npos);
  // B allowed again: gateway-c's message goes through.
  world.write_r_config("[\"" + to_b + "\"]", "[[peer.hop_client]]\nidentity = \"gateway-c\"\nkey_file = \"" +
                                              world.key_path("c-r.key") + "\"\n");
  REQUIRE(world.reload("r").exit_code == 0);
  auto through = world.send_to_r(RelayWorld::outer_to(to_b), c_key, "gateway-c");
  REQUIRE(through.ok());
  CHECK(through->code != 502);
  CHECK(world.counter("r", "dauth_relay_forwarded_total") == 1);
  CHECK(world.wait_for_log("b", "outer ESPrim message from hop relay-r"));
}

TEST_CASE("relay path: beyond 256 unanswered relayed messages R answers 5.03 at once") {
  if (!have_program("openssl")) {
    WARN("openssl not installed; skipped");
    return;
  }
  RelayWorld world;
  // A next hop that swallows every datagram: R's handshake with it never completes, so relayed messages stay
  // unanswered (until R's request timeout).
  const std::string silent = "127.0.0.1:" + world.port("SILENT");
  dauth::UniqueFd swallow(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  REQUIRE(swallow.get() >= 0);
  auto address = transport::numeric_address("127.0.0.1", static_cast<std::uint16_t>(std::stoi(world.port("SILENT"))));
  REQUIRE(address.ok());
  REQUIRE(::bind(swallow.get(), &address->get(), address->length) == 0);
  world.write_r_config("[\"" + silent + "\"]", "[[peer.hop]]\nname = \"silent\"\naddress = \"" + silent +
                                                   "\"\nidentity = \"relay-r\"\nkey_file = \"" +
                                                   world.key_path("r-other.key") + "\"\n");
  REQUIRE(world.reload("r").exit_code == 0);
  constexpr int kSent = 300;
  int limited = 0;
  int other = 0;
  for (int i = 0; i < kSent; ++i) {
    world.send_to_r_async(RelayWorld::outer_to(silent), [&](Result<Response> outcome) {
      if (outcome.ok() && outcome->code == 503) {
        ++limited;
      } else {
        ++other;
      }
    });
  }
  // The first 256 wait for the silent hop; each later one is refused as it arrives.
  REQUIRE(world.run_client([&] { return limited == kSent - 256; }));
  CHECK(other == 0);
  CHECK(world.counter("r", "dauth_relay_refused_total") == static_cast<std::uint64_t>(kSent - 256));
  CHECK(world.wait_for_log("r", "relayed requests are still unanswered (at most 256)"));
}

TEST_CASE("relay path: gateway A starts with a hop and via, and --check-config shows hop keys only as fingerprints") {
  if (!have_program("openssl")) {
    WARN("openssl not installed; skipped");
    return;
  }
  RelayWorld world;
  world.write_a_config("nowhere");
  const auto refused = run_command({DAUTHD_PATH, "--check-config", "-c", world.config_of("a").string()});
  CHECK(refused.exit_code != 0);
  CHECK(refused.output.find("peer.address[0].via = \"nowhere\": names no [[peer.hop]]") != std::string::npos);
  world.write_a_config("relay-r");
  const auto checked = run_command({DAUTHD_PATH, "--check-config", "-c", world.config_of("a").string()});
  INFO(checked.output);
  CHECK(checked.exit_code == 0);
  CHECK(checked.output.find("a-r.key\"  # key (hidden): 32 bytes, fingerprint ") != std::string::npos);
  CHECK(checked.output.find(world.a_to_r_hex_.substr(0, 64)) == std::string::npos);
  world.start("a");
  CHECK(world.log_of("a").find("roles peer") != std::string::npos);
}

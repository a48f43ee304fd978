// Roles::Impl::send_outer (daemon/src/relay.cpp, docs/relay.md), the way gateway A sends an outer ESPrim message to
// a peer whose [[peer.address]] has `via`: to the hop's address with the hop's PSK identity and key, the peer's
// configured address in a coaps:// Proxy-Uri, no oneM2M options. The hops are real: our own Node recording what
// arrives, and libcoap's stock coap-server-gnutls -P forwarding to a Node that plays gateway B.
#include <catch2/catch.hpp>

#include "../rspf/child_process.hpp"
#include "dauth/daemon/event_loop.hpp"
#include "loopback_ports.hpp"
#include "roles_impl.hpp"
#include "support.hpp"

using namespace dauth;
using namespace dauth::daemon;
using namespace dauth::test;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

const std::string kHopKey = "hop-key-of-exactly-32-bytes-0001";  // also the stock proxy's -k text

SecretBuffer key_of(const std::string& text) {
  return SecretBuffer::copy_of(ByteView(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()));
}

// A Roles::Impl with only what send_outer uses: the loop, the peer node (client only) and a second node serving
// `server_config` (the hop or gateway B), both driven by the loop; one peer AE "target" whose address text is
// `peer_address` and whose via is "hop" at `hop_port`.
struct OuterWorld {
  explicit OuterWorld(transport::NodeConfig server_config) {
    auto created_loop = EventLoop::create();
    REQUIRE(created_loop.ok());
    loop = std::move(created_loop).value();
    impl = std::make_unique<Roles::Impl>(*loop);
    add_driver("peer", transport::NodeConfig{});
    impl->peer_driver = impl->drivers.back().get();
    add_driver("server", std::move(server_config));
    server = impl->drivers.back()->node.get();
  }
  ~OuterWorld() { impl.reset(); }

  void add_driver(const std::string& name, transport::NodeConfig config) {
    auto node = transport::Node::create(std::move(config));
    REQUIRE(node.ok());
    auto driver = std::make_unique<NodeDriver>();
    driver->name = name;
    driver->node = std::move(node).value();
    impl->drivers.push_back(std::move(driver));
    REQUIRE(impl->drive(*impl->drivers.back()).ok());
  }

  void configure(const std::string& target, const std::string& peer_address, std::uint16_t hop_port) {
    impl->config.peer = PeerSettings{};
    impl->config.peer->addresses.push_back(PeerAddress{target, peer_address, "psk", "hop"});
    PeerState state;
    state.address_text = peer_address;
    state.address = transport::Peer{"127.0.0.1", 9};  // never used on the via path
    impl->peers[target] = state;
    HopState hop;
    hop.name = "hop";
    hop.address_text = "127.0.0.1:" + std::to_string(hop_port);
    hop.address = transport::Peer{"127.0.0.1", hop_port};
    hop.identity = "gateway-a";
    hop.key = std::make_shared<const SecretBuffer>(key_of(kHopKey));
    impl->hops["hop"] = std::move(hop);
  }

  // send_outer and run the loop until its answer (bounded).
  Result<Response> send(const std::string& target, Request outer) {
    std::optional<Result<Response>> outcome;
    auto guard = loop->add_timer(std::chrono::seconds(60), std::chrono::milliseconds(0), [this] { loop->stop(); });
    REQUIRE(guard.ok());
    impl->send_outer("CAE-a", target, std::move(outer), [&](Result<Response> result) {
      outcome = std::move(result);
      loop->stop();
    });
    if (!outcome) REQUIRE(loop->run().ok());
    REQUIRE(outcome.has_value());
    return std::move(*outcome);
  }

  std::unique_ptr<EventLoop> loop;
  std::unique_ptr<Roles::Impl> impl;
  transport::Node* server = nullptr;
};

Request outer_message(const std::string& target, const std::string& body) {
  Request outer;
  outer.method = Method::post;
  outer.path = {"esprim"};
  outer.query = {"to=" + target};
  outer.content_format = transport::kContentFormatJson;
  outer.payload.assign(body.begin(), body.end());
  // Whatever the caller set: an outer message carries no oneM2M options.
  outer.originator = "CAE-a";
  outer.request_id = "rqi-1";
  return outer;
}

transport::PskLookup one_identity(const std::string& identity) {
  return [identity](const transport::PskRequest& request) -> Result<transport::PskGrant> {
    if (request.identity != identity) return make_error(Errc::not_found, "unknown identity");
    return transport::PskGrant{key_of(kHopKey), "", ""};
  };
}

}  // namespace

TEST_CASE("send_outer via a hop: hop identity and key, the peer's address in a coaps Proxy-Uri, no oneM2M options") {
  transport::NodeConfig hop_config;
  hop_config.secure_addresses = {"127.0.0.1"};
  hop_config.secure_port = 0;
  hop_config.psk_lookup = one_identity("gateway-a");
  OuterWorld world(std::move(hop_config));
  Request seen;
  std::string seen_identity;
  world.server->add_route(Method::post, {}, transport::Access::secure,
                          [&](const transport::Session& session, const Request& request,
                              transport::Responder responder) {
                            seen = request;
                            seen_identity = session.peer().value;
                            Response answer;
                            answer.code = 205;
                            answer.content_format = transport::kContentFormatJson;
                            answer.payload = request.payload;
                            responder.respond(std::move(answer));
                          });
  // An SP-relative AE-ID: its '/' are percent-encoded in the query item.
  const std::string target = "/in-cse/CAE-b";
  world.configure(target, "gateway-b.example.net:5684", world.server->secure_port());
  const std::string body = R"({"m2m:seci":{"sit":3}})";
  auto answer = world.send(target, outer_message(target, body));
  REQUIRE(answer.ok());
  CHECK(answer->code == 205);
  CHECK(std::string(answer->payload.begin(), answer->payload.end()) == body);
  CHECK(seen_identity == "gateway-a");
  CHECK(seen.proxy_uri == "coaps://gateway-b.example.net:5684/esprim?to=%2Fin-cse%2FCAE-b");
  CHECK(seen.path.empty());
  CHECK(seen.query.empty());
  CHECK(seen.content_format == transport::kContentFormatJson);
  CHECK(seen.originator.empty());
  CHECK(seen.request_id.empty());
}

TEST_CASE("send_outer fails at once for a peer without [[peer.address]] or with a via naming no hop") {
  transport::NodeConfig no_server;
  OuterWorld world(std::move(no_server));
  world.configure("CAE-b", "127.0.0.1:5684", 9);
  auto unknown = world.send("CAE-unknown", outer_message("CAE-unknown", "{}"));
  REQUIRE_FALSE(unknown.ok());
  CHECK(unknown.error().code == Errc::not_found);
  world.impl->hops.clear();
  auto no_hop = world.send("CAE-b", outer_message("CAE-b", "{}"));
  REQUIRE_FALSE(no_hop.ok());
  CHECK(no_hop.error().code == Errc::not_found);
  CHECK(no_hop.error().message.find("via names no [[peer.hop]]") != std::string::npos);
}

TEST_CASE("send_outer via the stock coap-server-gnutls -P reaches gateway B's secure endpoint and back") {
  if (!have_program("coap-server-gnutls")) {
    WARN("coap-server-gnutls not installed (libcoap3-bin); the stock-proxy send_outer test is skipped");
    return;
  }
  // Gateway B: accepts the proxy's -u identity with the proxy's -k key (the hop_client row of docs/relay.md).
  transport::NodeConfig b_config;
  b_config.secure_addresses = {"127.0.0.1"};
  b_config.secure_port = 0;
  b_config.psk_lookup = one_identity("stock-proxy");
  OuterWorld world(std::move(b_config));
  Request seen;
  std::string seen_identity;
  world.server->add_route(Method::post, {"esprim"}, transport::Access::secure,
                          [&](const transport::Session& session, const Request& request,
                              transport::Responder responder) {
                            seen = request;
                            seen_identity = session.peer().value;
                            Response answer;
                            answer.code = 205;
                            answer.content_format = transport::kContentFormatJson;
                            const std::string text = R"({"m2m:seci":{"sit":4}})";
                            answer.payload.assign(text.begin(), text.end());
                            responder.respond(std::move(answer));
                          });
  const std::uint16_t base = free_loopback_ports(2);
  ChildProcess proxy({"coap-server-gnutls", "-A", "127.0.0.1", "-p", std::to_string(base), "-k", kHopKey, "-u",
                      "stock-proxy", "-P", ",proxy.invalid", "-v", "7"});
  for (;;) {  // ready once it says so (debug level 7)
    const auto line = proxy.read_line(std::chrono::seconds(10));
    INFO(proxy.output());
    REQUIRE(line.has_value());
    if (line->find("created DTLS endpoint") != std::string::npos) break;
  }
  // An SP-relative AE-ID: percent-encoded in the Proxy-Uri, decoded again by the proxy into the Uri-Query.
  const std::string target = "/in-cse/CAE-b";
  world.configure(target, "127.0.0.1:" + std::to_string(world.server->secure_port()),
                  static_cast<std::uint16_t>(base + 1));
  const std::string body = R"({"m2m:seci":{"sit":3}})";
  auto answer = world.send(target, outer_message(target, body));
  proxy.drain();
  INFO(proxy.output());
  REQUIRE(answer.ok());
  CHECK(answer->code == 205);
  CHECK(std::string(answer->payload.begin(), answer->payload.end()) == R"({"m2m:seci":{"sit":4}})");
  CHECK(seen_identity == "stock-proxy");
  CHECK(seen.path == std::vector<std::string>{"esprim"});
  CHECK(seen.query == std::vector<std::string>{"to=/in-cse/CAE-b"});
  CHECK(std::string(seen.payload.begin(), seen.payload.end()) == body);
  CHECK(seen.originator.empty());
}

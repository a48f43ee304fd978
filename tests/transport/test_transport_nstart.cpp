// Limits::nstart / plain_nstart (RFC 7252 §4.7 NSTART): how many confirmable messages one session has in flight.
// Not timed: a side that is not pumped never reads the ACKs that would free a slot, so what crossed the wire is
// exactly what NSTART let through, however long the other side waits.
#include <catch2/catch.hpp>

#include <optional>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

const std::map<std::string, std::string> kKeys{{"CAE-alpha", "alpha-secret-key-0123456789abcdef"}};

// A node whose GET /ping answers at once and whose GET /hold keeps every Responder (a separate response later).
struct HoldingServer {
  std::unique_ptr<transport::Node> node;
  std::vector<transport::Responder> held;

  HoldingServer(transport::Limits limits, bool plain) {
    transport::NodeConfig config;
    config.limits = limits;
    config.psk_lookup = psk_table(kKeys);
    config.local_address = "127.0.0.1";
    config.local_port = 0;
    node = make_server(std::move(config));
    const auto access = plain ? transport::Access::local : transport::Access::secure;
    node->add_route(Method::get, {"ping"}, access,
                    [](const transport::Session&, const Request&, transport::Responder responder) {
                      responder.respond(Response::with_text(205, "pong"));
                    });
    node->add_route(Method::get, {"hold"}, access,
                    [this](const transport::Session&, const Request&, transport::Responder responder) {
                      held.push_back(std::move(responder));
                    });
  }
  transport::Peer peer(bool plain) const {
    return {"127.0.0.1", plain ? node->local_port() : node->secure_port()};
  }
};

std::unique_ptr<transport::Node> make_client(std::uint16_t nstart) {
  transport::Limits limits;
  limits.nstart = nstart;
  limits.plain_nstart = nstart;
  return make_client_node(limits);
}

ClientCredentials credentials_for(bool plain) {
  return plain ? ClientCredentials::plain() : ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), "");
}

// How many of `count` requests sent at once on one (established) session reach a server that never answers,
// while the client is not pumped (so it never sees the server's empty ACKs).
std::size_t requests_on_the_wire(std::uint16_t client_nstart, bool plain, std::size_t count) {
  HoldingServer server({}, plain);
  auto client = make_client(client_nstart);
  const auto peer = server.peer(plain);
  int completed = 0;
  // Handshake (DTLS) and a first exchange: the session is established, no CON in flight.
  client->request(peer, credentials_for(plain), get_request({"ping"}),
                  [&](Result<Response>, const transport::Session*) { ++completed; });
  REQUIRE(pump({server.node.get(), client.get()}, [&] { return completed == 1; }));

  for (std::size_t i = 0; i < count; ++i) {
    client->request(peer, credentials_for(plain), get_request({"hold"}), [&](Result<Response> response,
                                                                           const transport::Session*) {
      CHECK(response.ok());
      ++completed;
    });
  }
  const std::size_t expected = std::min<std::size_t>(client_nstart, count);
  // Server only: what NSTART let through arrives (bounded wait for a slow machine), and waiting longer cannot let
  // more through: the rest sit in the client's queue.
  pump({server.node.get()}, [&] { return server.held.size() >= expected; });
  pump({server.node.get()}, [&] { return server.held.size() > expected; }, 200ms);
  const std::size_t seen = server.held.size();

  // Pumping both frees the queue: every request is delivered, none was lost, all get their answer.
  REQUIRE(pump({server.node.get(), client.get()}, [&] { return server.held.size() == count; }));
  for (auto& responder : server.held) responder.respond(Response::with_text(205, "later"));
  REQUIRE(pump({server.node.get(), client.get()}, [&] { return completed == static_cast<int>(count) + 1; }));
  return seen;
}

// How many of `count` separate responses the client receives while the server is not pumped any more after it
// sent them (so the server never sees the client's ACKs).
std::size_t separate_responses_on_the_wire(std::uint16_t server_nstart, bool plain, std::size_t count) {
  transport::Limits limits;
  limits.nstart = server_nstart;
  limits.plain_nstart = server_nstart;
  HoldingServer server(limits, plain);
  auto client = make_client(transport::kMaxNstart);
  const auto peer = server.peer(plain);
  std::size_t answered = 0;
  for (std::size_t i = 0; i < count; ++i) {
    client->request(peer, credentials_for(plain), get_request({"hold"}), [&](Result<Response> response,
                                                                           const transport::Session*) {
      CHECK(response.ok());
      ++answered;
    });
  }
  REQUIRE(pump({server.node.get(), client.get()}, [&] { return server.held.size() == count; }));
  for (auto& responder : server.held) responder.respond(Response::with_text(205, "later"));
  // One server round sends what NSTART allows (coap_async_trigger armed libcoap's timer: the round runs at once).
  pump({server.node.get()}, [] { return false; }, 100ms);
  const std::size_t expected = std::min<std::size_t>(server_nstart, count);
  pump({client.get()}, [&] { return answered >= expected; });
  pump({client.get()}, [&] { return answered > expected; }, 200ms);  // no more can come: the server is not pumped
  const std::size_t seen = answered;
  REQUIRE(pump({server.node.get(), client.get()}, [&] { return answered == count; }));
  return seen;
}

}  // namespace

TEST_CASE("NSTART: a DTLS client session has nstart requests in flight at once and queues the rest") {
  CHECK(requests_on_the_wire(1, /*plain=*/false, 6) == 1);  // RFC 7252 default
  CHECK(requests_on_the_wire(4, /*plain=*/false, 6) == 4);
  CHECK(requests_on_the_wire(8, /*plain=*/false, 6) == 6);
}

TEST_CASE("NSTART: plain_nstart applies to plain CoAP client sessions") {
  CHECK(requests_on_the_wire(1, /*plain=*/true, 5) == 1);
  CHECK(requests_on_the_wire(5, /*plain=*/true, 5) == 5);
}

TEST_CASE("NSTART: a server session sends nstart separate responses at once and queues the rest") {
  CHECK(separate_responses_on_the_wire(1, /*plain=*/false, 5) == 1);
  CHECK(separate_responses_on_the_wire(3, /*plain=*/false, 5) == 3);
  CHECK(separate_responses_on_the_wire(1, /*plain=*/true, 4) == 1);
  CHECK(separate_responses_on_the_wire(4, /*plain=*/true, 4) == 4);
}

TEST_CASE("NSTART: 0 and values above kMaxNstart are refused") {
  for (const std::uint16_t bad : {std::uint16_t{0}, std::uint16_t{transport::kMaxNstart + 1}}) {
    transport::NodeConfig config;
    config.limits.nstart = bad;
    auto node = transport::Node::create(std::move(config));
    REQUIRE_FALSE(node.ok());
    CHECK(node.error().code == Errc::invalid_argument);
    CHECK(node.error().message.find("nstart") != std::string::npos);
    transport::NodeConfig plain;
    plain.limits.plain_nstart = bad;
    CHECK_FALSE(transport::Node::create(std::move(plain)).ok());
  }
}

// Limits::silence_timeout: a DTLS client session on which a request heard nothing at all from the peer ends long
// before request_timeout (a peer that restarted, or our address changed on the way), and a slow peer that
// acknowledged the request keeps its session.
#include <catch2/catch.hpp>

#include <thread>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

const std::map<std::string, std::string> kKeys{{"CAE-alpha", "alpha-secret-key-0123456789abcdef"}};

std::unique_ptr<transport::Node> make_quick_client() {
  transport::NodeConfig config;
  config.limits.silence_timeout = std::chrono::milliseconds(600);
  config.limits.request_timeout = std::chrono::milliseconds(15000);
  auto node = transport::Node::create(std::move(config));
  REQUIRE(node.ok());
  return std::move(*node);
}

Request get(std::vector<std::string> path) {
  Request request;
  request.method = Method::get;
  request.path = std::move(path);
  return request;
}

// A PSK server (make_server) and a client with silence_timeout 600 ms, request_timeout 15 s.
struct Pair {
  std::unique_ptr<transport::Node> server = [] {
    transport::NodeConfig config;
    config.psk_lookup = psk_table(kKeys);
    return make_server(std::move(config));
  }();
  std::unique_ptr<transport::Node> client = make_quick_client();
  transport::Peer peer{"127.0.0.1", server->secure_port()};
  ClientCredentials credentials = ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), "");
};

struct Outcome {
  std::optional<Result<Response>> result;
  transport::ResponseHandler handler() {
    return [this](Result<Response> answer, const transport::Session*) { result.emplace(std::move(answer)); };
  }
};

}  // namespace

TEST_CASE("silence: a peer that stops answering ends the session after silence_timeout and the next request works") {
  Pair pair;
  auto& [server, client, peer, credentials] = pair;

  Outcome first;
  client->request(peer, credentials, get({"hello"}), first.handler());
  REQUIRE(pump({server.get(), client.get()}, [&] { return first.result.has_value(); }));
  REQUIRE(first.result->ok());

  // The server's loop stops (its datagrams wait unread): from the client's side the peer is silent.
  Outcome second;
  client->request(peer, credentials, get({"hello"}), second.handler());
  REQUIRE(pump({client.get()}, [&] { return second.result.has_value(); }, 10s));
  REQUIRE_FALSE(second.result->ok());
  CHECK(second.result->error().code == Errc::timeout);
  CHECK(second.result->error().message.find("nothing heard from") != std::string::npos);  // not request_timeout's
  REQUIRE(pump({client.get()}, [&] { return client->stats().live_client_sessions == 0; }, 2s));

  // The next request sets up a new session (the server answers what it reads now; the old session's records
  // are its business).
  const auto handshakes_before = server->stats().handshakes_completed;
  Outcome third;
  client->request(peer, credentials, get({"hello"}), third.handler());
  REQUIRE(pump({server.get(), client.get()}, [&] { return third.result.has_value(); }));
  REQUIRE(third.result->ok());
  CHECK(server->stats().handshakes_completed == handshakes_before + 1);
}

TEST_CASE("silence: a request sent while the handshake ran is watched from the end of the handshake") {
  Pair pair;
  auto& [server, client, peer, credentials] = pair;
  Outcome first;
  client->request(peer, credentials, get({"hello"}), first.handler());  // waits for the handshake it starts
  // Both loops run until the client's handshake is done (it sends the waiting request in that same round); from
  // then on the server reads nothing: the peer fell silent right after the handshake.
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (client->stats().handshakes_completed == 0 && std::chrono::steady_clock::now() < until) {
    server->process_ready();
    client->process_ready();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  REQUIRE(client->stats().handshakes_completed == 1);
  REQUIRE(pump({client.get()}, [&] { return first.result.has_value(); }, 10s));  // request_timeout is 15 s
  REQUIRE_FALSE(first.result->ok());
  CHECK(first.result->error().message.find("nothing heard from") != std::string::npos);
}

TEST_CASE("silence: a POST is not given up for silence (it waits for CoAP's retransmissions)") {
  Pair pair;
  auto& [server, client, peer, credentials] = pair;
  Outcome warm;
  client->request(peer, credentials, get({"hello"}), warm.handler());
  REQUIRE(pump({server.get(), client.get()}, [&] { return warm.result.has_value(); }));
  Outcome post;
  Request request = get({"hello"});
  request.method = Method::post;
  client->request(peer, credentials, std::move(request), post.handler());
  pump({client.get()}, [&] { return post.result.has_value(); }, 2s);  // the server is silent meanwhile
  CHECK_FALSE(post.result.has_value());  // far past silence_timeout (600 ms): still waiting
  CHECK(client->stats().live_client_sessions == 1);
}

TEST_CASE("silence: a peer that acknowledged the request and answers late keeps its session") {
  Pair pair;
  auto& [server, client, peer, credentials] = pair;
  transport::Node* server_node = server.get();
  server->add_route(Method::get, {"slow"}, transport::Access::secure,
                    [server_node](const transport::Session&, const Request&, transport::Responder responder) {
                      // A separate response: libcoap sends the empty ACK now, the answer 1.5 s later.
                      auto kept = std::make_shared<transport::Responder>(std::move(responder));
                      server_node->post_after(std::chrono::milliseconds(1500),
                                              [kept] { kept->respond(Response::with_text(205, "late")); });
                    });
  Outcome warm;
  client->request(peer, credentials, get({"hello"}), warm.handler());
  REQUIRE(pump({server.get(), client.get()}, [&] { return warm.result.has_value(); }));
  REQUIRE(warm.result->ok());

  const auto handshakes_before = server->stats().handshakes_completed;
  Outcome slow;
  client->request(peer, credentials, get({"slow"}), slow.handler());
  REQUIRE(pump({server.get(), client.get()}, [&] { return slow.result.has_value(); }, 10s));
  INFO((slow.result->ok() ? std::string("ok") : slow.result->error().to_string()));
  REQUIRE(slow.result->ok());
  CHECK(text_of((*slow.result)->payload) == "late");
  CHECK(server->stats().handshakes_completed == handshakes_before);  // the same session throughout
}

TEST_CASE("silence: a silence_timeout of 0 is refused, naming it") {
  transport::NodeConfig config;
  config.limits.silence_timeout = std::chrono::milliseconds(0);
  auto node = transport::Node::create(std::move(config));
  REQUIRE_FALSE(node.ok());
  CHECK(node.error().message.find("silence_timeout 0 ms: must be above 0") != std::string::npos);
}

// Observe (RFC 7641) on both sides, closing the server sessions of one identity, post_after(), and the
// Content-Format of responses as a stock client sees it on the wire.
#include <catch2/catch.hpp>

#include <thread>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Method;
using transport::Observation;
using transport::PeerKind;
using transport::Request;
using transport::Response;

namespace {

const std::map<std::string, std::string> kKeys{{"CAE-alpha", "alpha-secret-key-0123456789abcdef"},
                                               {"CAE-beta", "beta-secret-key-0123456789abcdef0"}};
ClientCredentials psk(const std::string& identity) {
  return ClientCredentials::psk(identity, secret(kKeys.at(identity)), "");
}

std::unique_ptr<transport::Node> make_client() {
  auto node = transport::Node::create(transport::NodeConfig{});
  REQUIRE(node.ok());
  return std::move(*node);
}

Request get(std::vector<std::string> path) {
  Request request;
  request.method = Method::get;
  request.path = std::move(path);
  return request;
}

// Every call of one observation's handler.
struct Notifications {
  std::vector<Result<Response>> calls;
  transport::NotificationHandler handler() {
    return [this](Result<Response> notification, const transport::Session*) {
      calls.push_back(std::move(notification));
    };
  }
  std::size_t live() const {  // notifications received while the subscription was live
    std::size_t count = 0;
    for (const auto& call : calls) count += (call.ok() && call->observe) ? 1 : 0;
    return count;
  }
  bool ended() const { return !calls.empty() && (!calls.back().ok() || !calls.back()->observe); }
  std::string last_text() const { return calls.back().ok() ? text_of(calls.back()->payload) : "<error>"; }
};

// A server whose observable GET /feed answers "<identity>:<version>" per subscriber, and refuses CAE-beta
// (4.03) once `refuse_beta` is set.
struct FeedServer {
  std::unique_ptr<transport::Node> node;
  int version = 0;
  bool refuse_beta = false;
  int handler_calls = 0;

  FeedServer() {
    transport::NodeConfig config;
    config.psk_lookup = psk_table(kKeys);
    node = make_server(std::move(config));
    auto added = node->add_observable(
        {"feed"}, transport::Access::secure,
        [this](const transport::Session& session, const Request&, transport::Responder responder) {
          ++handler_calls;
          if (refuse_beta && session.peer().value == "CAE-beta") {
            responder.respond(Response::with_text(403, "no longer a subscriber"));
            return;
          }
          responder.respond(Response::with_text(205, session.peer().value + ":" + std::to_string(version)));
        });
    REQUIRE(added.ok());
  }
  void change() {
    ++version;
    node->notify_observers({"feed"});
  }
};

}  // namespace

TEST_CASE("A response with a payload and no Content-Format carries no Content-Format option on the wire") {
  if (!have_program("coap-client-notls")) {
    WARN("coap-client-notls not installed: skipped");
    return;
  }
  transport::NodeConfig config;
  config.local_address = "127.0.0.1";
  config.local_port = 0;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  server->add_route(Method::get, {"cbor"}, transport::Access::both,
                    [](const transport::Session&, const Request&, transport::Responder responder) {
                      Response response = Response::with_text(205, "x");
                      response.content_format = transport::kContentFormatCbor;
                      responder.respond(std::move(response));
                    });
  server->add_route(Method::get, {"plain"}, transport::Access::both,
                    [](const transport::Session&, const Request&, transport::Responder responder) {
                      Response response = Response::with_text(205, "text");
                      response.content_format = 0;  // text/plain: libcoap would leave it out by itself
                      responder.respond(std::move(response));
                    });
  const std::string base = "coap://127.0.0.1:" + std::to_string(server->local_port()) + "/";
  CommandResult unset, cbor, plain;
  {
    BackgroundNode serving(*server);
    // -v 7 prints each PDU received with its options, e.g. "v:1 t:ACK c:2.05 i:1234 {01} [ Content-Format:... ]".
    unset = run_command({"coap-client-notls", "-v", "7", "-B", "5", base + "hello"});
    cbor = run_command({"coap-client-notls", "-v", "7", "-B", "5", base + "cbor"});
    plain = run_command({"coap-client-notls", "-v", "7", "-B", "5", base + "plain"});
  }
  INFO(unset.output + "\n---\n" + cbor.output + "\n---\n" + plain.output);
  REQUIRE(unset.output.find("c:2.05") != std::string::npos);
  CHECK(unset.output.find("Content-Format") == std::string::npos);
  CHECK(unset.output.find("65535") == std::string::npos);
  CHECK(cbor.output.find("Content-Format:application/cbor") != std::string::npos);
  CHECK(plain.output.find("Content-Format:text/plain") != std::string::npos);
}

TEST_CASE("Observe: each subscriber gets its own notifications until it cancels") {
  FeedServer server;
  auto alpha_client = make_client();
  auto beta_client = make_client();
  const transport::Peer peer{"127.0.0.1", server.node->secure_port()};
  Notifications alpha, beta;
  Observation alpha_sub = alpha_client->observe(peer, psk("CAE-alpha"), get({"feed"}), alpha.handler());
  Observation beta_sub = beta_client->observe(peer, psk("CAE-beta"), get({"feed"}), beta.handler());
  std::vector<transport::Node*> nodes{server.node.get(), alpha_client.get(), beta_client.get()};
  REQUIRE(pump(nodes, [&] { return alpha.live() == 1 && beta.live() == 1; }));
  CHECK(alpha.last_text() == "CAE-alpha:0");
  CHECK(beta.last_text() == "CAE-beta:0");
  CHECK(alpha_sub.active());

  server.change();
  REQUIRE(pump(nodes, [&] { return alpha.live() == 2 && beta.live() == 2; }));
  CHECK(alpha.last_text() == "CAE-alpha:1");  // the handler ran per subscriber, with that subscriber's session
  CHECK(beta.last_text() == "CAE-beta:1");
  CHECK(*alpha.calls[1]->observe > *alpha.calls[0]->observe);

  // Cancelling sends a deregistration: the server stops notifying alpha; no call reaches alpha's handler.
  alpha_sub.cancel();
  CHECK_FALSE(alpha_sub.active());
  const int calls_before = server.handler_calls;
  REQUIRE(pump(nodes, [&] { return server.handler_calls > calls_before; }));  // the GET with Observe 1
  server.change();
  REQUIRE(pump(nodes, [&] { return beta.live() == 3; }));
  pump(nodes, [] { return false; }, 200ms);  // let a stray notification to alpha arrive, if there were one
  CHECK(alpha.calls.size() == 2);
  CHECK(beta.last_text() == "CAE-beta:2");

  // A refusal in a notification ends the subscription with the session (an error for the observer); a new
  // subscription gets the refusal itself as its final answer.
  server.refuse_beta = true;
  server.change();
  REQUIRE(pump(nodes, [&] { return beta.ended(); }));
  CHECK_FALSE(beta.calls.back().ok());
  CHECK_FALSE(beta_sub.active());
  REQUIRE(pump(nodes, [&] {  // beta's session is gone; alpha's (no subscription any more) stays
    const auto stats = server.node->stats();
    return stats.live_server_sessions - stats.live_server_handshakes == 1;
  }));
  CHECK_FALSE(server.node->notify_observers({"feed"}));  // nobody subscribed any more
  Notifications refused;
  Observation refused_sub = beta_client->observe(peer, psk("CAE-beta"), get({"feed"}), refused.handler());
  REQUIRE(pump(nodes, [&] { return refused.ended(); }));
  REQUIRE(refused.calls.size() == 1);
  CHECK(refused.calls.back()->code == 403);
  CHECK_FALSE(refused_sub.active());
}

TEST_CASE("Observe: requests for the exact path and below still reach the routes") {
  FeedServer server;
  server.node->add_route(Method::get, {"feed"}, transport::Access::secure,
                         [](const transport::Session&, const Request& request, transport::Responder responder) {
                           responder.respond(Response::with_text(205, "prefix:" + request.path_text()));
                         });
  server.node->add_route(Method::post, {"feed"}, transport::Access::secure,
                         [](const transport::Session&, const Request&, transport::Responder responder) {
                           responder.respond(Response::with_text(204, "posted"));
                         });
  auto client = make_client();
  const transport::Peer peer{"127.0.0.1", server.node->secure_port()};
  auto call = [&](Request request) {
    std::optional<Result<Response>> result;
    client->request(peer, psk("CAE-alpha"), std::move(request),
                    [&](Result<Response> answer, const transport::Session*) { result.emplace(std::move(answer)); });
    REQUIRE(pump({server.node.get(), client.get()}, [&] { return result.has_value(); }));
    REQUIRE(result->ok());
    return std::move(**result);
  };
  CHECK(text_of(call(get({"feed"})).payload) == "CAE-alpha:0");  // the exact route wins over the prefix
  CHECK(text_of(call(get({"feed", "x"})).payload) == "prefix:/feed/x");
  Request post = get({"feed"});
  post.method = Method::post;
  CHECK(call(std::move(post)).code == 204);  // other methods on the observable path: the ordinary routes
  CHECK_FALSE(server.node->add_observable({"feed"}, transport::Access::secure, {}).ok());
  CHECK_FALSE(server.node->add_observable({}, transport::Access::secure, {}).ok());
}

TEST_CASE("close_server_sessions ends the sessions of one identity and their subscriptions") {
  FeedServer server;
  auto alpha_client = make_client();
  auto beta_client = make_client();
  const transport::Peer peer{"127.0.0.1", server.node->secure_port()};
  Notifications alpha, beta;
  Observation alpha_sub = alpha_client->observe(peer, psk("CAE-alpha"), get({"feed"}), alpha.handler());
  Observation beta_sub = beta_client->observe(peer, psk("CAE-beta"), get({"feed"}), beta.handler());
  std::vector<transport::Node*> nodes{server.node.get(), alpha_client.get(), beta_client.get()};
  REQUIRE(pump(nodes, [&] { return alpha.live() == 1 && beta.live() == 1; }));
  const auto handshakes_before = server.node->stats().handshakes_completed;

  CHECK(server.node->close_server_sessions(PeerKind::psk, "CAE-alpha") == 1);
  CHECK(server.node->close_server_sessions(PeerKind::psk, "CAE-nobody") == 0);
  // alpha's client sees the close_notify: its subscription ends with an error, once.
  REQUIRE(pump(nodes, [&] { return alpha.ended(); }));
  CHECK_FALSE(alpha.calls.back().ok());
  CHECK_FALSE(alpha_sub.active());
  server.change();
  REQUIRE(pump(nodes, [&] { return beta.live() == 2; }));  // beta's session and subscription are untouched
  pump(nodes, [] { return false; }, 200ms);
  CHECK(alpha.calls.size() == 2);

  // A new subscription from alpha needs a new handshake.
  Notifications again;
  Observation again_sub = alpha_client->observe(peer, psk("CAE-alpha"), get({"feed"}), again.handler());
  REQUIRE(pump(nodes, [&] { return again.live() == 1; }));
  CHECK(server.node->stats().handshakes_completed == handshakes_before + 1);
}

TEST_CASE("Observe: an unreachable server ends the subscription with an error, once") {
  transport::NodeConfig config;
  config.limits.request_timeout = std::chrono::milliseconds(300);
  auto created = transport::Node::create(std::move(config));
  REQUIRE(created.ok());
  auto client = std::move(*created);
  Notifications lost;
  // A plain CoAP port nobody listens on: ICMP unreachable or no answer; either way the call comes once.
  Observation sub = client->observe({"127.0.0.1", 9}, ClientCredentials::plain(), get({"feed"}), lost.handler());
  REQUIRE(pump({client.get()}, [&] { return !lost.calls.empty(); }, 10s));
  pump({client.get()}, [] { return false; }, 400ms);
  REQUIRE(lost.calls.size() == 1);
  CHECK_FALSE(lost.calls.front().ok());
}

TEST_CASE("A stock coap-client-gnutls subscribes to an observable resource and receives the notifications") {
  if (!have_program("coap-client-gnutls")) {
    WARN("coap-client-gnutls not installed: skipped");
    return;
  }
  FeedServer server;
  const std::string uri = "coaps://127.0.0.1:" + std::to_string(server.node->secure_port()) + "/feed";
  CommandResult result;
  std::atomic<bool> finished{false};
  std::thread client([&] {
    // -s 4: subscribe for 4 s (Observe 0), printing every notification's payload.
    result = run_command({"coap-client-gnutls", "-s", "4", "-B", "8", "-u", "CAE-alpha", "-k",
                          kKeys.at("CAE-alpha"), uri});
    finished = true;
  });
  // Two changes once the subscription is in, each announced from the loop (as the MEF does).
  REQUIRE(pump({server.node.get()}, [&] { return server.handler_calls >= 1; }));
  server.change();
  REQUIRE(pump({server.node.get()}, [&] { return server.handler_calls >= 2; }));
  server.change();
  REQUIRE(pump({server.node.get()}, [&] { return server.handler_calls >= 3; }));
  pump({server.node.get()}, [&] { return finished.load(); }, 15s);
  client.join();
  INFO(result.output);
  CHECK(result.output.find("CAE-alpha:0") != std::string::npos);
  CHECK(result.output.find("CAE-alpha:1") != std::string::npos);
  CHECK(result.output.find("CAE-alpha:2") != std::string::npos);
}

TEST_CASE("post_after runs work from the loop once its delay has passed, and bounds next_timeout") {
  auto node = make_client();
  int ran = 0;
  node->post_after(std::chrono::hours(1), [&] { ++ran; });
  node->process_ready();
  CHECK(ran == 0);  // an hour has not passed
  node->post_after(std::chrono::milliseconds(0), [&] { ran += 10; });
  CHECK(node->next_timeout() <= std::chrono::milliseconds(1));
  REQUIRE(node->run_until([&] { return ran == 10; }, 5s));
}

// Observations whose notifications need block-wise transfer (RFC 7959 Block2 with RFC 7641): two subscriptions of
// one resource on one DTLS session. libcoap 4.3.1 keeps one block-wise transfer per (session, resource) on the
// server and restarts a client transfer whenever the ETag of a later block differs from the first; with an ETag
// drawn anew for every response, two such transfers restarted each other for ever (a gateway spun at 100 % CPU
// against its MEF, docs/transport.md §6).
#include <catch2/catch.hpp>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Method;
using transport::Observation;
using transport::Request;
using transport::Response;

namespace {

const std::map<std::string, std::string> kKeys{{"CAE-alpha", "alpha-secret-key-0123456789abcdef"}};

// GET /feed answers about 3 KiB (three 1 KiB blocks) that change with `version`.
struct LargeFeedServer {
  std::unique_ptr<transport::Node> node;
  int version = 0;
  int handler_calls = 0;

  LargeFeedServer() {
    transport::NodeConfig config;
    config.psk_lookup = psk_table(kKeys);
    node = make_server(std::move(config));
    auto added = node->add_observable({"feed"}, transport::Access::secure,
                                      [this](const transport::Session&, const Request&, transport::Responder responder) {
                                        ++handler_calls;
                                        responder.respond(Response::with_text(205, body(version)));
                                      });
    REQUIRE(added.ok());
  }
  static std::string body(int v) {
    std::string text = "version " + std::to_string(v) + "\n";
    while (text.size() < 3000) text += "issued KeID " + std::to_string(text.size()) + "@mef.example.net\n";
    return text;
  }
};

struct Received {
  std::vector<std::string> texts;
  bool failed = false;
  transport::NotificationHandler handler() {
    return [this](Result<Response> notification, const transport::Session*) {
      if (!notification.ok()) {
        failed = true;
        return;
      }
      texts.push_back(text_of(notification->payload));
    };
  }
  bool has(const std::string& text) const { return std::find(texts.begin(), texts.end(), text) != texts.end(); }
};

// A LargeFeedServer and one client Node subscribing to it as CAE-alpha (GET /feed).
struct FeedClient {
  LargeFeedServer server;
  std::unique_ptr<transport::Node> client = transport::Node::create(transport::NodeConfig{}).value();
  transport::Peer peer{"127.0.0.1", server.node->secure_port()};
  ClientCredentials credentials = ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), "");
  Request request = [] {
    Request get;
    get.method = Method::get;
    get.path = {"feed"};
    return get;
  }();
};

}  // namespace

TEST_CASE("Two block-wise observations of one resource on one session both complete without a request storm") {
  FeedClient world;
  auto& [server, client, peer, credentials, request] = world;
  Received first, second;
  // The same peer and credentials: both ride on the one cached client session. They differ in an option, as a
  // subscription renewed with another oneM2M-FR would: libcoap 4.3.1 keeps one subscription per session for
  // requests that are the same in every option but the token.
  Request other = request;
  other.originator = "CAE-alpha-2";
  Observation first_sub = client->observe(peer, credentials, request, first.handler());
  Observation second_sub = client->observe(peer, credentials, other, second.handler());
  std::vector<transport::Node*> nodes{server.node.get(), client.get()};
  const std::string v0 = LargeFeedServer::body(0);
  REQUIRE(pump(nodes, [&] { return first.has(v0) && second.has(v0); }, 10s));
  CHECK(client->stats().live_client_sessions == 1);

  server.version = 1;
  const auto served_before = server.node->stats().requests_served;
  server.node->notify_observers({"feed"});
  const std::string v1 = LargeFeedServer::body(1);
  REQUIRE(pump(nodes, [&] { return first.has(v1) && second.has(v1); }, 10s));
  // Let anything still in motion settle, then count: each notification of 3 blocks costs the client two block
  // requests per subscription, and a restart or two when one transfer saw the other's body; a livelock costs
  // thousands per second.
  pump(nodes, [] { return false; }, 1s);
  const auto served = server.node->stats().requests_served - served_before;
  INFO("block requests after one notification: " << served);
  CHECK(served <= 12);
  CHECK_FALSE(first.failed);
  CHECK_FALSE(second.failed);
}

TEST_CASE("A block-wise subscription given up before its first answer is deregistered at the server") {
  FeedClient world;
  auto& [server, client, peer, credentials, request] = world;
  Received abandoned, kept;
  Observation abandoned_sub = client->observe(peer, credentials, request, abandoned.handler());
  // Given up before any answer (as a subscription whose first answer timed out): libcoap cannot deregister it
  // yet, and the server registers it when the GET arrives.
  abandoned_sub.cancel();
  Request other = request;
  other.originator = "CAE-alpha-2";  // not the same request, or libcoap would replace the first at the server
  Observation kept_sub = client->observe(peer, credentials, other, kept.handler());
  std::vector<transport::Node*> nodes{server.node.get(), client.get()};
  REQUIRE(pump(nodes, [&] { return kept.has(LargeFeedServer::body(0)); }, 10s));
  pump(nodes, [] { return false; }, 500ms);  // the abandoned subscription's answer arrives and is deregistered

  server.version = 1;
  const int calls_before = server.handler_calls;
  server.node->notify_observers({"feed"});
  REQUIRE(pump(nodes, [&] { return kept.has(LargeFeedServer::body(1)); }, 10s));
  pump(nodes, [] { return false; }, 500ms);
  CHECK(server.handler_calls - calls_before == 1);  // the kept subscriber only
  CHECK(abandoned.texts.empty());
  CHECK_FALSE(kept.failed);
}

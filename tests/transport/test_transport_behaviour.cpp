// Request handling and limits: oneM2M options, 4 KiB limit (4.13), deferred responses, routing and access,
// the local plain-CoAP endpoint, client session caps, and a handshake flood against a small cap.
#include <catch2/catch.hpp>

#include <filesystem>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::FailureKind;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

const std::map<std::string, std::string> kKeys{{"CAE-alpha", "alpha-secret-key-0123456789abcdef"}};
ClientCredentials alpha() { return ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), ""); }

}  // namespace

TEST_CASE("Requests carry oneM2M options both ways, bodies over 4 KiB get 4.13, the server keeps serving") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  FailureLog server_log;
  server->set_failure_observer(server_log.observer());
  server->add_route(Method::post, {"echo"}, transport::Access::secure,
                    [](const transport::Session&, const Request& request, transport::Responder responder) {
                      Response response;
                      response.code = 204;
                      response.content_format = transport::kContentFormatJson;
                      response.response_status = 2004;
                      const std::string text = request.originator + "|" + request.request_id + "|" +
                                               std::to_string(request.payload.size()) + "|" +
                                               std::to_string(request.content_format.value_or(0));
                      response.payload.assign(text.begin(), text.end());
                      responder.respond(std::move(response));
                    });
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  auto post = [&](std::size_t size) {
    Request request;
    request.method = Method::post;
    request.path = {"echo"};
    request.originator = "CAE-alpha";
    request.request_id = "rqi-42";
    request.content_format = transport::kContentFormatCbor;
    request.payload.assign(size, 0xA5);
    CallResult reply = request_and_wait(*server, *client, peer, alpha(), std::move(request));
    REQUIRE(reply.result->ok());
    return std::move(**reply.result);
  };

  const Response small = post(3000);  // more than one datagram: Block1 (RFC 7959), reassembled by libcoap
  CHECK(small.code == 204);
  CHECK(text_of(small.payload) == "CAE-alpha|rqi-42|3000|60");
  CHECK(small.response_status == std::optional<std::uint32_t>(2004));
  CHECK(small.request_id == "rqi-42");
  CHECK(small.content_format == std::optional<std::uint16_t>(transport::kContentFormatJson));

  const Response big = post(5000);
  CHECK(big.code == 413);
  CHECK(server_log.text().find("5000 bytes refused") != std::string::npos);
  CHECK(server->stats().requests_rejected == 1);

  CHECK(post(4096).code == 204);  // the limit itself is allowed
}

TEST_CASE("A handler can keep its Responder and answer later (separate response)") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  std::optional<transport::Responder> kept;
  std::string kept_identity;
  server->add_route(Method::get, {"later"}, transport::Access::secure,
                    [&](const transport::Session& session, const Request&, transport::Responder responder) {
                      kept_identity = session.peer().value;
                      kept.emplace(std::move(responder));
                    });
  server->add_route(Method::get, {"dropped"}, transport::Access::secure,
                    [](const transport::Session&, const Request&, transport::Responder) {});
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  Request request;
  request.path = {"later"};
  CallResult reply;
  client->request(peer, alpha(), request, record_into(reply));
  REQUIRE(pump({server.get(), client.get()}, [&] { return kept.has_value(); }));
  // Let the empty ACK travel; the client must still be waiting.
  pump({server.get(), client.get()}, [] { return false; }, 300ms);
  CHECK_FALSE(reply.done);
  kept->respond(Response::with_text(205, "answered later for " + kept_identity));
  REQUIRE(pump({server.get(), client.get()}, [&] { return reply.done; }));
  REQUIRE(reply.result->ok());
  CHECK(text_of((*reply.result)->payload) == "answered later for CAE-alpha");

  Request dropped;
  dropped.path = {"dropped"};
  const CallResult dropped_reply = request_and_wait(*server, *client, peer, alpha(), dropped);
  REQUIRE(dropped_reply.result->ok());
  CHECK((*dropped_reply.result)->code == 500);
}

TEST_CASE("The local plain-CoAP endpoint is loopback only and reaches only local routes") {
  transport::NodeConfig bad;
  bad.local_address = "0.0.0.0";
  auto refused = transport::Node::create(std::move(bad));
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().code == Errc::invalid_argument);

  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  config.local_address = "127.0.0.1";
  config.local_port = 0;
  auto server = make_server(std::move(config));
  server->add_route(Method::get, {"ae"}, transport::Access::local,
                    [](const transport::Session& session, const Request&, transport::Responder responder) {
                      responder.respond(Response::with_text(205, std::string(transport::to_string(session.peer().kind))));
                    });
  auto client = make_client_node();
  const transport::Peer local{"127.0.0.1", server->local_port()};
  auto get = [&](const transport::Peer& peer, const ClientCredentials& credentials, std::string path) {
    Request request;
    request.path = {std::move(path)};
    CallResult reply = request_and_wait(*server, *client, peer, credentials, request);
    REQUIRE(reply.result->ok());
    return std::move(**reply.result);
  };
  CHECK(text_of(get(local, ClientCredentials::plain(), "ae").payload) == "local");
  CHECK(get(local, ClientCredentials::plain(), "ekm").code == 404);    // secure-only route
  CHECK(get({"127.0.0.1", server->secure_port()}, alpha(), "ae").code == 404);  // local-only route
  CHECK(get(local, ClientCredentials::plain(), "nothing").code == 404);
}

TEST_CASE("Outgoing client sessions are capped with a clear error") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  transport::Limits limits;
  limits.max_client_sessions = 2;
  auto client = make_client_node(limits);
  FailureLog client_log;
  client->set_failure_observer(client_log.observer());
  std::vector<CallResult> replies(3);
  for (std::size_t i = 0; i < replies.size(); ++i) {
    Request request;
    request.path = {"hello"};
    client->request({"127.0.0.1", server->secure_port()},
                    ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), "sni-" + std::to_string(i)),
                    request, record_into(replies[i]));
  }
  REQUIRE(replies[2].done);  // refused at once
  REQUIRE_FALSE(replies[2].result->ok());
  CHECK(replies[2].result->error().code == Errc::limit);
  CHECK(replies[2].result->error().message.find("the limit is 2") != std::string::npos);
  CHECK(client_log.failures.size() == 1);
  REQUIRE(pump({server.get(), client.get()}, [&] { return replies[0].done && replies[1].done; }));
  CHECK(replies[0].result->ok());
  CHECK(replies[1].result->ok());

  transport::NodeConfig too_many;
  too_many.limits.max_client_sessions = 1000;
  CHECK_FALSE(transport::Node::create(std::move(too_many)).ok());
}

TEST_CASE("More stalled handshakes than the cap: bounded, and a legitimate peer is still served") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  config.limits.max_handshakes = 3;
  config.limits.handshake_timeout = 1500ms;
  auto server = make_server(std::move(config));
  FailureLog server_log;
  server->set_failure_observer(server_log.observer());
  transport::Limits limits;
  limits.handshake_timeout = 60s;  // the attackers never give up by themselves
  limits.request_timeout = 60s;
  auto attackers = make_client_node(limits);
  attackers->set_failure_observer([](const transport::Failure&) {});
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  std::vector<CallResult> stalled(10);
  for (std::size_t i = 0; i < stalled.size(); ++i) {
    Request request;
    request.path = {"hello"};
    // A wrong key stalls the server after its flight: the worst kind of half-open handshake.
    attackers->request(peer, ClientCredentials::psk("CAE-alpha", secret("wrong-" + std::to_string(i) + "-key-xxxxxxx"),
                                                    "a" + std::to_string(i)),
                       request, record_into(stalled[i]));
  }
  std::size_t max_live_handshakes = 0;
  pump({server.get(), attackers.get()}, [&] {
    max_live_handshakes = std::max(max_live_handshakes, server->stats().live_server_handshakes);
    return false;
  }, 800ms);
  CHECK(max_live_handshakes <= 3 + 1);  // libcoap counts the Client Hello session too (coap_session.c)

  auto client = make_client_node();
  CallResult good;
  Request request;
  request.path = {"hello"};
  client->request(peer, alpha(), request, record_into(good));
  REQUIRE(pump({server.get(), attackers.get(), client.get()}, [&] {
    max_live_handshakes = std::max(max_live_handshakes, server->stats().live_server_handshakes);
    return good.done;
  }, 30s));
  CHECK(max_live_handshakes <= 3 + 1);
  REQUIRE(good.result->ok());
  CHECK(text_of((*good.result)->payload) == "psk:CAE-alpha");
  CHECK(server_log.failures.size() >= 1);  // the stalled ones were dropped and reported
}

TEST_CASE("The legacy oneM2M option switch is refused with the reason (libcoap 4.3.1 option filter)") {
  transport::NodeConfig config;
  config.accept_legacy_onem2m_options = true;
  auto node = transport::Node::create(std::move(config));
  REQUIRE_FALSE(node.ok());
  CHECK(node.error().code == Errc::unsupported);
  CHECK(node.error().message.find("two option numbers above 255") != std::string::npos);
}

TEST_CASE("Response handlers may send the next request and close sessions (no re-entrancy into libcoap)") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  Request request;
  request.path = {"hello"};
  CallResult second;
  bool first_ok = false;
  client->request(peer, alpha(), request, [&](Result<Response> result, const transport::Session* session) {
    first_ok = result.ok() && session != nullptr;
    client->close_client_sessions();
    client->request(peer, alpha(), request, record_into(second));
  });
  REQUIRE(pump({server.get(), client.get()}, [&] { return second.done; }));
  CHECK(first_ok);
  REQUIRE(second.result->ok());
  CHECK(text_of((*second.result)->payload) == "psk:CAE-alpha");
  CHECK(server->stats().handshakes_completed == 2);  // the first session was closed: a new handshake

  // Closed sessions give their sockets back (GnuTLS's select() limit makes fd leaks fatal).
  auto open_fds = [] {
    return std::distance(std::filesystem::directory_iterator("/proc/self/fd"), std::filesystem::directory_iterator{});
  };
  client->close_client_sessions();
  pump({server.get(), client.get()}, [] { return false; }, 100ms);
  const auto fds_before = open_fds();
  for (int i = 0; i < 5; ++i) {
    CallResult chained;
    client->request(peer, alpha(), request, [&](Result<Response> result, const transport::Session*) {
      client->close_client_sessions();
      client->request(peer, alpha(), request, record_into(chained));
      CHECK(result.ok());
    });
    REQUIRE(pump({server.get(), client.get()}, [&] { return chained.done; }));
  }
  client->close_client_sessions();
  pump({server.get(), client.get()}, [] { return false; }, 100ms);
  CHECK(open_fds() == fds_before);
  CHECK(client->stats().live_client_sessions == 0);
}

TEST_CASE("IPv4 and IPv6 secure endpoints share one port") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  config.secure_addresses = {"127.0.0.1", "::1"};
  config.secure_port = 0;  // ephemeral; the IPv6 endpoint takes the port the IPv4 one got
  auto created = transport::Node::create(std::move(config));
  if (!created.ok()) {
    WARN("no IPv6 loopback here: " << created.error().message);
    return;
  }
  auto server = std::move(*created);
  server->add_route(Method::get, {"hello"}, transport::Access::secure,
                    [](const transport::Session& session, const Request&, transport::Responder responder) {
                      responder.respond(Response::with_text(205, session.remote_address()));
                    });
  auto client = make_client_node();
  for (const std::string host : {"127.0.0.1", "::1"}) {
    Request request;
    request.path = {"hello"};
    const CallResult reply = request_and_wait(*server, *client, {host, server->secure_port()}, alpha(), request);
    REQUIRE(reply.result->ok());
    CHECK(text_of((*reply.result)->payload).find(host == "::1" ? "[::1]:" : "127.0.0.1:") == 0);
  }
}

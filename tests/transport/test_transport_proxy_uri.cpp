// Proxy-Uri (RFC 7252 §5.10.2): a local AE names its target AE as the URI host (PROTOCOL.md §6, dauthd's proxy path).
// Checked with our own client and with the stock coap-client-notls -P, which sends Proxy-Uri to the proxy address.
#include <catch2/catch.hpp>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

std::unique_ptr<transport::Node> make_local_server() {
  transport::NodeConfig config;
  config.local_address = "127.0.0.1";
  config.local_port = 0;
  auto created = transport::Node::create(std::move(config));
  REQUIRE(created.ok());
  auto server = std::move(created).value();
  // The proxy route: Proxy-Uri requests carry no Uri-Path, so they land on the empty prefix.
  server->add_route(Method::get, {}, transport::Access::local,
                    [](const transport::Session&, const Request& request, transport::Responder responder) {
                      responder.respond(Response::with_text(
                          205, "proxy_uri=" + request.proxy_uri + " path=" + request.path_text() +
                                   " fr=" + request.originator));
                    });
  return server;
}

}  // namespace

TEST_CASE("Proxy-Uri is sent and parsed, the request reaches the empty-prefix route instead of libcoap's 5.05") {
  auto server = make_local_server();
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->local_port()};

  Request request;
  request.proxy_uri = "coap://CAE-valve/temp/now";
  request.originator = "CAE-meter";
  const CallResult proxied = request_and_wait(*server, *client, peer, ClientCredentials::plain(), request);
  REQUIRE(proxied.result->ok());
  CHECK((*proxied.result)->code == 205);
  CHECK(text_of((*proxied.result)->payload) == "proxy_uri=coap://CAE-valve/temp/now path=/ fr=CAE-meter");

  // Without Proxy-Uri the field stays empty and the path is the Uri-Path.
  Request plain;
  plain.path = {"x"};
  const CallResult reply = request_and_wait(*server, *client, peer, ClientCredentials::plain(), plain);
  REQUIRE(reply.result->ok());
  CHECK(text_of((*reply.result)->payload) == "proxy_uri= path=/x fr=");
}

TEST_CASE("Proxy-Uri: stock coap-client-notls -P reaches the route with the target AE-ID as host") {
  if (!have_program("coap-client-notls")) {
    WARN("coap-client-notls not installed (libcoap3-bin); skipped");
    return;
  }
  auto server = make_local_server();
  const std::string proxy = "coap://127.0.0.1:" + std::to_string(server->local_port());
  CommandResult result;
  {
    BackgroundNode serving(*server);
    result = run_command({"coap-client-notls", "-B", "5", "-P", proxy, "-O", "279,CAE-meter",
                          "coap://CAE-valve/temp"});
  }
  INFO(result.output);
  CHECK(result.exit_code == 0);
  CHECK(result.output.find("proxy_uri=coap://CAE-valve/temp path=/ fr=CAE-meter") != std::string::npos);
}

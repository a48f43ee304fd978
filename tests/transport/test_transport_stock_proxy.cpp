// A stock CoAP forward proxy between two Nodes (the relay path of outer ESPrim messages, docs/relay.md): our client
// sends a coaps:// Proxy-Uri to libcoap's own coap-server-gnutls -P over DTLS-PSK; the proxy opens its own DTLS-PSK
// session (its -u identity, its -k key) to our server's secure endpoint, which sees the proxy's identity, the path
// and query from the Proxy-Uri, and the payload unchanged; its answer comes back unchanged.
#include <catch2/catch.hpp>

#include "../rspf/child_process.hpp"
#include "loopback_ports.hpp"
#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

// The proxy uses its -k text as the key's bytes, for the sessions it accepts (any identity) and the ones it opens.
const std::string kProxyKey = "9f1c0a7e52d44b1b8e3a6c2d7f905e41";
const std::string kProxyIdentity = "stock-proxy";
const std::string kMarker = "marker-7c1f0e-not-for-the-proxy";

struct StockProxy {
  std::uint16_t dtls_port = 0;
  std::unique_ptr<ChildProcess> process;
};

// coap-server-gnutls listens for plain CoAP on -p and for DTLS on -p + 1; "-P ,<name>" makes it a forward proxy
// that is itself known only as the reserved name proxy.invalid (every other Proxy-Uri host is forwarded).
StockProxy start_stock_proxy() {
  StockProxy proxy;
  const std::uint16_t base = free_loopback_ports(2);
  proxy.dtls_port = static_cast<std::uint16_t>(base + 1);
  proxy.process = std::make_unique<ChildProcess>(std::vector<std::string>{
      "coap-server-gnutls", "-A", "127.0.0.1", "-p", std::to_string(base), "-k", kProxyKey, "-u", kProxyIdentity,
      "-P", ",proxy.invalid", "-v", "7"});
  // Ready once it says so (debug level 7); a request sent earlier would meet a closed port.
  for (;;) {
    const auto line = proxy.process->read_line(std::chrono::seconds(10));
    INFO(proxy.process->output());
    REQUIRE(line.has_value());
    if (line->find("created DTLS endpoint") != std::string::npos) break;
  }
  return proxy;
}

}  // namespace

TEST_CASE("stock proxy: coap-server-gnutls -P forwards a coaps Proxy-Uri POST to our secure endpoint and back") {
  if (!have_program("coap-server-gnutls")) {
    WARN("coap-server-gnutls not installed (libcoap3-bin); the stock-proxy relay test is skipped");
    return;
  }
  transport::NodeConfig config;
  config.secure_addresses = {"127.0.0.1"};
  config.secure_port = 0;
  config.psk_lookup = psk_table({{kProxyIdentity, kProxyKey}});
  auto created = transport::Node::create(std::move(config));
  REQUIRE(created.ok());
  auto server = std::move(created).value();
  std::string seen_identity;
  std::vector<std::string> seen_query;
  std::string seen_payload;
  std::optional<std::uint16_t> seen_format;
  std::string seen_proxy_uri;
  server->add_route(Method::post, {"esprim"}, transport::Access::secure,
                    [&](const transport::Session& session, const Request& request, transport::Responder responder) {
                      seen_identity = session.peer().value;
                      seen_query = request.query;
                      seen_payload = text_of(request.payload);
                      seen_format = request.content_format;
                      seen_proxy_uri = request.proxy_uri;
                      Response answer;
                      answer.code = 205;
                      answer.content_format = transport::kContentFormatJson;
                      const std::string body = R"({"answer":"from the server"})";
                      answer.payload.assign(body.begin(), body.end());
                      responder.respond(std::move(answer));
                    });
  auto proxy = start_stock_proxy();
  auto client = make_client_node();

  Request outer;
  outer.method = Method::post;
  outer.proxy_uri = "coaps://127.0.0.1:" + std::to_string(server->secure_port()) + "/esprim?to=CAE-b";
  outer.content_format = transport::kContentFormatJson;
  const std::string body = R"({"m2m:seci":{"sit":5,"epo":")" + kMarker + R"("}})";
  outer.payload.assign(body.begin(), body.end());
  const transport::Peer proxy_peer{"127.0.0.1", proxy.dtls_port};
  CallResult call;
  client->request(proxy_peer, ClientCredentials::psk("gateway-a", secret(kProxyKey), ""), outer, record_into(call));
  REQUIRE(pump({server.get(), client.get()}, [&] { return call.done; }, std::chrono::seconds(30)));
  proxy.process->drain();
  INFO(proxy.process->output());
  REQUIRE(call.result->ok());
  CHECK((*call.result)->code == 205);
  CHECK((*call.result)->content_format == transport::kContentFormatJson);
  CHECK(text_of((*call.result)->payload) == R"({"answer":"from the server"})");
  // What arrived: the proxy's own identity, the Proxy-Uri's path and query as Uri-Path / Uri-Query, the body and
  // Content-Format unchanged, no Proxy-Uri left.
  CHECK(seen_identity == kProxyIdentity);
  CHECK(seen_query == std::vector<std::string>{"to=CAE-b"});
  CHECK(seen_payload == body);
  CHECK(seen_format == transport::kContentFormatJson);
  CHECK(seen_proxy_uri.empty());
}

TEST_CASE("stock proxy: a client with another key than the proxy's -k gets no answer through it") {
  if (!have_program("coap-server-gnutls")) {
    WARN("coap-server-gnutls not installed (libcoap3-bin); the stock-proxy relay test is skipped");
    return;
  }
  transport::NodeConfig config;
  config.secure_addresses = {"127.0.0.1"};
  config.secure_port = 0;
  config.psk_lookup = psk_table({{kProxyIdentity, kProxyKey}});
  auto created = transport::Node::create(std::move(config));
  REQUIRE(created.ok());
  auto server = std::move(created).value();
  bool arrived = false;
  server->add_route(Method::post, {"esprim"}, transport::Access::secure,
                    [&](const transport::Session&, const Request&, transport::Responder responder) {
                      arrived = true;
                      responder.respond(Response::with_text(205, "ok"));
                    });
  auto proxy = start_stock_proxy();
  transport::Limits limits;
  limits.request_timeout = std::chrono::seconds(4);
  auto client = make_client_node(limits);
  Request outer;
  outer.method = Method::post;
  outer.proxy_uri = "coaps://127.0.0.1:" + std::to_string(server->secure_port()) + "/esprim?to=CAE-b";
  outer.content_format = transport::kContentFormatJson;
  CallResult call;
  client->request(transport::Peer{"127.0.0.1", proxy.dtls_port},
                  ClientCredentials::psk("gateway-a", secret("another-key-of-32-bytes-0123456789"), ""), outer,
                  record_into(call));
  REQUIRE(pump({server.get(), client.get()}, [&] { return call.done; }, std::chrono::seconds(30)));
  // The proxy drops the handshake's Finished silently (no alert with a wrong PSK): our request times out.
  REQUIRE_FALSE(call.result->ok());
  CHECK(call.result->error().code == Errc::timeout);
  CHECK_FALSE(arrived);
}

// Session control added for rspf and the daemon (issue 3): the SNI in the PSK lookup, closing one server session
// after a response, closing one cached client session, and Node::post().
#include <catch2/catch.hpp>

#include <sys/epoll.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

const std::map<std::string, std::string> kKeys{{"CAE-alpha", "alpha-secret-key-0123456789abcdef"},
                                               {"CAE-beta", "beta-secret-key-0123456789abcdef0"}};
ClientCredentials psk(const std::string& identity, const std::string& sni) {
  return ClientCredentials::psk(identity, secret(kKeys.at(identity)), sni);
}

// One request, pumping both nodes until it completes.
Response call(transport::Node& server, transport::Node& client, const ClientCredentials& credentials,
              Request request) {
  CallResult reply =
      request_and_wait(server, client, {"127.0.0.1", server.secure_port()}, credentials, std::move(request));
  INFO((reply.result->ok() ? std::string("ok") : reply.result->error().to_string()));
  REQUIRE(reply.result->ok());
  return std::move(**reply.result);
}

// Whether fd is readable now (no waiting).
bool readable(int fd) {
  const int epoll = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event event{};
  event.events = EPOLLIN;
  ::epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event);
  const int ready = ::epoll_wait(epoll, &event, 1, 0);
  ::close(epoll);
  return ready == 1;
}

}  // namespace

TEST_CASE("The PSK lookup receives the identity, the SNI and the address of every handshake") {
  struct Seen {
    std::string identity, sni, remote;
  };
  std::vector<Seen> seen;
  transport::NodeConfig config;
  auto table = psk_table(kKeys);
  config.psk_lookup = [&seen, table](const transport::PskRequest& request) {
    seen.push_back({std::string(request.identity), std::string(request.sni), std::string(request.remote)});
    return table(request);
  };
  auto server = make_server(std::move(config));
  auto client = make_client_node();

  CHECK(call(*server, *client, psk("CAE-alpha", "CAE-valve"), get_request({"hello"})).code == 205);
  CHECK(call(*server, *client, psk("CAE-beta", "CAE-pump"), get_request({"hello"})).code == 205);
  // The same SNI once more, in a new session: libcoap's own SNI callback would not run again for a name it has
  // seen (it caches per name and context), our per-session read does.
  auto other_client = make_client_node();
  CHECK(call(*server, *other_client, psk("CAE-alpha", "CAE-valve"), get_request({"hello"})).code == 205);
  CHECK(call(*server, *client, psk("CAE-alpha", ""), get_request({"hello"})).code == 205);

  REQUIRE(seen.size() == 4);
  CHECK(seen[0].identity == "CAE-alpha");
  CHECK(seen[0].sni == "CAE-valve");
  CHECK(seen[1].identity == "CAE-beta");
  CHECK(seen[1].sni == "CAE-pump");
  CHECK(seen[2].sni == "CAE-valve");
  CHECK(seen[3].sni.empty());
  for (const auto& one : seen) CHECK(one.remote.rfind("127.0.0.1:", 0) == 0);
  CHECK(seen[0].remote != seen[2].remote);  // two client nodes, two sockets
}

TEST_CASE("A server session reports the SNI its handshake carried, per session") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  server->add_route(Method::get, {"sni"}, transport::Access::secure,
                    [](const transport::Session& session, const Request&, transport::Responder responder) {
                      responder.respond(Response::with_text(205, "sni=" + session.server_name()));
                    });
  auto client = make_client_node();
  const auto text = [](const Response& response) {
    return std::string(response.payload.begin(), response.payload.end());
  };
  CHECK(text(call(*server, *client, psk("CAE-alpha", "CAE-valve"), get_request({"sni"}))) == "sni=CAE-valve");
  CHECK(text(call(*server, *client, psk("CAE-alpha", "CAE-pump"), get_request({"sni"}))) == "sni=CAE-pump");
  CHECK(text(call(*server, *client, psk("CAE-alpha", "CAE-valve"), get_request({"sni"}))) ==
        "sni=CAE-valve");  // cached
  CHECK(text(call(*server, *client, psk("CAE-beta", ""), get_request({"sni"}))) == "sni=");
}

TEST_CASE("A stock coap-client's SNI (the URI host) reaches the PSK lookup") {
  if (!have_program("coap-client-gnutls")) {
    WARN("coap-client-gnutls not installed: skipped");
    return;
  }
  std::string sni_seen = "<no lookup>";
  transport::NodeConfig config;
  auto table = psk_table(kKeys);
  config.psk_lookup = [&sni_seen, table](const transport::PskRequest& request) {
    sni_seen = std::string(request.sni);
    return table(request);
  };
  auto server = make_server(std::move(config));
  const std::string uri = "coaps://127.0.0.1:" + std::to_string(server->secure_port()) + "/hello";
  CommandResult result;
  {
    BackgroundNode serving(*server);
    result = run_command({"coap-client-gnutls", "-B", "10", "-u", "CAE-alpha", "-k", kKeys.at("CAE-alpha"), uri});
  }
  INFO(result.output);
  CHECK(result.output.find("psk:CAE-alpha") != std::string::npos);
  // coap-client 4.3.1 sends the URI host as SNI, even an address literal (which RFC 6066 §3 does not allow).
  CHECK(sni_seen == "127.0.0.1");
}

TEST_CASE("A response with close_session ends the server session, the next request gets a fresh handshake") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  server->add_route(Method::post, {"last"}, transport::Access::secure,
                    [](const transport::Session&, const Request&, transport::Responder responder) {
                      Response response = Response::with_text(204, "bye");
                      response.close_session = true;
                      responder.respond(std::move(response));
                    });
  auto client = make_client_node();
  const auto alpha = psk("CAE-alpha", "");

  const std::string first_ekm = text_of(call(*server, *client, alpha, get_request({"ekm"})).payload);
  // Without the flag the session stays: the same exporter on the next request.
  CHECK(text_of(call(*server, *client, alpha, get_request({"ekm"})).payload) == first_ekm);
  CHECK(server->stats().live_server_sessions == 1);

  Request last = get_request({"last"});
  last.method = Method::post;
  const Response answer = call(*server, *client, alpha, std::move(last));
  CHECK(answer.code == 204);
  CHECK(text_of(answer.payload) == "bye");  // the response went out before the close
  // The server frees its session, and the client learns of the close_notify and drops its cached session.
  REQUIRE(pump({server.get(), client.get()}, [&] {
    return server->stats().live_server_sessions == 0 && client->stats().live_client_sessions == 0;
  }));
  const std::string next_ekm = text_of(call(*server, *client, alpha, get_request({"ekm"})).payload);
  CHECK(next_ekm != first_ekm);
  CHECK(server->stats().handshakes_completed == 2);
  CHECK(server->stats().handshakes_failed == 0);
}

TEST_CASE("close_client_session closes the one cached session for a peer and credential, not the others") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const auto alpha = psk("CAE-alpha", "");
  const auto beta = psk("CAE-beta", "");
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  const std::string alpha_ekm = text_of(call(*server, *client, alpha, get_request({"ekm"})).payload);
  const std::string beta_ekm = text_of(call(*server, *client, beta, get_request({"ekm"})).payload);
  REQUIRE(client->stats().live_client_sessions == 2);
  REQUIRE(server->stats().live_server_sessions == 2);

  CHECK_FALSE(client->close_client_session(peer, psk("CAE-alpha", "other-sni")));  // another cache entry: none
  CHECK_FALSE(client->close_client_session({"127.0.0.1", static_cast<std::uint16_t>(peer.port + 1)}, alpha));
  CHECK(client->close_client_session(peer, alpha));
  CHECK(client->stats().live_client_sessions == 1);
  CHECK_FALSE(client->close_client_session(peer, alpha));  // already closed
  // close_notify reached the server: it frees that session only.
  REQUIRE(pump({server.get(), client.get()}, [&] { return server->stats().live_server_sessions == 1; }));

  CHECK(text_of(call(*server, *client, beta, get_request({"ekm"})).payload) == beta_ekm);     // untouched
  CHECK(text_of(call(*server, *client, alpha, get_request({"ekm"})).payload) != alpha_ekm);   // new handshake
  CHECK(server->stats().handshakes_completed == 3);
}

TEST_CASE("close_client_session fails the pending requests of that session") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const auto alpha = psk("CAE-alpha", "");
  CallResult reply;
  client->request({"127.0.0.1", server->secure_port()}, alpha, get_request({"hello"}), record_into(reply));
  CHECK(client->close_client_session({"127.0.0.1", server->secure_port()}, alpha));
  REQUIRE(reply.done);  // the handler ran from close_client_session's housekeeping, on this thread
  REQUIRE_FALSE(reply.result->ok());
  CHECK(reply.result->error().code == Errc::io);
}

TEST_CASE("post() runs work at the next process_ready, outside libcoap callbacks, and keeps fd() readable") {
  auto client = make_client_node();
  std::vector<std::string> order;
  client->post([&] {
    order.push_back("first");
    client->post([&] { order.push_back("posted by posted work"); });
  });
  client->post([&] { order.push_back("second"); });
  CHECK(order.empty());  // never run inline
  CHECK(readable(client->fd()));
  CHECK(client->next_timeout().count() == 0);
  client->process_ready();
  CHECK(order == std::vector<std::string>{"first", "second"});
  CHECK(readable(client->fd()));  // the work posted meanwhile waits for the next round
  client->process_ready();
  CHECK(order == std::vector<std::string>{"first", "second", "posted by posted work"});
  CHECK_FALSE(readable(client->fd()));

  // From inside the PSK lookup (a libcoap DTLS callback) post a request to a second server: it runs on the loop.
  transport::NodeConfig second_config;
  second_config.psk_lookup = psk_table(kKeys);
  auto second = make_server(std::move(second_config));
  CallResult relayed;
  std::unique_ptr<transport::Node> gateway;
  transport::NodeConfig gateway_config;
  auto table = psk_table(kKeys);
  bool in_lookup = false;
  bool ran_inside_lookup = false;
  gateway_config.psk_lookup = [&](const transport::PskRequest& request) {
    in_lookup = true;
    gateway->post([&] {
      ran_inside_lookup = in_lookup;
      gateway->request({"127.0.0.1", second->secure_port()}, psk("CAE-beta", ""), get_request({"hello"}),
                       record_into(relayed));
    });
    auto key = table(request);
    in_lookup = false;
    return key;
  };
  gateway = make_server(std::move(gateway_config));
  CallResult direct;
  client->request({"127.0.0.1", gateway->secure_port()}, psk("CAE-alpha", ""), get_request({"hello"}),
                  record_into(direct));
  REQUIRE(pump({client.get(), gateway.get(), second.get()}, [&] { return direct.done && relayed.done; }));
  CHECK_FALSE(ran_inside_lookup);
  REQUIRE(relayed.result->ok());
  CHECK(text_of((*relayed.result)->payload) == "psk:CAE-beta");
  REQUIRE(direct.result->ok());
  CHECK(text_of((*direct.result)->payload) == "psk:CAE-alpha");
}

TEST_CASE("live_sessions lists the established sessions of both sides and forgets closed ones") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const auto alpha = psk("CAE-alpha", "CAE-valve");
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  CHECK(server->live_sessions().empty());

  const auto before = std::chrono::system_clock::now() - std::chrono::seconds(1);
  call(*server, *client, alpha, get_request({"hello"}));
  call(*server, *client, psk("CAE-beta", ""), get_request({"hello"}));

  const auto served = server->live_sessions();
  REQUIRE(served.size() == 2);
  CHECK_FALSE(served[0].client);
  CHECK(served[0].secure);
  CHECK(served[0].peer.kind == transport::PeerKind::psk);
  CHECK(served[0].peer.value == "CAE-alpha");
  CHECK(served[0].server_name == "CAE-valve");
  CHECK(served[0].cipher_suite.find("PSK") != std::string::npos);
  CHECK(served[0].created >= before);
  CHECK(served[0].last_received >= served[0].created);
  CHECK(served[0].counters.packets_in == 1);
  CHECK(served[1].peer.value == "CAE-beta");

  const auto used = client->live_sessions();
  REQUIRE(used.size() == 2);
  CHECK(used[0].client);
  CHECK(used[0].credential_id == "CAE-alpha");
  CHECK(used[0].remote_address == "127.0.0.1:" + std::to_string(server->secure_port()));

  // A later request moves last_received, not created.
  const auto first_received = server->live_sessions()[0].last_received;
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  call(*server, *client, alpha, get_request({"hello"}));
  const auto again = server->live_sessions();
  REQUIRE(again.size() == 2);
  CHECK(again[0].created == served[0].created);
  CHECK(again[0].last_received > first_received);
  CHECK(again[0].counters.packets_in == 2);

  REQUIRE(client->close_client_session(peer, alpha));
  CHECK(client->live_sessions().size() == 1);
  REQUIRE(pump({server.get(), client.get()}, [&] { return server->live_sessions().size() == 1; }));
  CHECK(server->live_sessions()[0].peer.value == "CAE-beta");
}

// Client sessions that hold an observation when they end: the server's close_notify (server stopped), a cancel
// before that, and the client Node destroyed with live observations. libcoap 4.3.1 deregisters a session's
// observations when the session is freed, and on a closed DTLS session it opened a new handshake for that (a
// stray ClientHello, and a leaked GnuTLS session when the setup failed; docs/transport.md §5). The ASan build
// (LeakSanitizer) checks the leak; every build checks what reaches the server's port afterwards.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "loopback_ports.hpp"
#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Observation;
using transport::Request;
using transport::Response;

namespace {

const std::map<std::string, std::string> kKeys{{"CAE-alpha", "alpha-secret-key-0123456789abcdef"}};
constexpr std::uint8_t kDtlsHandshakeRecord = 22;  // DTLS record content type of a ClientHello

ClientCredentials alpha(const std::string& sni) {
  return ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), sni);
}

Request feed_request() {
  Request request;
  request.method = transport::Method::get;
  request.path = {"feed"};
  return request;
}

// A server whose observable GET /feed answers every subscriber, counting the handler's calls.
struct FeedServer {
  std::unique_ptr<transport::Node> node;
  std::shared_ptr<int> handler_calls = std::make_shared<int>(0);
  FeedServer() {
    transport::NodeConfig config;
    config.psk_lookup = psk_table(kKeys);
    node = make_server(std::move(config), free_loopback_port());  // PortListener binds it after the server
    auto added = node->add_observable({"feed"}, transport::Access::secure,
                                      [calls = handler_calls](const transport::Session&, const Request&,
                                                              transport::Responder responder) {
                                        ++*calls;
                                        responder.respond(Response::with_text(205, "feed"));
                                      });
    REQUIRE(added.ok());
  }
};

std::unique_ptr<transport::Node> make_client() {
  auto node = transport::Node::create(transport::NodeConfig{});
  REQUIRE(node.ok());
  return std::move(*node);
}

struct Notifications {
  std::vector<Result<Response>> calls;
  transport::NotificationHandler handler() {
    return [this](Result<Response> notification, const transport::Session*) {
      calls.push_back(std::move(notification));
    };
  }
  bool live() const { return !calls.empty() && calls.back().ok() && calls.back()->observe.has_value(); }
  std::size_t finals() const {  // calls that ended the subscription: a refusal or an error
    std::size_t count = 0;
    for (const auto& call : calls) count += (!call.ok() || !call->observe) ? 1 : 0;
    return count;
  }
};

// A plain UDP socket on the port a stopped server left: it sees whatever the client still sends there.
class PortListener {
 public:
  explicit PortListener(std::uint16_t port) : fd_(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) {
    REQUIRE(fd_ >= 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd_, reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0);
  }
  ~PortListener() { ::close(fd_); }
  PortListener(const PortListener&) = delete;
  PortListener& operator=(const PortListener&) = delete;

  // The first byte (DTLS content type) of every datagram received so far.
  std::vector<int> record_types() {
    std::uint8_t buffer[2048];
    while (true) {
      const ssize_t received = ::recv(fd_, buffer, sizeof(buffer), 0);
      if (received <= 0) break;
      types_.push_back(buffer[0]);
    }
    return types_;
  }
  std::size_t handshakes() {
    std::size_t count = 0;
    for (int type : record_types()) count += type == kDtlsHandshakeRecord ? 1 : 0;
    return count;
  }

 private:
  int fd_;
  std::vector<int> types_;
};

std::string describe(const std::vector<int>& types) {
  std::string text = "record types received at the old server port:";
  for (int type : types) text += " " + std::to_string(type);
  return text;
}

}  // namespace

TEST_CASE("Observe close: after the server's close_notify the released sessions send no ClientHello") {
  FeedServer server;
  auto client = make_client();
  const std::uint16_t port = server.node->secure_port();
  const transport::Peer peer{"127.0.0.1", port};
  // Two sessions: without SNI and with one (the MEF's case, where the failed setup of that ClientHello leaked
  // the GnuTLS session).
  Notifications plain, named;
  Observation plain_sub = client->observe(peer, alpha(""), feed_request(), plain.handler());
  Observation named_sub = client->observe(peer, alpha("feed.example.net"), feed_request(), named.handler());
  REQUIRE(pump({server.node.get(), client.get()}, [&] { return plain.live() && named.live(); }));
  REQUIRE(client->stats().live_client_sessions == 2);

  // The close_notify must reach the client while libcoap still counts its subscriptions as live: no 4.04 first
  // (libcoap sends one per subscriber when an observable resource is deleted, which ends them cleanly).
  SECTION("the server closes the sessions, then stops") {
    CHECK(server.node->close_server_sessions(transport::PeerKind::psk, "CAE-alpha") == 2);
    REQUIRE(pump({server.node.get()}, [&] {  // close_notify sent, subscriptions gone with the sessions
      const auto stats = server.node->stats();
      return stats.live_server_sessions == stats.live_server_handshakes;
    }));
  }
  SECTION("the server stops while a CON notification is unacknowledged") {
    // The MEF's restart: NSTART 1 and a CON notification in flight make libcoap skip the 4.04 on the way out.
    const int calls_before = *server.handler_calls;
    server.node->notify_observers({"feed"});
    REQUIRE(pump({server.node.get()}, [&] { return *server.handler_calls == calls_before + 2; }));
  }
  server.node.reset();
  PortListener listener(port);  // the client's last datagrams to the stopped server arrive here
  REQUIRE(pump({client.get()}, [&] { return plain.finals() == 1 && named.finals() == 1; }));
  REQUIRE(pump({client.get()}, [&] { return client->stats().live_client_sessions == 0; }));
  pump({client.get()}, [] { return false; }, 100ms);
  INFO(describe(listener.record_types()));
  CHECK(listener.handshakes() == 0);
  CHECK_FALSE(plain.calls.back().ok());  // the session's end, not a refusal
  CHECK_FALSE(named.calls.back().ok());
  CHECK_FALSE(plain_sub.active());
  CHECK_FALSE(named_sub.active());

  // The Observations outlive their sessions: cancelling now sends nothing and calls nothing.
  const auto calls_before = plain.calls.size() + named.calls.size();
  plain_sub.cancel();
  named_sub = Observation();
  pump({client.get()}, [] { return false; }, 100ms);
  CHECK(plain.calls.size() + named.calls.size() == calls_before);
  CHECK(plain.finals() == 1);
  CHECK(named.finals() == 1);
  CHECK(listener.handshakes() == 0);
}

TEST_CASE("Observe close: an observation cancelled before the server goes away") {
  FeedServer server;
  auto client = make_client();
  const std::uint16_t port = server.node->secure_port();
  const transport::Peer peer{"127.0.0.1", port};
  Notifications feed;
  Observation sub = client->observe(peer, alpha("feed.example.net"), feed_request(), feed.handler());
  REQUIRE(pump({server.node.get(), client.get()}, [&] { return feed.live(); }));

  sub.cancel();  // a GET with Observe 1: the server drops the subscription, the session stays
  REQUIRE(pump({server.node.get(), client.get()}, [&] { return !server.node->notify_observers({"feed"}); }));
  CHECK(server.node->close_server_sessions(transport::PeerKind::psk, "CAE-alpha") == 1);
  REQUIRE(pump({server.node.get()}, [&] {
    const auto stats = server.node->stats();
    return stats.live_server_sessions == stats.live_server_handshakes;
  }));
  server.node.reset();
  PortListener listener(port);
  REQUIRE(pump({client.get()}, [&] { return client->stats().live_client_sessions == 0; }));
  pump({client.get()}, [] { return false; }, 100ms);
  INFO(describe(listener.record_types()));
  CHECK(listener.handshakes() == 0);
  CHECK(feed.calls.size() == 1);  // the first notification only: no call after a cancel
}

TEST_CASE("Observe close: a client Node destroyed with live observations") {
  SECTION("the server is still there: its subscription ends with the session") {
    FeedServer server;
    auto client = make_client();
    const transport::Peer peer{"127.0.0.1", server.node->secure_port()};
    Notifications feed;
    Observation sub = client->observe(peer, alpha("feed.example.net"), feed_request(), feed.handler());
    REQUIRE(pump({server.node.get(), client.get()}, [&] { return feed.live(); }));
    client.reset();  // the Observation outlives its Node
    CHECK_FALSE(sub.active());
    REQUIRE(pump({server.node.get()}, [&] { return !server.node->notify_observers({"feed"}); }));
    sub.cancel();
    CHECK(feed.calls.size() == 1);
  }
  SECTION("the server went away and its close_notify is not read yet: no new handshake") {
    FeedServer server;
    auto client = make_client();
    const std::uint16_t port = server.node->secure_port();
    const transport::Peer peer{"127.0.0.1", port};
    Notifications plain, named;
    Observation plain_sub = client->observe(peer, alpha(""), feed_request(), plain.handler());
    Observation named_sub = client->observe(peer, alpha("feed.example.net"), feed_request(), named.handler());
    REQUIRE(pump({server.node.get(), client.get()}, [&] { return plain.live() && named.live(); }));
    server.node.reset();
    PortListener listener(port);
    client.reset();
    INFO(describe(listener.record_types()));
    CHECK(listener.handshakes() == 0);
    CHECK(plain.calls.size() == 1);
    CHECK(named.calls.size() == 1);
  }
}

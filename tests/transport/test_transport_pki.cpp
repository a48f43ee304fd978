// X.509 and raw public keys over loopback DTLS: identity from our own DER parsing, refusals of foreign, expired
// and AE-ID-less certificates, unpinned keys; stock clients; a strict ECDHE-ECDSA-AES128-CCM8 client.
#include <catch2/catch.hpp>

#include <set>

#include "dauth/crypto/x509.hpp"

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::FailureKind;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

std::string trim(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  return text;
}

}  // namespace

TEST_CASE("X.509: mutual authentication, AE-IDs from the certificates, exporter agrees") {
  TempDir dir;
  Pki pki(dir);
  transport::NodeConfig config;
  config.x509 = pki.credentials("server");
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  const auto credentials = ClientCredentials::certificate(pki.credentials("client"), "server.example.net",
                                                          "server.example.net");
  const CallResult hello = request_and_wait(*server, *client, peer, credentials, get_request({"hello"}));
  REQUIRE(hello.result->ok());
  CHECK(text_of((*hello.result)->payload) == "x509:" + kClientAeId);
  CHECK(hello.peer.kind == transport::PeerKind::x509);
  CHECK(hello.peer.value == kServerAeId);

  const CallResult ekm = request_and_wait(*server, *client, peer, credentials, get_request({"ekm"}));
  REQUIRE(ekm.result->ok());
  CHECK(text_of((*ekm.result)->payload) == ekm.client_export);
  CHECK(ekm.client_export.size() == 64);
}

TEST_CASE("X.509: the peer's certificate serial reaches the session, and peer_check refuses a revoked serial") {
  TempDir dir;
  Pki pki(dir);
  auto client_certificate = crypto::Certificate::parse(ByteView::of(pki.text("client.pem")));
  REQUIRE(client_certificate.ok());
  const std::string serial = client_certificate->serial_hex();
  REQUIRE_FALSE(serial.empty());
  std::set<std::string> revoked;
  std::vector<std::string> checked;
  transport::NodeConfig config;
  config.x509 = pki.credentials("server");
  config.peer_check = [&](const transport::PeerIdentity& peer) -> Result<void> {
    checked.push_back(peer.certificate_serial);
    if (revoked.count(peer.certificate_serial) != 0) {
      return make_error(Errc::denied, "serial " + peer.certificate_serial + " is on the MEF's revocation list");
    }
    return ok_result();
  };
  FailureLog failures;
  auto server = make_server(std::move(config));
  server->set_failure_observer(failures.observer());
  server->add_route(Method::get, {"serial"}, transport::Access::secure,
                    [](const transport::Session& session, const Request&, transport::Responder responder) {
                      responder.respond(Response::with_text(205, session.peer().certificate_serial));
                    });
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  const auto credentials = ClientCredentials::certificate(pki.credentials("client"), "server.example.net",
                                                          "server.example.net");
  {
    auto client = make_client_node();
    const CallResult accepted = request_and_wait(*server, *client, peer, credentials, get_request({"serial"}));
    REQUIRE(accepted.result->ok());
    CHECK(text_of((*accepted.result)->payload) == serial);
    CHECK(checked == std::vector<std::string>{serial});
  }
  revoked.insert(serial);
  auto client = make_client_node();
  CallResult refused;
  const auto served_before = server->stats().requests_served;
  client->request(peer, credentials, get_request({"serial"}), record_into(refused));
  REQUIRE(pump({server.get(), client.get()}, [&] { return refused.done; }));
  CHECK_FALSE(refused.result->ok());
  CHECK(server->stats().requests_served == served_before);  // never reached a handler
  INFO(failures.text());
  CHECK(failures.has(FailureKind::handshake_failed, kClientAeId));
  CHECK(failures.text().find("on the MEF's revocation list") != std::string::npos);
}

TEST_CASE("X.509: foreign CA, expired and AE-ID-less certificates are refused and reported") {
  TempDir dir;
  Pki pki(dir);
  FailureLog server_log;
  transport::NodeConfig config;
  config.x509 = pki.credentials("server");
  config.limits.handshake_timeout = 3s;
  auto server = make_server(std::move(config));
  server->set_failure_observer(server_log.observer());
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  std::size_t expected_failures = 0;
  for (const std::string name : {"rogueclient", "expired", "nouri"}) {
    CallResult refused;
    client->request(peer, ClientCredentials::certificate(pki.credentials(name), "", ""), get_request({"hello"}),
                    record_into(refused));
    ++expected_failures;
    REQUIRE(pump({server.get(), client.get()},
                 [&] { return refused.done && server_log.failures.size() >= expected_failures; }));
    INFO(name << ": " << server_log.text());
    REQUIRE_FALSE(refused.result->ok());
    CHECK(refused.result->error().code == Errc::unauthenticated);
  }
  INFO(server_log.text());
  CHECK(server->stats().handshakes_failed == 3);
  CHECK(server_log.text().find("carries no AE-ID") != std::string::npos);
  if (transport::compiled_backend() == transport::Backend::gnutls) {
    // GnuTLS verifies before our callback and libcoap logs why; we quote that line.
    CHECK(server_log.text().find("CA is unknown") != std::string::npos);
    CHECK(server_log.text().find("invalid usage date") != std::string::npos);
  } else {
    CHECK(server_log.text().find("certificate verify failed") != std::string::npos);
  }

  const CallResult good = request_and_wait(*server, *client, peer,
                                           ClientCredentials::certificate(pki.credentials("client"), "", ""),
                                           get_request({"hello"}));
  REQUIRE(good.result->ok());
}

TEST_CASE("X.509: the client refuses a server whose certificate names another peer") {
  TempDir dir;
  Pki pki(dir);
  transport::NodeConfig config;
  config.x509 = pki.credentials("server");
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const auto expecting_mef = ClientCredentials::certificate(pki.credentials("client"), "", "mef.example.net");
  const CallResult reply = request_and_wait(*server, *client, {"127.0.0.1", server->secure_port()}, expecting_mef,
                                            get_request({"hello"}));
  REQUIRE_FALSE(reply.result->ok());
  CHECK(reply.result->error().message.find("expected 'mef.example.net'") != std::string::npos);
}

TEST_CASE("X.509: stock coap-client-gnutls / -openssl with certificates, strict ECDHE-ECDSA-AES128-CCM8 client") {
  TempDir dir;
  Pki pki(dir);
  transport::NodeConfig config;
  config.x509 = pki.credentials("server");
  auto server = make_server(std::move(config));
  const std::string port = std::to_string(server->secure_port());
  BackgroundNode running(*server);
  for (const std::string program : {"coap-client-gnutls", "coap-client-openssl"}) {
    if (!have_program(program)) continue;
    const auto good = run_command({program, "-B", "5", "-c", pki.path("client.pem"), "-j", pki.path("client.key"),
                                   "-C", pki.path("ca.pem"), "coaps://127.0.0.1:" + port + "/hello"});
    INFO(program << ": " << good.output);
    CHECK(good.output.find("x509:" + kClientAeId) != std::string::npos);
    const auto rogue = run_command({program, "-B", "3", "-c", pki.path("rogueclient.pem"), "-j",
                                    pki.path("rogueclient.key"), "-C", pki.path("ca.pem"),
                                    "coaps://127.0.0.1:" + port + "/hello"});
    INFO(program << ": " << rogue.output);
    CHECK(rogue.output.find("x509:") == std::string::npos);
  }
  const auto strict = run_command({"openssl", "s_client", "-dtls1_2", "-connect", "127.0.0.1:" + port, "-cipher",
                                   "ECDHE-ECDSA-AES128-CCM8", "-cert", pki.path("client.pem"), "-key",
                                   pki.path("client.key"), "-CAfile", pki.path("ca.pem"), "-servername",
                                   "server.example.net"});
  INFO(strict.output);
  CHECK(strict.output.find("Cipher is ECDHE-ECDSA-AES128-CCM8") != std::string::npos);
  CHECK(strict.output.find("Verification: OK") != std::string::npos);
}

TEST_CASE("RPK: pinned raw public keys authenticate both ends (GnuTLS), unpinned keys are refused") {
  if (!transport::backend_supports_rpk()) {
    transport::NodeConfig config;
    config.rpk = transport::RpkCredentials{secret("x"), {}};
    auto refused = transport::Node::create(std::move(config));
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().code == Errc::unsupported);
    return;
  }
  TempDir dir;
  Pki pki(dir);
  const std::string id_a = pki.text("rpk_a.id");
  const std::string id_b = pki.text("rpk_b.id");
  FailureLog server_log;
  transport::NodeConfig config;
  config.rpk = transport::RpkCredentials{secret(pki.text("rpk_a.key")), {id_b}};
  auto server = make_server(std::move(config));
  server->set_failure_observer(server_log.observer());
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  const auto key_b =
      ClientCredentials::raw_public_key(transport::RpkCredentials{secret(pki.text("rpk_b.key")), {id_a}}, "");
  const CallResult good = request_and_wait(*server, *client, peer, key_b, get_request({"ekm"}));
  REQUIRE(good.result->ok());
  CHECK(text_of((*good.result)->payload) == good.client_export);
  CHECK(good.peer.kind == transport::PeerKind::rpk);
  CHECK(good.peer.value == id_a);

  const CallResult hello = request_and_wait(*server, *client, peer, key_b, get_request({"hello"}));
  REQUIRE(hello.result->ok());
  CHECK(text_of((*hello.result)->payload) == "rpk:" + id_b);

  // The server's own key is not pinned at the server: a client using it is refused.
  CallResult refused;
  client->request(peer,
                  ClientCredentials::raw_public_key(transport::RpkCredentials{secret(pki.text("rpk_a.key")), {id_a}},
                                                    ""),
                  get_request({"hello"}), record_into(refused));
  REQUIRE(pump({server.get(), client.get()}, [&] { return refused.done && !server_log.failures.empty(); }));
  REQUIRE_FALSE(refused.result->ok());
  INFO(server_log.text());
  CHECK(server_log.has(FailureKind::handshake_failed, id_a));
  CHECK(server_log.text().find("is not pinned") != std::string::npos);

  if (have_program("coap-client-gnutls")) {
    BackgroundNode running(*server);
    const auto stock = run_command({"coap-client-gnutls", "-B", "5", "-M", pki.path("rpk_b.key"),
                                    "coaps://127.0.0.1:" + std::to_string(server->secure_port()) + "/hello"});
    INFO(stock.output);
    CHECK(trim(stock.output).find("rpk:" + id_b) != std::string::npos);
  }
}

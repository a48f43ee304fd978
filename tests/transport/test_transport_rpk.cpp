// Raw public keys (RFC 7250) on an endpoint that serves every kind: PSK, certificates chosen by SNI and raw keys
// together; which raw keys get in is decided by NodeConfig::raw_key_lookup (like PSK identities), and the lookup's
// answer is the session's grant; our raw key can be set or replaced at run time. GnuTLS builds only.
#include <catch2/catch.hpp>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;

namespace {

// GET /grant answers "<peer AE-ID>|<local AE-ID>" of the session it arrived on.
void add_grant_route(transport::Node& server) {
  server.add_route(transport::Method::get, {"grant"}, transport::Access::secure,
                   [](const transport::Session& session, const transport::Request&, transport::Responder out) {
                     const auto& grant = session.grant();
                     out.respond(transport::Response::with_text(205, grant.peer_ae_id + "|" + grant.local_ae_id));
                   });
}

ClientCredentials raw_key_client(const Pki& pki, const std::string& key, std::set<std::string> pinned_servers) {
  return ClientCredentials::raw_public_key(
      transport::RpkCredentials{secret(pki.text(key + ".key")), std::move(pinned_servers)}, "");
}

// A lookup that pins the given key ids to AE-IDs, all reaching one local AE; the others are not found.
transport::RawKeyLookup pins(std::map<std::string, std::string> ae_by_key, std::vector<std::string>* asked = nullptr) {
  return [ae_by_key = std::move(ae_by_key), asked](const transport::RawKeyRequest& request)
             -> Result<transport::RawKeyGrant> {
    if (asked != nullptr) asked->push_back(std::string(request.key_id) + " sni=" + std::string(request.sni));
    auto it = ae_by_key.find(std::string(request.key_id));
    if (it == ae_by_key.end()) return make_error(Errc::not_found, "no pin for this key");
    return transport::RawKeyGrant{it->second, "CAE-local-rpk"};
  };
}

}  // namespace

TEST_CASE("RPK: one endpoint serves PSK and X.509 by server name and raw public keys together") {
  if (!transport::backend_supports_rpk()) return;  // Node::create refuses RPK there (test_transport_pki)
  TempDir dir;
  Pki pki(dir);
  const std::string id_a = pki.text("rpk_a.id");
  const std::string id_b = pki.text("rpk_b.id");
  transport::NodeConfig config;
  config.psk_lookup = psk_table({{"KeID-1", "psk key one"}});
  auto named = pki.credentials("server");
  named.local_ae_id = "CAE-named";
  config.x509_by_server_name.emplace("server.example.net", std::move(named));
  config.rpk = transport::RpkCredentials{secret(pki.text("rpk_a.key")), {}};
  std::vector<std::string> asked;
  config.raw_key_lookup = pins({{id_b, "CAE-rpk-peer"}}, &asked);
  auto server = make_server(std::move(config));
  add_grant_route(*server);
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  const auto psk_client = ClientCredentials::psk("KeID-1", secret("psk key one"), "");
  const CallResult psk = request_and_wait(*server, *client, peer, psk_client, get_request({"hello"}));
  REQUIRE(psk.result->ok());
  CHECK(text_of((*psk.result)->payload) == "psk:KeID-1");

  const auto x509 = ClientCredentials::certificate(pki.credentials("client"), "server.example.net", kServerAeId);
  const CallResult certificate = request_and_wait(*server, *client, peer, x509, get_request({"grant"}));
  REQUIRE(certificate.result->ok());
  CHECK(text_of((*certificate.result)->payload) == kClientAeId + "|CAE-named");
  CHECK(certificate.peer.kind == transport::PeerKind::x509);  // the X.509 client was shown the certificate

  // libcoap's raw-key client lists X.509 first among the server certificate types it takes: it is shown our raw key.
  const auto raw = raw_key_client(pki, "rpk_b", {id_a});
  const CallResult raw_key = request_and_wait(*server, *client, peer, raw, get_request({"grant"}));
  REQUIRE(raw_key.result->ok());
  CHECK(text_of((*raw_key.result)->payload) == "CAE-rpk-peer|CAE-local-rpk");
  CHECK(raw_key.peer.kind == transport::PeerKind::rpk);
  CHECK(raw_key.peer.value == id_a);
  CHECK(asked == std::vector<std::string>{id_b + " sni="});
  const CallResult identity = request_and_wait(*server, *client, peer, raw, get_request({"hello"}));
  CHECK(text_of((*identity.result)->payload) == "rpk:" + id_b);  // PeerIdentity stays the key id

  bool listed = false;
  for (const auto& session : server->live_sessions()) {
    if (session.peer.kind == transport::PeerKind::rpk) {
      listed = true;
      CHECK(session.credential_id == id_a);  // our raw key, as a client session names its own
      CHECK(session.grant.peer_ae_id == "CAE-rpk-peer");
    }
  }
  CHECK(listed);

  if (have_program("coap-client-gnutls")) {
    BackgroundNode running(*server);
    const std::string url = "coaps://127.0.0.1:" + std::to_string(server->secure_port()) + "/hello";
    const auto stock_raw = run_command({"coap-client-gnutls", "-B", "5", "-M", pki.path("rpk_b.key"), url});
    INFO(stock_raw.output);
    CHECK(stock_raw.output.find("rpk:" + id_b) != std::string::npos);
  }
}

TEST_CASE("RPK: a raw key the lookup refuses fails the handshake and is reported with its key id and reason") {
  if (!transport::backend_supports_rpk()) return;
  TempDir dir;
  Pki pki(dir);
  const std::string id_a = pki.text("rpk_a.id");
  const std::string id_b = pki.text("rpk_b.id");
  const std::string id_c = pki.text("rpk_c.id");
  FailureLog server_log;
  transport::NodeConfig config;
  // The pinned set of `rpk` would let rpk_c in: the lookup decides instead.
  config.rpk = transport::RpkCredentials{secret(pki.text("rpk_a.key")), {id_c}};
  config.raw_key_lookup = pins({{id_b, "CAE-rpk-peer"}});
  auto server = make_server(std::move(config));
  server->set_failure_observer(server_log.observer());
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  CallResult refused;
  client->request(peer, raw_key_client(pki, "rpk_c", {id_a}), get_request({"hello"}), record_into(refused));
  REQUIRE(pump({server.get(), client.get()}, [&] { return refused.done && !server_log.failures.empty(); }));
  REQUIRE_FALSE(refused.result->ok());
  INFO(server_log.text());
  CHECK(server_log.has(transport::FailureKind::handshake_failed, id_c));
  CHECK(server_log.text().find("raw public key " + id_c + " refused: no pin for this key") != std::string::npos);

  const CallResult pinned = request_and_wait(*server, *client, peer, raw_key_client(pki, "rpk_b", {id_a}),
                                             get_request({"hello"}));
  REQUIRE(pinned.result->ok());
  CHECK(text_of((*pinned.result)->payload) == "rpk:" + id_b);
}

namespace {

// A CoAP GET /hello (CON, message id 0x1234) written to gnutls-cli's stdin; the payload marker and '\n' after the
// options are a payload that GET ignores, and a line gnutls-cli sends as one datagram.
const std::string kCoapGetHello = std::string("\x40\x01\x12\x34\xb5hello\xff\n", 12);

// The stock gnutls-cli over DTLS, offering raw public keys only (client and server certificate types).
CommandResult gnutls_cli_raw_key(const Pki& pki, const std::string& key, std::uint16_t port) {
  return run_command({"timeout", "10", "gnutls-cli", "--udp", "--port", std::to_string(port),
                      "--priority", "NORMAL:-CTYPE-ALL:+CTYPE-CLI-RAWPK:+CTYPE-SRV-RAWPK",
                      "--rawpkkeyfile", pki.path(key + ".key").string(), "--rawpkfile",
                      pki.path(key + ".pub").string(), "--no-ca-verification", "127.0.0.1"},
                     kCoapGetHello);
}

}  // namespace

TEST_CASE("RPK: the stock gnutls-cli with raw public keys only gets in exactly when the lookup pins its key") {
  if (!transport::backend_supports_rpk() || !have_program("gnutls-cli")) {
    WARN("raw public keys need the GnuTLS build and gnutls-cli (gnutls-bin, scripts/install-deps); skipped");
    return;
  }
  TempDir dir;
  Pki pki(dir);
  const std::string id_b = pki.text("rpk_b.id");
  const std::string id_c = pki.text("rpk_c.id");
  transport::NodeConfig config;
  config.x509 = pki.credentials("server");  // an endpoint that also serves certificates
  config.rpk = transport::RpkCredentials{secret(pki.text("rpk_a.key")), {}};
  config.raw_key_lookup = pins({{id_b, "CAE-gnutls-cli"}});
  auto server = make_server(std::move(config));
  FailureLog server_log;
  server->set_failure_observer(server_log.observer());
  {
    BackgroundNode running(*server);
    const auto pinned = gnutls_cli_raw_key(pki, "rpk_b", server->secure_port());
    INFO(pinned.output);
    CHECK(pinned.output.find("Handshake was completed") != std::string::npos);
    CHECK(pinned.output.find("Raw Public Key") != std::string::npos);
    CHECK(pinned.output.find("rpk:" + id_b) != std::string::npos);  // the CoAP answer

    const auto unpinned = gnutls_cli_raw_key(pki, "rpk_c", server->secure_port());
    INFO(unpinned.output);
    CHECK(unpinned.output.find("Handshake was completed") == std::string::npos);
    CHECK(unpinned.output.find("rpk:") == std::string::npos);
  }
  INFO(server_log.text());
  CHECK(server_log.has(transport::FailureKind::handshake_failed, id_c));
}

TEST_CASE("RPK: set_server_raw_key gives a node its raw key at run time and replaces it from the next handshake") {
  if (!transport::backend_supports_rpk()) {
    transport::NodeConfig config;
    config.psk_lookup = psk_table({});
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = 0;
    auto node = transport::Node::create(std::move(config));
    REQUIRE(node.ok());
    CHECK((*node)->set_server_raw_key(transport::RpkCredentials{secret("x"), {}}).error().code == Errc::unsupported);
    return;
  }
  TempDir dir;
  Pki pki(dir);
  const std::string id_a = pki.text("rpk_a.id");
  const std::string id_c = pki.text("rpk_c.id");
  transport::NodeConfig config;
  config.psk_lookup = psk_table({{"KeID-1", "psk key one"}});  // a PSK-only node at first
  config.raw_key_lookup = pins({{pki.text("rpk_b.id"), "CAE-rpk-peer"}});
  auto server = make_server(std::move(config));
  FailureLog server_log;
  server->set_failure_observer(server_log.observer());
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  {
    auto client = make_client_node();
    CallResult refused;
    client->request(peer, raw_key_client(pki, "rpk_b", {id_a}), get_request({"hello"}), record_into(refused));
    REQUIRE(pump({server.get(), client.get()}, [&] { return refused.done; }));
    REQUIRE_FALSE(refused.result->ok());
    INFO(server_log.text());
    CHECK(server_log.text().find("this node has no raw public key") != std::string::npos);
  }
  CHECK(server->set_server_raw_key(transport::RpkCredentials{secret("not a key"), {}}).error().code ==
        Errc::invalid_argument);

  REQUIRE(server->set_server_raw_key(transport::RpkCredentials{secret(pki.text("rpk_a.key")), {}}).ok());
  auto client = make_client_node();
  const auto pinning_a = raw_key_client(pki, "rpk_b", {id_a});
  const CallResult first = request_and_wait(*server, *client, peer, pinning_a, get_request({"hello"}));
  REQUIRE(first.result->ok());
  CHECK(first.peer.value == id_a);

  REQUIRE(server->set_server_raw_key(transport::RpkCredentials{secret(pki.text("rpk_c.key")), {}}).ok());
  // The live session keeps the key it was set up with.
  const CallResult same_session = request_and_wait(*server, *client, peer, pinning_a, get_request({"hello"}));
  REQUIRE(same_session.result->ok());
  CHECK(same_session.peer.value == id_a);
  // A new handshake is shown the new key: a client that pinned the old one refuses it, one that pinned the new gets in.
  auto fresh = make_client_node();
  CallResult old_pin;
  fresh->request(peer, pinning_a, get_request({"hello"}), record_into(old_pin));
  REQUIRE(pump({server.get(), fresh.get()}, [&] { return old_pin.done; }));
  REQUIRE_FALSE(old_pin.result->ok());
  const CallResult new_pin = request_and_wait(*server, *fresh, peer, raw_key_client(pki, "rpk_b", {id_c}),
                                              get_request({"hello"}));
  REQUIRE(new_pin.result->ok());
  CHECK(new_pin.peer.value == id_c);
  // PSK still works on the same endpoint.
  const auto psk_client = ClientCredentials::psk("KeID-1", secret("psk key one"), "");
  const CallResult psk = request_and_wait(*server, *fresh, peer, psk_client, get_request({"hello"}));
  CHECK(psk.result->ok());
}

TEST_CASE("RPK: a removed pin refuses the next handshake and close_sessions_with_raw_key ends the live sessions") {
  if (!transport::backend_supports_rpk()) return;
  TempDir dir;
  Pki pki(dir);
  const std::string id_a = pki.text("rpk_a.id");
  const std::string id_b = pki.text("rpk_b.id");
  auto pinned = std::make_shared<std::map<std::string, std::string>>();
  (*pinned)[id_b] = "CAE-rpk-peer";
  transport::NodeConfig config;
  config.rpk = transport::RpkCredentials{secret(pki.text("rpk_a.key")), {}};
  config.raw_key_lookup = [pinned](const transport::RawKeyRequest& request) -> Result<transport::RawKeyGrant> {
    auto it = pinned->find(std::string(request.key_id));
    if (it == pinned->end()) return make_error(Errc::not_found, "not pinned");
    return transport::RawKeyGrant{it->second, ""};
  };
  auto server = make_server(std::move(config));
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  const auto credentials = raw_key_client(pki, "rpk_b", {id_a});

  auto client = make_client_node();
  REQUIRE(request_and_wait(*server, *client, peer, credentials, get_request({"hello"})).result->ok());
  REQUIRE(server->stats().live_server_sessions == 1);
  // The daemon's removal: the lookup answers not_found from now on, and the live session of that key is closed.
  pinned->clear();
  CHECK(server->close_sessions_with_raw_key(id_a) == 0);  // our own key names no peer of the server
  CHECK(server->close_sessions_with_raw_key(id_b) == 1);
  REQUIRE(pump({server.get(), client.get()}, [&] { return server->stats().live_server_sessions == 0; }));
  CallResult refused;
  client->request(peer, credentials, get_request({"hello"}), record_into(refused));
  REQUIRE(pump({server.get(), client.get()}, [&] { return refused.done; }));
  CHECK_FALSE(refused.result->ok());

  // The client side: its sessions with a server whose key it no longer accepts.
  (*pinned)[id_b] = "CAE-rpk-peer";
  auto other = make_client_node();
  REQUIRE(request_and_wait(*server, *other, peer, credentials, get_request({"hello"})).result->ok());
  REQUIRE(other->stats().live_client_sessions == 1);
  CHECK(other->close_sessions_with_raw_key(id_b) == 0);
  CHECK(other->close_sessions_with_raw_key(id_a) == 1);
  REQUIRE(pump({server.get(), other.get()}, [&] { return other->stats().live_client_sessions == 0; }));
}

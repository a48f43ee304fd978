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

  const CallResult psk = request_and_wait(*server, *client, peer, ClientCredentials::psk("KeID-1", secret("psk key one"), ""),
                                          get_request({"hello"}));
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

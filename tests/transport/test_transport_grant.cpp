// Session::grant(): whom a server session serves is decided in its handshake and kept with the session. PSK: what
// the PskLookup answered for (identity, SNI); X.509: the client certificate's AE-ID and X509Credentials::local_ae_id
// of the certificate the handshake presented (by SNI, or the default one). Request handlers read it back.
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

std::string grant_seen(transport::Node& server, const transport::ClientCredentials& credentials) {
  auto client = make_client_node();
  const CallResult reply = request_and_wait(server, *client, {"127.0.0.1", server.secure_port()}, credentials,
                                            get_request({"grant"}));
  REQUIRE(reply.result);
  INFO((reply.result->ok() ? std::string("ok") : reply.result->error().to_string()));
  REQUIRE(reply.result->ok());
  REQUIRE((*reply.result)->code == 205);
  return text_of((*reply.result)->payload);
}

}  // namespace

TEST_CASE("Session grant: a PSK session carries what the lookup granted for its identity and SNI") {
  // One identity, two local AEs told apart by SNI; the lookup also grants by identity alone ("" SNI).
  transport::NodeConfig config;
  config.psk_lookup = [](const transport::PskRequest& request) -> Result<transport::PskGrant> {
    if (request.identity != "KeID-1@mef.example.net") return make_error(Errc::not_found, "unknown identity");
    if (request.sni == "CAE-pump") return transport::PskGrant{secret("pump key"), "CAE-meter", "CAE-pump"};
    if (request.sni == "CAE-valve") return transport::PskGrant{secret("valve key"), "CAE-meter", "CAE-valve"};
    if (request.sni.empty()) return transport::PskGrant{secret("bare key"), "", ""};
    return make_error(Errc::denied, "unknown server name");
  };
  auto server = make_server(std::move(config));
  add_grant_route(*server);

  CHECK(grant_seen(*server, ClientCredentials::psk("KeID-1@mef.example.net", secret("pump key"), "CAE-pump")) ==
        "CAE-meter|CAE-pump");
  CHECK(grant_seen(*server, ClientCredentials::psk("KeID-1@mef.example.net", secret("valve key"), "CAE-valve")) ==
        "CAE-meter|CAE-valve");
  // A lookup that grants nothing: the session still authenticates, and says so (a handler refuses it).
  CHECK(grant_seen(*server, ClientCredentials::psk("KeID-1@mef.example.net", secret("bare key"), "")) == "|");
}

TEST_CASE("Session grant: an X.509 session names the client certificate's AE-ID and the presented certificate's AE") {
  TempDir dir;
  Pki pki(dir);
  const auto client = ClientCredentials::certificate(pki.credentials("client"), "server.example.net", kServerAeId);

  // The default certificate (both backends): its local_ae_id.
  {
    transport::NodeConfig config;
    config.x509 = pki.credentials("server");
    config.x509->local_ae_id = kServerAeId;
    auto server = make_server(std::move(config));
    add_grant_route(*server);
    CHECK(grant_seen(*server, client) == kClientAeId + "|" + kServerAeId);
  }
  if (!transport::backend_selects_server_certificates()) return;

  // By SNI (GnuTLS): the local AE registered with the certificate the SNI selected, at creation or later.
  transport::NodeConfig config;
  auto named = pki.credentials("server");
  named.local_ae_id = "CAE-named-at-start";
  config.x509_by_server_name.emplace("one.example.net", std::move(named));
  auto server = make_server(std::move(config));
  add_grant_route(*server);
  auto later = pki.credentials("server");
  later.local_ae_id = "CAE-named-later";
  REQUIRE(server->set_server_certificate("two.example.net", std::move(later)).ok());

  CHECK(grant_seen(*server, ClientCredentials::certificate(pki.credentials("client"), "one.example.net",
                                                           kServerAeId)) == kClientAeId + "|CAE-named-at-start");
  CHECK(grant_seen(*server, ClientCredentials::certificate(pki.credentials("client"), "two.example.net",
                                                           kServerAeId)) == kClientAeId + "|CAE-named-later");
}

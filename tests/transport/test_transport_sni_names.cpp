// SNI for AE-IDs that are not DNS names (crypto::server_name_for_ae_id, docs/PROTOCOL.md §2): a GnuTLS server
// refuses an SNI with '/', '_' or '~' ("A disallowed SNI server name has been received"), so an absolute AE-ID
// sent as it is never reaches its certificate; its mapped name does, and selects that AE's certificate.
#include <catch2/catch.hpp>

#include "dauth/crypto/identifiers.hpp"

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;

namespace {

struct Outcome {
  bool done = false;
  std::optional<Result<transport::Response>> result;
  transport::PeerIdentity server;
};

Outcome ask(transport::Node& server, const Pki& pki, const std::string& sni,
            std::chrono::milliseconds handshake_timeout) {
  transport::NodeConfig client_config;
  client_config.limits.handshake_timeout = handshake_timeout;
  auto client = transport::Node::create(std::move(client_config));
  REQUIRE(client.ok());
  transport::Request request;
  request.method = transport::Method::get;
  request.path = {"hello"};
  Outcome outcome;
  (*client)->request({"127.0.0.1", server.secure_port()},
                     ClientCredentials::certificate(pki.credentials("client"), sni, kServerAeId), request,
                     [&outcome](Result<transport::Response> result, const transport::Session* session) {
                       outcome.done = true;
                       outcome.result.emplace(std::move(result));
                       if (session != nullptr) outcome.server = session->peer();
                     });
  pump({&server, client->get()}, [&] { return outcome.done; });
  return outcome;
}

}  // namespace

TEST_CASE("SNI names: an absolute AE-ID's certificate is reached by its mapped server name only") {
  if (!transport::backend_selects_server_certificates()) return;  // OpenSSL builds present one certificate
  TempDir dir;
  Pki pki(dir);
  const std::string server_name = crypto::server_name_for_ae_id(kServerAeId);
  REQUIRE(server_name != kServerAeId);  // "//m2m.example.net/in-cse/CAE-server-01" is no DNS name
  transport::NodeConfig config;  // no default certificate: only a name in the table gets a handshake
  config.x509_by_server_name.emplace(server_name, pki.credentials("server"));
  auto server = make_server(std::move(config));

  const Outcome mapped = ask(*server, pki, server_name, 10s);
  REQUIRE(mapped.done);
  INFO((mapped.result->ok() ? std::string("ok") : mapped.result->error().to_string()));
  REQUIRE(mapped.result->ok());
  CHECK(text_of((*mapped.result)->payload) == "x509:" + kClientAeId);
  CHECK(mapped.server.value == kServerAeId);

  // The AE-ID itself as SNI: the server's TLS library drops the ClientHello (the client sees no answer) before
  // any certificate is chosen.
  const Outcome raw = ask(*server, pki, kServerAeId, 2s);
  REQUIRE(raw.done);
  CHECK_FALSE(raw.result->ok());
}

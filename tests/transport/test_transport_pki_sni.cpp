// Server certificates chosen per handshake by SNI (NodeConfig::x509_by_server_name, Node::set_server_certificate):
// two names on one endpoint, a replaced certificate served from the next handshake while a live session with the
// other name stays, unknown names (refused, or the default certificate), a node that gets its first certificate
// after creation, and the stock coap-client-gnutls. libcoap 4.3.1's own SNI callback would keep serving the first
// answer per name (docs/transport.md §3): the replacement test fails with it.
#include <catch2/catch.hpp>

#include <optional>

#include "dauth/crypto/x509.hpp"

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::Method;
using transport::Request;
using transport::Response;

namespace {

// Plain AE-IDs: GnuTLS servers refuse an SNI with characters other than letters, digits, '-' and '.' (the
// handshake fails with "A disallowed SNI server name has been received"), so SP-relative AE-IDs cannot be SNI.
const std::string kAeA = "CAE-sni-a";
const std::string kAeB = "CAE-sni-b";

// Leaf certificates for the two AEs (and a renewal of A with a new key), issued by the Pki's ca.
void make_ae_certificates(const Pki& pki) {
  const char* script = R"SH(
set -e
cd "$1"
leaf() {
  openssl ecparam -name prime256v1 -genkey -noout -out "$1.key" 2>/dev/null
  printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=URI:%s\n' "$2" > "$1.ext"
  openssl req -new -key "$1.key" -subj "/CN=$1" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile "$1.ext" \
    -out "$1.pem" 2>/dev/null
}
leaf ae_a "$2"
leaf ae_b "$3"
leaf ae_a_renewed "$2"
echo leaves-ok
)SH";
  const auto made = run_command({"sh", "-c", script, "leaves", pki.dir.string(), kAeA, kAeB});
  REQUIRE(made.output.find("leaves-ok") != std::string::npos);
}

std::string serial_of(const Pki& pki, const std::string& name) {
  auto certificate = crypto::Certificate::parse(ByteView::of(pki.text(name + ".pem")));
  REQUIRE(certificate.ok());
  return certificate->serial_hex();
}

// One request from a fresh client node (a fresh handshake) naming `sni` and expecting `expected` as the server.
CallResult ask(transport::Node& server, const Pki& pki, const std::string& sni, const std::string& expected,
               std::chrono::milliseconds handshake_timeout = 10s) {
  transport::Limits limits;
  limits.handshake_timeout = handshake_timeout;
  auto client = make_client_node(limits);
  return request_and_wait(server, *client, {"127.0.0.1", server.secure_port()},
                          ClientCredentials::certificate(pki.credentials("client"), sni, expected),
                          get_request({"hello"}));
}

}  // namespace

TEST_CASE("X.509 by SNI: two certificates on one endpoint, each handshake gets the one its SNI names") {
  TempDir dir;
  Pki pki(dir);
  make_ae_certificates(pki);
  if (!transport::backend_selects_server_certificates()) {
    transport::NodeConfig config;
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = 0;
    config.x509_by_server_name.emplace(kAeA, pki.credentials("ae_a"));
    auto refused = transport::Node::create(std::move(config));
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().code == Errc::unsupported);
    return;
  }
  transport::NodeConfig config;
  config.x509_by_server_name.emplace(kAeA, pki.credentials("ae_a"));
  config.x509_by_server_name.emplace(kAeB, pki.credentials("ae_b"));
  auto server = make_server(std::move(config));

  for (const auto& [name, file] : {std::pair{kAeA, "ae_a"}, std::pair{kAeB, "ae_b"}}) {
    const CallResult reply = ask(*server, pki, name, name);
    INFO(name);
    REQUIRE(reply.result->ok());
    CHECK(text_of((*reply.result)->payload) == "x509:" + kClientAeId);
    CHECK(reply.peer.value == name);
    CHECK(reply.peer.certificate_serial == serial_of(pki, file));
  }
  // SNI A while expecting B: A's certificate came, so the client refuses it.
  const CallResult crossed = ask(*server, pki, kAeA, kAeB);
  REQUIRE_FALSE(crossed.result->ok());
}

TEST_CASE("X.509 by SNI: a replaced certificate is served from the next handshake, other live sessions stay") {
  if (!transport::backend_selects_server_certificates()) return;  // refusal: the test above
  TempDir dir;
  Pki pki(dir);
  make_ae_certificates(pki);
  transport::NodeConfig config;
  config.x509_by_server_name.emplace(kAeA, pki.credentials("ae_a"));
  config.x509_by_server_name.emplace(kAeB, pki.credentials("ae_b"));
  auto server = make_server(std::move(config));

  // A live session naming B, kept across the replacement.
  auto keeper = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  const auto to_b = ClientCredentials::certificate(pki.credentials("client"), kAeB, kAeB);
  const CallResult before = request_and_wait(*server, *keeper, peer, to_b, get_request({"ekm"}));
  REQUIRE(before.result->ok());

  // A's name seen once (libcoap's SNI callback would cache this answer for the context's lifetime).
  const CallResult first = ask(*server, pki, kAeA, kAeA);
  REQUIRE(first.result->ok());
  CHECK(first.peer.certificate_serial == serial_of(pki, "ae_a"));

  REQUIRE(server->set_server_certificate(kAeA, pki.credentials("ae_a_renewed")).ok());
  const CallResult renewed = ask(*server, pki, kAeA, kAeA);
  REQUIRE(renewed.result->ok());
  CHECK(renewed.peer.value == kAeA);
  CHECK(renewed.peer.certificate_serial == serial_of(pki, "ae_a_renewed"));

  // The session with B is the same one: same exporter, no new handshake.
  const CallResult after = request_and_wait(*server, *keeper, peer, to_b, get_request({"ekm"}));
  REQUIRE(after.result->ok());
  CHECK(text_of((*after.result)->payload) == text_of((*before.result)->payload));
  CHECK(after.client_export == before.client_export);

  // A key that is not the certificate's, and other trust anchors, are refused; the old entry stays.
  auto mismatched = pki.credentials("ae_a_renewed");
  mismatched.private_key_pem = secret(pki.text("ae_b.key"));
  CHECK(server->set_server_certificate(kAeA, std::move(mismatched)).error().code == Errc::invalid_argument);
  auto foreign = pki.credentials("ae_a_renewed");
  foreign.trust_anchors_pem = pki.text("rogue.pem");
  CHECK(server->set_server_certificate(kAeA, std::move(foreign)).error().code == Errc::invalid_argument);
  CHECK(ask(*server, pki, kAeA, kAeA).peer.certificate_serial == serial_of(pki, "ae_a_renewed"));

  // Removed: A is now an unknown name (no default here: refused).
  CHECK(server->remove_server_certificate(kAeA));
  CHECK_FALSE(ask(*server, pki, kAeA, kAeA).result->ok());
}

TEST_CASE("X.509 by SNI: a handshake that presented a certificate completes after its replacement") {
  if (!transport::backend_selects_server_certificates()) return;
  TempDir dir;
  Pki pki(dir);
  make_ae_certificates(pki);
  transport::Node* server_node = nullptr;
  std::optional<Result<void>> replaced;
  transport::NodeConfig config;
  config.x509_by_server_name.emplace(kAeA, pki.credentials("ae_a"));
  // Checking the client's certificate comes after the server sent its own and signed with its key: the
  // certificate is replaced right then, in the middle of this handshake.
  config.peer_check = [&](const transport::PeerIdentity&) -> Result<void> {
    if (!replaced) replaced = server_node->set_server_certificate(kAeA, pki.credentials("ae_a_renewed"));
    return ok_result();
  };
  auto server = make_server(std::move(config));
  server_node = server.get();

  const CallResult begun_before = ask(*server, pki, kAeA, kAeA);
  REQUIRE(replaced.has_value());
  REQUIRE(replaced->ok());
  REQUIRE(begun_before.result->ok());
  CHECK(begun_before.peer.certificate_serial == serial_of(pki, "ae_a"));
  CHECK(text_of((*begun_before.result)->payload) == "x509:" + kClientAeId);

  const CallResult next = ask(*server, pki, kAeA, kAeA);
  REQUIRE(next.result->ok());
  CHECK(next.peer.certificate_serial == serial_of(pki, "ae_a_renewed"));
}

TEST_CASE("X.509 by SNI: an unknown name is refused without a default and gets the default with one") {
  if (!transport::backend_selects_server_certificates()) return;
  TempDir dir;
  Pki pki(dir);
  make_ae_certificates(pki);
  {
    FailureLog log;
    transport::NodeConfig config;
    config.x509_by_server_name.emplace(kAeA, pki.credentials("ae_a"));
    auto server = make_server(std::move(config));
    server->set_failure_observer(log.observer());
    const CallResult unknown = ask(*server, pki, "CAE-nobody", "");
    REQUIRE_FALSE(unknown.result->ok());
    INFO(log.text());
    CHECK(log.text().find("no server certificate for the server name 'CAE-nobody'") != std::string::npos);
    CHECK(ask(*server, pki, kAeA, kAeA).result->ok());  // the endpoint still serves the known name
  }
  {
    transport::NodeConfig config;
    config.x509 = pki.credentials("server");  // e.g. an MEF's FQDN certificate
    config.x509_by_server_name.emplace(kAeA, pki.credentials("ae_a"));
    auto server = make_server(std::move(config));
    const CallResult unknown = ask(*server, pki, "CAE-nobody", "");
    REQUIRE(unknown.result->ok());
    CHECK(unknown.peer.value == kServerAeId);
    CHECK(ask(*server, pki, kAeA, kAeA).peer.value == kAeA);
  }
}

TEST_CASE("X.509 by SNI: a PSK-only node presents certificates set after its start") {
  if (!transport::backend_selects_server_certificates()) return;
  TempDir dir;
  Pki pki(dir);
  make_ae_certificates(pki);
  transport::NodeConfig config;
  config.psk_lookup = psk_table({{"psk-client", "0123456789abcdef"}});
  auto server = make_server(std::move(config));
  // No certificate yet: the client offers only certificate suites and gets no answer (2 s suffice on loopback).
  CHECK_FALSE(ask(*server, pki, kAeB, kAeB, 2s).result->ok());

  REQUIRE(server->set_server_certificate(kAeB, pki.credentials("ae_b")).ok());
  const CallResult reply = ask(*server, pki, kAeB, kAeB);
  REQUIRE(reply.result->ok());
  CHECK(reply.peer.value == kAeB);
  CHECK(text_of((*reply.result)->payload) == "x509:" + kClientAeId);

  // PSK keeps working on the same endpoint.
  auto client = make_client_node();
  const CallResult psk = request_and_wait(*server, *client, {"127.0.0.1", server->secure_port()},
                                          ClientCredentials::psk("psk-client", secret("0123456789abcdef"), kAeB),
                                          get_request({"hello"}));
  REQUIRE(psk.result->ok());
  CHECK(text_of((*psk.result)->payload) == "psk:psk-client");
}

TEST_CASE("X.509 by SNI: stock coap-client-gnutls gets the certificate of the name it sends") {
  if (!transport::backend_selects_server_certificates() || !have_program("coap-client-gnutls")) return;
  TempDir dir;
  Pki pki(dir);
  make_ae_certificates(pki);
  transport::NodeConfig config;
  config.x509_by_server_name.emplace(kAeA, pki.credentials("ae_a"));
  // coap-client 4.3.1 sends "localhost" as SNI for coaps://127.0.0.1 (examples/coap-client.c, setup_pki).
  config.x509_by_server_name.emplace("localhost", pki.credentials("ae_b"));
  auto server = make_server(std::move(config));
  const std::string port = std::to_string(server->secure_port());
  BackgroundNode running(*server);
  const auto stock = run_command({"coap-client-gnutls", "-B", "5", "-v", "6", "-c", pki.path("client.pem"), "-j",
                                  pki.path("client.key"), "-C", pki.path("ca.pem"),
                                  "coaps://127.0.0.1:" + port + "/hello"});
  INFO(stock.output);
  CHECK(stock.output.find("x509:" + kClientAeId) != std::string::npos);
  CHECK(stock.output.find("CN '" + kAeB + "' presented by server") != std::string::npos);
}

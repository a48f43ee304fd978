// Private keys in a PKCS#11 token (a throwaway SoftHSM2 token): DTLS server and client authentication with keys the
// process never holds, certificates by server name, raw public keys, and the errors of a wrong PIN, a missing token
// and a missing key.
#include <catch2/catch.hpp>

#include <memory>

#include "softhsm_token.hpp"
#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;

namespace {

// The test PKI's keys imported into a fresh token; credentials name them by URI and carry no key bytes.
struct TokenPki {
  TokenPki() : pki(dir) {
    for (const auto& [name, id] : {std::pair<std::string, std::string>{"server", "01"}, {"client", "02"},
                                   {"rpk_a", "03"}, {"rpk_b", "04"}}) {
      uris[name] = token.import_private_key(pki.path(name + ".key"), name, id);
    }
  }
  transport::TokenKey key(const std::string& name, const std::string& pin) const {
    return transport::TokenKey{uris.at(name), std::make_shared<const SecretBuffer>(secret(pin))};
  }
  transport::X509Credentials credentials(const std::string& name) const {
    transport::X509Credentials credentials{pki.text(name + ".pem"), SecretBuffer(), pki.text("ca.pem")};
    credentials.token_key = key(name, token.pin());
    return credentials;
  }
  TempDir dir;
  Pki pki;
  ThrowawayToken token;
  std::map<std::string, std::string> uris;
};

}  // namespace

TEST_CASE("Token keys: X.509 server and client keys in a SoftHSM token authenticate both ends") {
  TokenPki keys;
  transport::NodeConfig config;
  config.x509 = keys.credentials("server");
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  const auto credentials =
      ClientCredentials::certificate(keys.credentials("client"), "server.example.net", "server.example.net");
  const CallResult hello = request_and_wait(*server, *client, peer, credentials, get_request({"hello"}));
  REQUIRE(hello.result->ok());
  CHECK(text_of((*hello.result)->payload) == "x509:" + kClientAeId);
  CHECK(hello.peer.value == kServerAeId);
  // Both ends derive the same exporter: the handshake really ran with the token's signatures.
  const CallResult ekm = request_and_wait(*server, *client, peer, credentials, get_request({"ekm"}));
  REQUIRE(ekm.result->ok());
  CHECK(text_of((*ekm.result)->payload) == ekm.client_export);

  // A certificate by server name with its key in the token, set at run time.
  REQUIRE(server->set_server_certificate("named.example.net", keys.credentials("server")).ok());
  auto second_client = make_client_node();
  const CallResult named = request_and_wait(
      *server, *second_client, peer,
      ClientCredentials::certificate(keys.credentials("client"), "named.example.net", "server.example.net"),
      get_request({"hello"}));
  REQUIRE(named.result->ok());
  CHECK(named.peer.value == kServerAeId);
}

TEST_CASE("Token keys: raw public keys in the token, pinned on both sides") {
  TokenPki keys;
  transport::NodeConfig config;
  config.rpk = transport::RpkCredentials{SecretBuffer(), {keys.pki.text("rpk_b.id")}};
  config.rpk->token_key = keys.key("rpk_a", keys.token.pin());
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  transport::RpkCredentials ours{SecretBuffer(), {keys.pki.text("rpk_a.id")}};
  ours.token_key = keys.key("rpk_b", keys.token.pin());
  const CallResult hello =
      request_and_wait(*server, *client, {"127.0.0.1", server->secure_port()},
                       ClientCredentials::raw_public_key(std::move(ours), ""), get_request({"hello"}));
  REQUIRE(hello.result->ok());
  CHECK(text_of((*hello.result)->payload) == "rpk:" + keys.pki.text("rpk_b.id"));
  CHECK(hello.peer.value == keys.pki.text("rpk_a.id"));
  // The key id a configuration check reports is the one peers pin.
  auto id = transport::check_token_key(keys.key("rpk_a", keys.token.pin()));
  REQUIRE(id.ok());
  CHECK(*id == keys.pki.text("rpk_a.id"));
}

TEST_CASE("Token keys: a wrong PIN a missing token and a missing key are refused naming the key never the PIN") {
  TokenPki keys;
  const std::string wrong_pin = "9999-wrong-pin";
  auto server_with = [&](transport::X509Credentials credentials) {
    transport::NodeConfig config;
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = 0;
    config.x509 = std::move(credentials);
    return transport::Node::create(std::move(config));
  };

  auto wrong = keys.credentials("server");
  wrong.token_key = keys.key("server", wrong_pin);
  auto refused = server_with(std::move(wrong));
  REQUIRE_FALSE(refused.ok());
  INFO(refused.error().message);
  CHECK(refused.error().message.find(keys.uris.at("server")) != std::string::npos);
  CHECK(refused.error().message.find("refused the PIN") != std::string::npos);
  CHECK(refused.error().message.find(wrong_pin) == std::string::npos);
  // check_token_key says the same with its own code, before anything is built (a reload's check).
  auto checked = transport::check_token_key(keys.key("server", wrong_pin));
  REQUIRE_FALSE(checked.ok());
  CHECK(checked.error().code == Errc::permission);

  auto absent_token = keys.credentials("server");
  absent_token.token_key->uri = "pkcs11:token=no-such-token;object=server;type=private";
  auto no_token = server_with(std::move(absent_token));
  REQUIRE_FALSE(no_token.ok());
  INFO(no_token.error().message);
  CHECK(no_token.error().message.find("pkcs11:token=no-such-token") != std::string::npos);
  CHECK(no_token.error().message.find("no token matches") != std::string::npos);
  auto checked_absent = transport::check_token_key(transport::TokenKey{
      "pkcs11:token=no-such-token;object=server;type=private", std::make_shared<const SecretBuffer>(secret("x"))});
  REQUIRE_FALSE(checked_absent.ok());
  CHECK(checked_absent.error().code == Errc::not_found);

  auto absent_key = keys.credentials("server");
  absent_key.token_key->uri = keys.token.private_key_uri("no-such-key");
  auto no_key = server_with(std::move(absent_key));
  REQUIRE_FALSE(no_key.ok());
  INFO(no_key.error().message);
  CHECK(no_key.error().message.find("no such private key in the token") != std::string::npos);

  // A URI carrying a PIN is refused before any log could quote it.
  auto with_pin = keys.credentials("server");
  with_pin.token_key->uri = keys.uris.at("server") + "?pin-value=" + keys.token.pin();
  auto pin_in_uri = server_with(std::move(with_pin));
  REQUIRE_FALSE(pin_in_uri.ok());
  CHECK(pin_in_uri.error().message.find(keys.token.pin()) == std::string::npos);

  // The right PIN still works after the refusals (the token did not lock it: one try per refusal).
  CHECK(server_with(keys.credentials("server")).ok());
}

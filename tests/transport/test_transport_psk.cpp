// DTLS-PSK over loopback: our server <-> our client, stock libcoap clients, a strict CCM_8-only OpenSSL client,
// and the refusals (unknown identity, wrong key) with their reports (PROTOCOL.md §2, docs/transport.md §2).
#include <catch2/catch.hpp>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;
using transport::FailureKind;

namespace {

const std::map<std::string, std::string> kKeys{{"CAE-alpha", "alpha-secret-key-0123456789abcdef"},
                                               {"CAE-beta", "beta-secret-key-0123456789abcdef!"}};

}  // namespace

TEST_CASE("PSK: our client and server agree on identity and RFC 5705 export") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  const auto credentials = ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), "server.example.net");

  const CallResult hello = request_and_wait(*server, *client, peer, credentials, get_request({"hello"}));
  REQUIRE(hello.result->ok());
  CHECK((*hello.result)->code == 205);
  CHECK(text_of((*hello.result)->payload) == "psk:CAE-alpha");

  const CallResult ekm = request_and_wait(*server, *client, peer, credentials, get_request({"ekm"}));
  REQUIRE(ekm.result->ok());
  const std::string server_export = text_of((*ekm.result)->payload);
  CHECK(server_export.size() == 64);
  CHECK(server_export == ekm.client_export);      // same session: both ends derive the same key
  CHECK(ekm.client_export != std::string(64, '0'));
  CHECK(ekm.cipher.rfind("TLS_", 0) == 0);
  CHECK(ekm.peer.kind == transport::PeerKind::psk);
  CHECK(ekm.counters.packets_out == 2);            // both requests went over the one cached session
  CHECK(ekm.counters.packets_in == 2);
  CHECK(client->stats().live_client_sessions == 1);
  CHECK(server->stats().handshakes_completed == 1);
  CHECK(server->stats().requests_served == 2);

  // A second session (other identity) gets another export.
  const CallResult other = request_and_wait(*server, *client, peer,
                                            ClientCredentials::psk("CAE-beta", secret(kKeys.at("CAE-beta")), ""),
                                            get_request({"ekm"}));
  REQUIRE(other.result->ok());
  CHECK(text_of((*other.result)->payload) == other.client_export);
  CHECK(other.client_export != ekm.client_export);
}

TEST_CASE("PSK: unknown identity is refused with an alert, reported, and the server keeps serving") {
  FailureLog server_log;
  FailureLog client_log;
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  server->set_failure_observer(server_log.observer());
  auto client = make_client_node();
  client->set_failure_observer(client_log.observer());
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  const auto stranger = ClientCredentials::psk("CAE-nobody", secret("whatever-key-0123456789"), "");
  const CallResult refused = request_and_wait(*server, *client, peer, stranger, get_request({"hello"}));
  REQUIRE_FALSE(refused.result->ok());
  CHECK(refused.result->error().code == Errc::unauthenticated);
  INFO(server_log.text());
  CHECK(server_log.has(FailureKind::handshake_failed, "CAE-nobody"));
  CHECK(server_log.text().find("unknown PSK identity 'CAE-nobody'") != std::string::npos);
  CHECK(server->stats().handshakes_failed == 1);

  const CallResult good = request_and_wait(*server, *client, peer,
                                           ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), ""),
                                           get_request({"hello"}));
  REQUIRE(good.result->ok());
  CHECK(text_of((*good.result)->payload) == "psk:CAE-alpha");
}

TEST_CASE("PSK: a wrong key is reported as a silent handshake timeout on both ends") {
  FailureLog server_log;
  FailureLog client_log;
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  config.limits.handshake_timeout = 4s;  // the client gives up first, as a real client would
  auto server = make_server(std::move(config));
  server->set_failure_observer(server_log.observer());
  transport::Limits impatient;
  impatient.handshake_timeout = 1500ms;
  auto client = make_client_node(impatient);
  client->set_failure_observer(client_log.observer());
  const transport::Peer peer{"127.0.0.1", server->secure_port()};

  CallResult wrong;
  client->request(peer, ClientCredentials::psk("CAE-alpha", secret("not-the-right-key-0123456789"), ""),
                  get_request({"hello"}), record_into(wrong));
  REQUIRE(pump({server.get(), client.get()},
               [&] { return wrong.done && server_log.has(FailureKind::handshake_timeout, "CAE-alpha"); }));
  REQUIRE_FALSE(wrong.result->ok());
  CHECK(wrong.result->error().code == Errc::timeout);
  CHECK(wrong.result->error().message.find("wrong PSK for identity 'CAE-alpha'") != std::string::npos);
  INFO(server_log.text());
  CHECK(server_log.text().find("wrong PSK?") != std::string::npos);
  CHECK(client_log.has(FailureKind::handshake_timeout, "CAE-alpha"));

  // The key material never shows up in a report.
  CHECK(server_log.text().find("not-the-right-key") == std::string::npos);
  CHECK(client_log.text().find("not-the-right-key") == std::string::npos);
}

TEST_CASE("PSK: stock coap-client-gnutls and coap-client-openssl get the peer identity") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  const std::string uri = "coaps://127.0.0.1:" + std::to_string(server->secure_port()) + "/hello";
  BackgroundNode running(*server);
  for (const std::string program : {"coap-client-gnutls", "coap-client-openssl"}) {
    if (!have_program(program)) {
      WARN(program << " not installed: skipped");
      continue;
    }
    // coap-client exits 0 even when the handshake fails (docs/transport.md §3): judge by its output.
    const auto good = run_command({program, "-B", "5", "-u", "CAE-beta", "-k", kKeys.at("CAE-beta"), uri});
    INFO(program << ": " << good.output);
    CHECK(good.output.find("psk:CAE-beta") != std::string::npos);
    const auto unknown = run_command({program, "-B", "3", "-u", "CAE-nobody", "-k", "some-key-0123456789", uri});
    INFO(program << ": " << unknown.output);
    CHECK(unknown.output.find("psk:") == std::string::npos);
  }
}

TEST_CASE("PSK: a client that offers only TLS_PSK_WITH_AES_128_CCM_8 completes the handshake (TS-0003 §10.2)") {
  if (!have_program("openssl")) return;
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  BackgroundNode running(*server);
  const std::string hex_key = to_hex(ByteView::of(kKeys.at("CAE-alpha")));
  const auto result = run_command({"openssl", "s_client", "-dtls1_2", "-connect",
                                   "127.0.0.1:" + std::to_string(server->secure_port()), "-psk_identity",
                                   "CAE-alpha", "-psk", hex_key, "-cipher", "PSK-AES128-CCM8", "-servername",
                                   "server.example.net"});
  INFO(result.output);
  CHECK(result.output.find("Cipher is PSK-AES128-CCM8") != std::string::npos);
}

TEST_CASE("PSK: a secret body travels in guarded memory at both ends and an error body stays readable") {
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  // The session's own export stands for a key: both ends can compute it, so the body can be checked.
  server->add_route(transport::Method::get, {"key"}, transport::Access::secure,
                    [](const transport::Session& session, const transport::Request&, transport::Responder responder) {
                      auto exported = session.export_keying_material("EXPORTER-dauth-test", 32);
                      if (!exported.ok()) return responder.respond(transport::Response::with_text(500, "no export"));
                      transport::Response response;
                      response.content_format = 42;
                      response.secret_payload = std::make_shared<const SecretBuffer>(std::move(exported).value());
                      responder.respond(std::move(response));
                    });
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  const auto credentials = ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), "");

  auto secret_request = [](std::vector<std::string> path) {
    auto request = get_request(std::move(path));
    request.answer_is_secret = true;
    return request;
  };
  const CallResult guarded = request_and_wait(*server, *client, peer, credentials, secret_request({"key"}));
  REQUIRE(guarded.result->ok());
  CHECK((*guarded.result)->code == 205);
  CHECK((*guarded.result)->content_format == std::optional<std::uint16_t>(42));
  CHECK((*guarded.result)->payload.empty());
  REQUIRE((*guarded.result)->secret_payload);
  CHECK(hex_of(*(*guarded.result)->secret_payload) == guarded.client_export);

  // A client that did not ask for guarded memory (a stock client's view) gets the same bytes as a plain body.
  const CallResult plain = request_and_wait(*server, *client, peer, credentials, get_request({"key"}));
  REQUIRE(plain.result->ok());
  CHECK_FALSE((*plain.result)->secret_payload);
  CHECK(hex_of(SecretBuffer::copy_of(ByteView((*plain.result)->payload))) == plain.client_export);

  // Refusals keep their text where error handling reads it.
  const CallResult missing = request_and_wait(*server, *client, peer, credentials, secret_request({"nothing-here"}));
  REQUIRE(missing.result->ok());
  CHECK((*missing.result)->code == 404);
  CHECK_FALSE((*missing.result)->secret_payload);
}

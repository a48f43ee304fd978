// DAUTH_TRANSPORT_DEBUG echoes libcoap's debug log, and libcoap 4.3.1 logs every PDU it sends or receives with its
// payload (coap_show_pdu, straight to stderr by default): responses that carry key material (a usage-constrained
// key, an export) must never reach that log. The debug switch is read once per process, so the check runs this
// test binary again as a child with the variable set, on a real DTLS session.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;

namespace {
const std::map<std::string, std::string> kKeys = {{"CAE-alpha", "debug-log-psk-0123456789abcdef0123"}};
}  // namespace

// The child: one PSK session, GET /ekm answers the hex of a 32-byte RFC 5705 export (a secret of the session).
TEST_CASE("debug log child: a request whose answer is a secret", "[.debug-log-child]") {
  const char* secret_file = std::getenv("DAUTH_TEST_SECRET_FILE");
  REQUIRE(secret_file != nullptr);
  transport::NodeConfig config;
  config.psk_lookup = psk_table(kKeys);
  auto server = make_server(std::move(config));
  auto client = make_client_node();
  const transport::Peer peer{"127.0.0.1", server->secure_port()};
  const auto credentials = ClientCredentials::psk("CAE-alpha", secret(kKeys.at("CAE-alpha")), "");
  const CallResult ekm = request_and_wait(*server, *client, peer, credentials, get_request({"ekm"}));
  REQUIRE(ekm.result->ok());
  REQUIRE(text_of((*ekm.result)->payload) == ekm.client_export);
  // And a binary body (libcoap dumps those in hex and as characters): a POST the server refuses is logged all the
  // same when it is sent.
  const SecretBuffer binary = SecretBuffer::random(24);
  transport::Request post = get_request({"ekm"});
  post.method = transport::Method::post;
  post.content_format = 42;  // application/octet-stream
  post.payload.assign(binary.data(), binary.data() + binary.size());
  const CallResult refused = request_and_wait(*server, *client, peer, credentials, std::move(post));
  REQUIRE(refused.result->ok());
  std::ofstream(secret_file) << ekm.client_export << "\n" << kKeys.at("CAE-alpha") << "\n" << hex_of(binary) << "\n";
}

TEST_CASE("DAUTH_TRANSPORT_DEBUG prints libcoap's PDU lines but never a payload or a key") {
  TempDir dir;
  const auto secret_file = dir / "secrets";
  char self[4096];
  const ssize_t length = ::readlink("/proc/self/exe", self, sizeof self - 1);
  REQUIRE(length > 0);
  self[length] = '\0';
  const auto child = run_command({"env", "DAUTH_TRANSPORT_DEBUG=1", "DAUTH_TEST_SECRET_FILE=" + secret_file.string(),
                                  self, "[.debug-log-child]"});
  INFO(child.output.substr(0, 4000));
  REQUIRE(child.exit_code == 0);
  std::ifstream in(secret_file);
  std::string exported;
  std::string psk;
  std::string binary_hex;
  REQUIRE(std::getline(in, exported));
  REQUIRE(std::getline(in, psk));
  REQUIRE(std::getline(in, binary_hex));
  REQUIRE(binary_hex.size() == 48);
  REQUIRE(exported.size() == 64);
  // The debug log was on and showed the exchange...
  CHECK(child.output.find("libcoap: ") != std::string::npos);
  CHECK(child.output.find("c:2.05") != std::string::npos);
  // ...but not what it carried, in any form libcoap prints it (text, hex dump), nor the PSK.
  CHECK(child.output.find(exported) == std::string::npos);
  CHECK(child.output.find(exported.substr(0, 16)) == std::string::npos);
  CHECK(child.output.find(psk) == std::string::npos);
  CHECK(child.output.find(binary_hex.substr(0, 16)) == std::string::npos);
  CHECK(child.output.find("c:POST") != std::string::npos);
  CHECK(child.output.find("<<") == std::string::npos);
}

// Cross-backend RFC 5705 exporter: a GnuTLS server (this process) and our transport/ built on libcoap-3-openssl
// (a helper process) derive the same keying material, with PSK and with certificates (docs/transport.md §3).
#include <catch2/catch.hpp>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;

#ifdef DAUTH_TRANSPORT_OPENSSL_CLIENT
namespace {
std::string field(const std::string& output, const std::string& name) {
  const auto start = output.find(name + "=");
  if (start == std::string::npos) return {};
  const auto end = output.find('\n', start);
  return output.substr(start + name.size() + 1, end - start - name.size() - 1);
}
}  // namespace
#endif

TEST_CASE("Exporter values agree across backends: GnuTLS server, OpenSSL client (PSK and X.509)") {
#ifndef DAUTH_TRANSPORT_OPENSSL_CLIENT
  WARN("libcoap-3-openssl not available or suite built on OpenSSL: skipped");
#else
  TempDir dir;
  Pki pki(dir);
  transport::NodeConfig config;
  config.psk_lookup = psk_table({{"CAE-cross", "cross-backend-key-0123456789abcdef"}});
  config.x509 = pki.credentials("server");
  auto server = make_server(std::move(config));
  const std::string port = std::to_string(server->secure_port());
  BackgroundNode running(*server);

  const auto psk = run_command({DAUTH_TRANSPORT_OPENSSL_CLIENT, "psk", port, "CAE-cross"},
                               "cross-backend-key-0123456789abcdef");
  INFO(psk.output);
  REQUIRE(psk.exit_code == 0);
  CHECK(field(psk.output, "backend") == "openssl");
  CHECK(field(psk.output, "client_export").size() == 64);
  CHECK(field(psk.output, "client_export") == field(psk.output, "server_export"));

  const auto x509 = run_command({DAUTH_TRANSPORT_OPENSSL_CLIENT, "x509", port, pki.path("client.pem").string(),
                                 pki.path("client.key").string(), pki.path("ca.pem").string()});
  INFO(x509.output);
  REQUIRE(x509.exit_code == 0);
  CHECK(field(x509.output, "client_export").size() == 64);
  CHECK(field(x509.output, "client_export") == field(x509.output, "server_export"));
  CHECK(field(x509.output, "client_export") != field(psk.output, "client_export"));
#endif
}

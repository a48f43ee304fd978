// Server certificate credentials are parsed once per node, not per handshake (docs/transport.md §3 "Credentials
// built once"): a PSK handshake on an endpoint that also serves X.509 or a raw public key parses no certificate, key
// or trust anchor, and neither does an X.509 handshake on the server side.
//
// How it is seen: this executable defines the GnuTLS functions that parse PEM credentials; the dynamic linker
// binds libcoap's calls (and ours) to these definitions first, which count the call and run the real function
// (dlsym RTLD_NEXT). Nothing is replaced: the handshakes are real. libcoap 4.3.1 given the server's PKI setup calls
// gnutls_certificate_set_x509_key_mem (or _rawpk_key_mem) and _x509_trust_mem for every new server session, PSK
// ones included (setup_server_ssl_session): these tests fail with that.
#include <dlfcn.h>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "transport_support.hpp"

using namespace dauth;
using namespace dauth::test;
using transport::ClientCredentials;

namespace {

std::atomic<int> pem_parses{0};  // every call of the functions below, whoever calls them

template <typename Function>
Function real(const char* name) {
  static_assert(sizeof(Function) == sizeof(void*));
  void* symbol = dlsym(RTLD_NEXT, name);
  if (symbol == nullptr) std::abort();  // GnuTLS is linked into this process: cannot happen
  Function function;
  std::memcpy(&function, &symbol, sizeof(function));
  return function;
}

}  // namespace

// GnuTLS's prototypes, with opaque pointers (this file includes no TLS-backend header): C linkage binds by name.
extern "C" {
int gnutls_certificate_set_x509_key_mem(void* credentials, const void* certificate, const void* key, int format) {
  ++pem_parses;
  static const auto next = real<int (*)(void*, const void*, const void*, int)>("gnutls_certificate_set_x509_key_mem");
  return next(credentials, certificate, key, format);
}
int gnutls_certificate_set_x509_trust_mem(void* credentials, const void* anchors, int format) {
  ++pem_parses;
  static const auto next = real<int (*)(void*, const void*, int)>("gnutls_certificate_set_x509_trust_mem");
  return next(credentials, anchors, format);
}
int gnutls_certificate_set_rawpk_key_mem(void* credentials, const void* spki, const void* key, int format,
                                         const char* password, unsigned key_usage, const char** names,
                                         unsigned names_length, unsigned flags) {
  ++pem_parses;
  static const auto next = real<int (*)(void*, const void*, const void*, int, const char*, unsigned, const char**,
                                        unsigned, unsigned)>("gnutls_certificate_set_rawpk_key_mem");
  return next(credentials, spki, key, format, password, key_usage, names, names_length, flags);
}
int gnutls_pcert_list_import_x509_raw(void* certificates, unsigned* length, const void* data, int format,
                                      unsigned flags) {
  ++pem_parses;
  static const auto next =
      real<int (*)(void*, unsigned*, const void*, int, unsigned)>("gnutls_pcert_list_import_x509_raw");
  return next(certificates, length, data, format, flags);
}
int gnutls_privkey_import_x509_raw(void* key, const void* data, int format, const char* password, unsigned flags) {
  ++pem_parses;
  static const auto next =
      real<int (*)(void*, const void*, int, const char*, unsigned)>("gnutls_privkey_import_x509_raw");
  return next(key, data, format, password, flags);
}
}

TEST_CASE("Credentials built once: PSK handshakes on an endpoint serving X.509 or RPK too parse no PKI") {
  if (transport::compiled_backend() != transport::Backend::gnutls) return;  // libcoap's PKI setup on OpenSSL
  TempDir dir;
  Pki pki(dir);
  for (const bool raw_key : {false, true}) {
    INFO((raw_key ? "RPK" : "X.509") << " on the endpoint");
    transport::NodeConfig config;
    config.psk_lookup = psk_table({{"psk-client", "0123456789abcdef"}});
    if (raw_key) {
      config.rpk = transport::RpkCredentials{secret(pki.text("rpk_a.key")), {pki.text("rpk_b.id")}};
    } else {
      config.x509 = pki.credentials("server");
    }
    auto server = make_server(std::move(config));
    CHECK(pem_parses > 0);  // the one parse at start: the counting works
    pem_parses = 0;
    for (int handshake = 0; handshake < 3; ++handshake) {
      auto client = make_client_node();  // a new session each time
      const CallResult reply = request_and_wait(*server, *client, {"127.0.0.1", server->secure_port()},
                                                ClientCredentials::psk("psk-client", secret("0123456789abcdef"), ""),
                                                get_request({"hello"}));
      REQUIRE(reply.result->ok());
      CHECK(text_of((*reply.result)->payload) == "psk:psk-client");
    }
    CHECK(pem_parses == 0);
  }
}

TEST_CASE("Credentials built once: the server parses nothing for an X.509 handshake (stock client)") {
  if (transport::compiled_backend() != transport::Backend::gnutls || !have_program("coap-client-gnutls")) return;
  TempDir dir;
  Pki pki(dir);
  transport::NodeConfig config;
  config.x509 = pki.credentials("server");
  auto server = make_server(std::move(config));
  const std::string uri = "coaps://127.0.0.1:" + std::to_string(server->secure_port()) + "/hello";
  pem_parses = 0;
  {
    // The client is another process: what is counted here is the server's work only.
    BackgroundNode running(*server);
    for (int handshake = 0; handshake < 2; ++handshake) {
      const auto reply = run_command({"coap-client-gnutls", "-B", "5", "-c", pki.path("client.pem"), "-j",
                                      pki.path("client.key"), "-C", pki.path("ca.pem"), uri});
      INFO(reply.output);
      CHECK(reply.output.find("x509:" + kClientAeId) != std::string::npos);
    }
  }
  CHECK(pem_parses == 0);
}

// transport_openssl_client: our transport/ built against libcoap-3-openssl, as a separate process (two libcoap
// flavours never share a binary). Sends GET /ekm and prints both exports, for the cross-backend exporter test.
//   transport_openssl_client psk <port> <identity>            (key on stdin)
//   transport_openssl_client x509 <port> <cert.pem> <key.pem> <ca.pem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include "dauth/transport/transport.hpp"

using namespace dauth;

namespace {
std::string slurp(std::istream& in) { return std::string(std::istreambuf_iterator<char>(in), {}); }
std::string slurp_file(const std::string& path) {
  std::ifstream in(path);
  return slurp(in);
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: transport_openssl_client psk <port> <identity> | x509 <port> <cert> <key> <ca>\n";
    return 2;
  }
  const std::string mode = argv[1];
  const auto port = static_cast<std::uint16_t>(std::stoul(argv[2]));
  transport::ClientCredentials credentials;
  if (mode == "psk") {
    credentials = transport::ClientCredentials::psk(argv[3], SecretBuffer::copy_of(ByteView::of(slurp(std::cin))), "");
  } else if (mode == "x509" && argc == 6) {
    credentials = transport::ClientCredentials::certificate(
        transport::X509Credentials{slurp_file(argv[3]), SecretBuffer::copy_of(ByteView::of(slurp_file(argv[4]))),
                                   slurp_file(argv[5])},
        "", "");
  } else {
    std::cerr << "bad mode\n";
    return 2;
  }
  auto node = transport::Node::create(transport::NodeConfig{});
  if (!node.ok()) {
    std::cerr << node.error().to_string() << "\n";
    return 1;
  }
  bool done = false;
  int rc = 1;
  transport::Request request;
  request.path = {"ekm"};
  (*node)->request({"127.0.0.1", port}, credentials, request,
                   [&](Result<transport::Response> response, const transport::Session* session) {
                     done = true;
                     if (!response.ok() || session == nullptr) {
                       std::cout << "error=" << (response.ok() ? "no session" : response.error().to_string()) << "\n";
                       return;
                     }
                     auto exported = session->export_keying_material("EXPORTER-dauth-test", 32);
                     std::cout << "backend=" << transport::to_string(session->backend()) << "\n"
                               << "cipher=" << session->cipher_suite() << "\n"
                               << "client_export=" << (exported.ok() ? to_hex(exported->view()) : "?") << "\n"
                               << "server_export="
                               << std::string(response->payload.begin(), response->payload.end()) << "\n";
                     rc = 0;
                   });
  (*node)->run_until([&] { return done; }, std::chrono::seconds(15));
  return rc;
}

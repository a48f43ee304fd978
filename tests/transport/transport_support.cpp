#include "transport_support.hpp"

#include <sys/epoll.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <stdexcept>

namespace dauth::test {

bool pump(const std::vector<transport::Node*>& nodes, const std::function<bool()>& done,
          std::chrono::milliseconds max) {
  const int epoll = epoll_create1(EPOLL_CLOEXEC);
  for (auto* node : nodes) {
    epoll_event event{};
    event.events = EPOLLIN;
    event.data.fd = node->fd();
    epoll_ctl(epoll, EPOLL_CTL_ADD, node->fd(), &event);
  }
  const auto end = std::chrono::steady_clock::now() + max;
  while (!done() && std::chrono::steady_clock::now() < end) {
    epoll_event events[4];
    auto wait = std::chrono::milliseconds(50);
    for (auto* node : nodes) wait = std::min(wait, node->next_timeout());
    (void)epoll_wait(epoll, events, 4, static_cast<int>(wait.count()));
    for (auto* node : nodes) node->process_ready();
  }
  ::close(epoll);
  return done();
}

bool FailureLog::has(transport::FailureKind kind, const std::string& identity) const {
  for (const auto& failure : failures) {
    if (failure.kind == kind && failure.identity_offered == identity) return true;
  }
  return false;
}

std::string FailureLog::text() const {
  std::string all;
  for (const auto& failure : failures) all += transport::format_failure(failure) + "\n";
  return all;
}

BackgroundNode::BackgroundNode(transport::Node& node)
    : thread_([this, &node] {
        while (!stop_) {
          epoll_event event{};
          (void)epoll_wait(node.fd(), &event, 1, 50);
          node.process_ready();
        }
      }) {}

BackgroundNode::~BackgroundNode() {
  stop_ = true;
  thread_.join();
}

SecretBuffer secret(const std::string& text) { return SecretBuffer::copy_of(ByteView::of(text)); }

transport::PskLookup psk_table(std::map<std::string, std::string> keys) {
  return [keys = std::move(keys)](const transport::PskRequest& request) -> Result<transport::PskGrant> {
    auto it = keys.find(std::string(request.identity));
    if (it == keys.end()) {
      return make_error(Errc::not_found, "unknown PSK identity '" + std::string(request.identity) + "'");
    }
    return transport::PskGrant{secret(it->second), {}, {}};
  };
}

std::string hex_of(const SecretBuffer& value) { return to_hex(value.view()); }
std::string text_of(const Bytes& bytes) { return std::string(bytes.begin(), bytes.end()); }

namespace {
const char* kPkiScript = R"SH(
set -e
cd "$1"
key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1.key" 2>/dev/null; }
ca() {
  key "$1"
  openssl req -x509 -new -key "$1.key" -subj "/CN=$2" -days 30 -out "$1.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
ext() { printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$2" > "$1.ext"; }
leaf() {
  key "$1"; ext "$1" "$3"
  openssl req -new -key "$1.key" -subj "/CN=$1" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -days 30 -extfile "$1.ext" \
    -out "$1.pem" 2>/dev/null
}
ca ca "Test MEF CA"
ca rogue "Rogue CA"
leaf server ca "URI://m2m.example.net/in-cse/CAE-server-01,DNS:server.example.net"
leaf client ca "URI://m2m.example.net/in-cse/CAE-client-01"
leaf nouri ca "DNS:client.example.net"
leaf rogueclient rogue "URI://m2m.example.net/in-cse/CAE-client-01"
# An expired certificate needs explicit dates: only `openssl ca` takes them in OpenSSL 3.0.
key expired; ext expired "URI://m2m.example.net/in-cse/CAE-client-01"
openssl req -new -key expired.key -subj "/CN=expired" -out expired.csr
mkdir -p db; : > db/index.txt; echo 01 > db/serial
printf '[ca]\ndefault_ca=d\n[d]\ndatabase=db/index.txt\nserial=db/serial\nnew_certs_dir=db\ndefault_md=sha256\npolicy=p\n[p]\ncommonName=supplied\n' > ca.cnf
openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr -out expired.pem -notext \
  -startdate 20200101000000Z -enddate 20200201000000Z -extfile expired.ext 2>/dev/null
for k in rpk_a rpk_b rpk_c; do
  key "$k"
  openssl pkey -in "$k.key" -pubout -outform DER -out "$k.spki"
  openssl pkey -in "$k.key" -pubout -out "$k.pub"
  printf 'ni:///sha-256;%s' "$(openssl dgst -sha256 -binary "$k.spki" | openssl base64 -A | tr '+/' '-_' | tr -d '=')" > "$k.id"
done
echo pki-ok
)SH";
}  // namespace

Pki::Pki(const TempDir& temp) : dir(temp.path()) {
  const auto result = run_command({"sh", "-c", kPkiScript, "pki", dir.string()});
  if (result.exit_code != 0 || result.output.find("pki-ok") == std::string::npos) {
    throw std::runtime_error("making test certificates failed: " + result.output);
  }
}

std::string Pki::text(const std::string& name) const { return read_text_file(dir / name); }

transport::X509Credentials Pki::credentials(const std::string& name) const {
  return transport::X509Credentials{text(name + ".pem"), secret(text(name + ".key")), text("ca.pem")};
}

std::unique_ptr<transport::Node> make_server(transport::NodeConfig config, std::uint16_t secure_port) {
  if (config.secure_addresses.empty()) config.secure_addresses = {"127.0.0.1"};
  config.secure_port = secure_port;
  auto node = transport::Node::create(std::move(config));
  if (!node.ok()) throw std::runtime_error("server node: " + node.error().to_string());
  auto server = std::move(*node);
  server->add_route(transport::Method::get, {"hello"}, transport::Access::both,
                    [](const transport::Session& session, const transport::Request&, transport::Responder responder) {
                      responder.respond(transport::Response::with_text(
                          205, std::string(transport::to_string(session.peer().kind)) + ":" + session.peer().value));
                    });
  server->add_route(transport::Method::get, {"ekm"}, transport::Access::secure,
                    [](const transport::Session& session, const transport::Request&, transport::Responder responder) {
                      auto exported = session.export_keying_material("EXPORTER-dauth-test", 32);
                      responder.respond(exported.ok() ? transport::Response::with_text(205, hex_of(*exported))
                                                      : transport::Response::with_text(500, exported.error().message));
                    });
  return server;
}

transport::ResponseHandler record_into(CallResult& call) {
  return [&call](Result<transport::Response> result, const transport::Session* session) {
    call.done = true;
    call.result.emplace(std::move(result));
    if (session != nullptr) {
      auto exported = session->export_keying_material("EXPORTER-dauth-test", 32);
      if (exported.ok()) call.client_export = hex_of(*exported);
      call.cipher = session->cipher_suite();
      call.peer = session->peer();
      call.counters = session->counters();
    }
  };
}

transport::Request get_request(std::vector<std::string> path) {
  transport::Request request;
  request.method = transport::Method::get;
  request.path = std::move(path);
  return request;
}

std::unique_ptr<transport::Node> make_client_node(transport::Limits limits) {
  transport::NodeConfig config;
  config.limits = limits;
  auto node = transport::Node::create(std::move(config));
  REQUIRE(node.ok());
  return std::move(*node);
}

CallResult request_and_wait(transport::Node& server, transport::Node& client, const transport::Peer& peer,
                            const transport::ClientCredentials& credentials, transport::Request request) {
  CallResult call;
  client.request(peer, credentials, std::move(request), record_into(call));
  REQUIRE(pump({&server, &client}, [&] { return call.done; }));
  return call;
}

}  // namespace dauth::test

// The MEF's exporter against an independent DTLS implementation (issue 4): `openssl s_client` runs the bootstrap
// handshake, prints its own RFC 5705 export (label EXPORTER-oneM2M-Bootstrap, 48 bytes) and sends a raw CoAP
// POST /mef/enrolment that this test builds byte by byte (RFC 7252 §3). The test splits openssl's 48 bytes itself
// (TS-0003 §10.3.1: RelativeKeID = first 16, Ke = last 32) and compares with what the MEF stored. Since only one
// cipher suite is offered, the PSK case also proves strict-profile interop (TLS_PSK_WITH_AES_128_CCM_8).
#include <catch2/catch.hpp>

#include <sys/epoll.h>

#include <cctype>

#include "child_process.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/messages.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace std::chrono_literals;

namespace {

// One CoAP option (RFC 7252 §3.1): delta and length nibbles with their 1- or 2-byte extensions.
void append_option(Bytes& out, unsigned delta, const Bytes& value) {
  auto nibble = [](std::size_t v) -> unsigned { return v < 13 ? static_cast<unsigned>(v) : (v < 269 ? 13U : 14U); };
  auto extend = [&out](std::size_t v) {
    if (v >= 269) {
      out.push_back(static_cast<std::uint8_t>((v - 269) >> 8));
      out.push_back(static_cast<std::uint8_t>((v - 269) & 0xff));
    } else if (v >= 13) {
      out.push_back(static_cast<std::uint8_t>(v - 13));
    }
  };
  out.push_back(static_cast<std::uint8_t>((nibble(delta) << 4) | nibble(value.size())));
  extend(delta);
  extend(value.size());
  out.insert(out.end(), value.begin(), value.end());
}

// CON POST with a 2-byte token, Uri-Path (11) segments, Content-Format (12), payload marker 0xFF and payload.
Bytes coap_post(const std::vector<std::string>& path, std::uint16_t content_format, const Bytes& payload) {
  Bytes out = {0x42, 0x02, 0x12, 0x34, 0xbe, 0xef};  // ver 1, CON, TKL 2; code 0.02; message id; token
  unsigned last = 0;
  for (const auto& segment : path) {
    append_option(out, 11 - last, Bytes(segment.begin(), segment.end()));
    last = 11;
  }
  Bytes format;
  if (content_format > 0xff) format.push_back(static_cast<std::uint8_t>(content_format >> 8));
  format.push_back(static_cast<std::uint8_t>(content_format & 0xff));
  append_option(out, 12 - last, format);
  out.push_back(0xff);
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

// The 96 hex digits after "Keying material: " in s_client's output.
std::string keying_material_hex(const std::string& output) {
  const std::string marker = "Keying material: ";
  const auto at = output.find(marker);
  if (at == std::string::npos) return {};
  std::string hex;
  for (std::size_t i = at + marker.size(); i < output.size() && std::isxdigit(static_cast<unsigned char>(output[i]));
       ++i) {
    hex.push_back(output[i]);
  }
  return hex;
}

// Runs `sh -c script` while driving node; returns the child's whole output.
std::string run_while_serving(transport::Node& node, const std::string& script) {
  test::ChildProcess child({"sh", "-c", script});
  const int epoll = ::epoll_create1(EPOLL_CLOEXEC);
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = node.fd();
  ::epoll_ctl(epoll, EPOLL_CTL_ADD, node.fd(), &event);
  const auto end = std::chrono::steady_clock::now() + 40s;
  while (child.running() && std::chrono::steady_clock::now() < end) {
    epoll_event ready{};
    (void)::epoll_wait(epoll, &ready, 1, 20);
    node.process_ready();
    child.drain();
  }
  ::close(epoll);
  child.drain();
  return child.output();
}

constexpr const char* kFqdn = "mef.example.net";

struct InteropMef {
  test::TempDir dir;
  SecretBuffer master_key = SecretBuffer::random(crypto::kMasterKeySize);
  test::LogLines log;
  std::vector<transport::Failure> failures;
  std::optional<crypto::KeyStore> store;
  rspf::PskLookupSlot slot;
  std::unique_ptr<transport::Node> node;
  std::unique_ptr<rspf::Mef> mef;

  explicit InteropMef(std::optional<transport::X509Credentials> x509 = std::nullopt) {
    store.emplace(test::open_store(dir / "mef", master_key));
    transport::NodeConfig config;
    config.secure_addresses = {"127.0.0.1"};
    config.secure_port = 0;
    config.psk_lookup = slot.lookup();
    config.x509 = std::move(x509);
    config.limits = test::quick_limits();
    node = transport::Node::create(std::move(config)).value();
    node->set_failure_observer([this](const transport::Failure& f) { failures.push_back(f); });
    rspf::MefConfig mef_config;
    mef_config.fqdn = kFqdn;
    mef_config.log = log.sink();
    mef = rspf::Mef::create(*node, *store, std::move(mef_config)).value();
    slot.bind(mef->psk_lookup());
  }
  ~InteropMef() { slot.unbind(); }

  std::string write_request(
      const Bytes& body = rspf::encode(rspf::EnrolmentRequest{}, rspf::ContentFormat::cbor)) const {
    const auto path = dir / "request.bin";
    test::write_file(path,
                     coap_post({"mef", "enrolment"}, static_cast<std::uint16_t>(rspf::ContentFormat::cbor), body));
    return path.string();
  }

  // s_client with the request on stdin, kept open 2 s for the answer. No -ign_eof: then either the MEF's close
  // after the 2.04 or stdin's EOF ends s_client, so it never waits for a session the server keeps (idle timeout).
  // Unbuffered (stdbuf): what it printed is there even when `timeout` ends it.
  std::string s_client(const std::string& request, const std::string& credential_options) {
    const std::string script = "(cat '" + request + "'; sleep 2) | timeout 20 stdbuf -o0 openssl s_client -dtls1_2 " +
                               "-connect 127.0.0.1:" + std::to_string(node->secure_port()) + " " + credential_options +
                               " -servername " + kFqdn +
                               " -keymatexport EXPORTER-oneM2M-Bootstrap -keymatexportlen 48 2>&1";
    return run_while_serving(*node, script);
  }

  // Splits openssl's export here (not with crypto::split_bootstrap_export) and checks the MEF's record.
  void require_same_enrolment(const std::string& output, const std::string& enrolee_id) {
    INFO(output);
    const std::string hex = keying_material_hex(output);
    REQUIRE(hex.size() == 96);
    const Bytes exported = from_hex(hex).value();
    const std::string ke_id =
        to_hex(ByteView(exported.data(), crypto::kRelativeKeIdSize), /*upper_case=*/true) + "@" + kFqdn;
    const SecretBuffer ke = SecretBuffer::copy_of(ByteView(exported.data() + 16, crypto::kEnrolmentKeySize));
    REQUIRE(store->size(crypto::RecordKind::enrolment_key) == 1);
    const auto* record = store->find<crypto::EnrolmentKeyRecord>(ke_id);
    REQUIRE(record != nullptr);
    REQUIRE(record->ke.equals(ke));
    REQUIRE(record->enrolee_id == enrolee_id);
    // The 2.04 answer (raw CBOR after the handshake output) names the same KeID.
    REQUIRE(output.find(ke_id) != std::string::npos);
  }
};

}  // namespace

TEST_CASE("openssl s_client's exporter gives the KeID and Ke the MEF stored (PSK, strict profile)",
          "[rspf][network][interop]") {
  REQUIRE(test::have_program("openssl"));
  InteropMef world;
  const SecretBuffer kpm = SecretBuffer::random(32);
  test::World::put(*world.store, test::World::enrolee_row("opener@mef.example.net", kpm, "CAE-opener",
                                                          {"CAE-door"}, 600, false));
  const std::string output =
      world.s_client(world.write_request(), "-psk_identity opener@mef.example.net -psk " + to_hex(kpm.view()) +
                                                " -cipher PSK-AES128-CCM8");
  INFO(output);
  REQUIRE(output.find("Cipher is PSK-AES128-CCM8") != std::string::npos);
  world.require_same_enrolment(output, "CAE-opener");
}

TEST_CASE("openssl s_client's exporter matches the MEF for a certificate enrolee (ECDHE-ECDSA-AES128-CCM8)",
          "[rspf][network][interop]") {
  REQUIRE(test::have_program("openssl"));
  const auto now = static_cast<std::time_t>(std::time(nullptr));
  auto ca = crypto::CertificateAuthority::create_self_signed(crypto::PrivateKey::generate_p256().value(),
                                                            "CN=Interop MEF CA", now - 3600, now + 86400)
                .value();
  auto issue = [&](const crypto::PrivateKey& key, crypto::SubjectNames names, std::uint8_t serial) {
    crypto::IssueParams params{Bytes{0x40, serial}, now - 3600, now + 86400};
    return ca.issue_for_key(key, names, params).value();
  };
  auto mef_key = crypto::PrivateKey::generate_p256().value();
  auto mef_certificate = issue(mef_key, crypto::SubjectNames{kFqdn, {}, {kFqdn}}, 1);
  auto enrolee_key = crypto::PrivateKey::generate_p256().value();
  auto enrolee_certificate = issue(enrolee_key, crypto::SubjectNames{"CAE-certmeter", {"CAE-certmeter"}, {}}, 2);

  InteropMef world(transport::X509Credentials{mef_certificate.pem(), mef_key.to_pem().value(),
                                              ca.certificate().pem()});
  crypto::EnroleeRecord row;
  row.credential_id = "cert:CAE-certmeter";
  row.enrolee_id = "CAE-certmeter";
  row.enrolment_lifetime_s = 600;
  // keystore.cpp accepts a Kpm-less enrolee row only with certificate_enrolment set (see the report to the lead).
  row.certificate_enrolment = true;
  test::World::put(*world.store, std::move(row));
  test::write_file(world.dir / "enrolee.pem", enrolee_certificate.pem());
  const SecretBuffer key_pem = enrolee_key.to_pem().value();
  test::write_file(world.dir / "enrolee.key", Bytes(key_pem.data(), key_pem.data() + key_pem.size()));
  test::write_file(world.dir / "ca.pem", ca.certificate().pem());
  const std::string output = world.s_client(
      world.write_request(), "-cipher ECDHE-ECDSA-AES128-CCM8 -cert '" + (world.dir / "enrolee.pem").string() +
                                 "' -key '" + (world.dir / "enrolee.key").string() + "' -CAfile '" +
                                 (world.dir / "ca.pem").string() + "' -verify_return_error");
  INFO(output);
  REQUIRE(output.find("Cipher is ECDHE-ECDSA-AES128-CCM8") != std::string::npos);
  world.require_same_enrolment(output, "CAE-certmeter");
}

TEST_CASE("openssl s_client: enrolment CBOR with a repeated key is answered 4.00 and enrols nothing",
          "[rspf][network][interop][strict]") {
  REQUIRE(test::have_program("openssl"));
  InteropMef world;
  const SecretBuffer kpm = SecretBuffer::random(32);
  test::World::put(*world.store, test::World::enrolee_row("opener@mef.example.net", kpm, "CAE-opener",
                                                          {"CAE-door"}, 600, false));
  // { "remoteMgmt": false, "remoteMgmt": true }: a last-key-wins reader would enrol.
  const Bytes twice = {0xa2, 0x6a, 'r', 'e', 'm', 'o', 't', 'e', 'M', 'g', 'm', 't', 0xf4,
                       0x6a, 'r', 'e', 'm', 'o', 't', 'e', 'M', 'g', 'm', 't', 0xf5};
  const std::string output =
      world.s_client(world.write_request(twice), "-psk_identity opener@mef.example.net -psk " + to_hex(kpm.view()) +
                                                     " -cipher PSK-AES128-CCM8");
  INFO(output);
  // The ErrorBody's text strings are readable in the raw CoAP answer s_client prints.
  CHECK(output.find("'remoteMgmt' appears more than once") != std::string::npos);
  CHECK(world.store->size(crypto::RecordKind::enrolment_key) == 0);
}

// PROTOCOL.md, docs/transport.md §1: what a DTLS client sees when the server's PSK lookup refuses its identity. The
// alert is whatever libcoap 4.3.1 with GnuTLS sends; an independent client reads it here so that the docs follow.
TEST_CASE("a refused PSK identity gets the fatal alert the docs name, as openssl s_client reads it",
          "[rspf][network][interop]") {
  REQUIRE(test::have_program("openssl"));
  InteropMef world;
  const std::string output = world.s_client(world.write_request(), "-msg -cipher PSK-AES128-CCM8 -psk_identity "
                                                                    "ghost@mef.example.net -psk " +
                                                                        to_hex(SecretBuffer::random(32).view()));
  INFO(output);
  CHECK(output.find("SSL alert number 40") != std::string::npos);
  CHECK(output.find("alert handshake failure") != std::string::npos);
  CHECK(output.find("SSL alert number 115") == std::string::npos);  // not unknown_psk_identity
  CHECK(world.store->size(crypto::RecordKind::enrolment_key) == 0);
}

// A bare MEF process for the durability test (issue 4): Node + KeyStore + Mef on 127.0.0.1, nothing else, so
// that the test can SIGKILL it at any moment and start it again on the same state directory.
//
//   mef_test_server <state dir> <master key file> <port> <fqdn> [<KpmID>=<hex Kpm>=<AE-ID>=<target,...>]...
//
// Prints "ready <port>" once serving. Stops by itself: SIGKILL when the test process dies (PR_SET_PDEATHSIG)
// and after kMaxLifetime in any case (tests must not leave servers behind).
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dauth/crypto/keystore.hpp"
#include "dauth/rspf/mef.hpp"

using namespace dauth;

namespace {

constexpr auto kMaxLifetime = std::chrono::seconds(120);

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "mef_test_server: %s\n", what.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (;;) {
    const std::size_t at = text.find(separator, start);
    parts.push_back(text.substr(start, at == std::string::npos ? std::string::npos : at - start));
    if (at == std::string::npos) return parts;
    start = at + 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() == 1) return 3;  // the parent is already gone
  if (argc < 5) die("usage: mef_test_server <state dir> <master key file> <port> <fqdn> [KpmID=hexKpm=AE-ID=targets]...");
  auto master_key = crypto::load_master_key_file(argv[2]);
  if (!master_key.ok()) die(master_key.error().to_string());
  auto store = crypto::KeyStore::open(argv[1], std::move(*master_key));
  if (!store.ok()) die(store.error().to_string());
  for (int i = 5; i < argc; ++i) {
    const auto fields = split(argv[i], '=');
    if (fields.size() != 4) die(std::string("enrolee entry '") + argv[i] + "': want KpmID=hexKpm=AE-ID=targets");
    if (store->find<crypto::EnroleeRecord>(fields[0]) != nullptr) continue;  // provisioned by an earlier run
    auto kpm = secret_from_hex(fields[1]);
    if (!kpm.ok()) die(kpm.error().to_string());
    crypto::EnroleeRecord row;
    row.credential_id = fields[0];
    row.kpm = std::move(*kpm);
    row.enrolee_id = fields[2];
    if (!fields[3].empty()) row.targets = split(fields[3], ',');
    row.enrolment_lifetime_s = 3600;
    if (auto stored = store->put(std::move(row)); !stored.ok()) die(stored.error().to_string());
  }

  rspf::PskLookupSlot slot;
  transport::NodeConfig config;
  config.secure_addresses = {"127.0.0.1"};
  config.secure_port = static_cast<std::uint16_t>(std::stoi(argv[3]));
  config.psk_lookup = slot.lookup();
  auto node = transport::Node::create(std::move(config));
  if (!node.ok()) die(node.error().to_string());
  (*node)->set_failure_observer([](const transport::Failure&) {});
  rspf::MefConfig mef_config;
  mef_config.fqdn = argv[4];
  mef_config.log = [](rspf::LogKind, const std::string&, const std::string&) {};  // nobody reads our output after "ready": never block on a full pipe
  auto mef = rspf::Mef::create(**node, *store, std::move(mef_config));
  if (!mef.ok()) die(mef.error().to_string());
  slot.bind((*mef)->psk_lookup());

  std::printf("ready %u\n", static_cast<unsigned>((*node)->secure_port()));
  std::fflush(stdout);
  const auto end = std::chrono::steady_clock::now() + kMaxLifetime;
  (void)(*node)->run_until([&] { return std::chrono::steady_clock::now() >= end; }, kMaxLifetime);
  slot.unbind();
  return 0;
}

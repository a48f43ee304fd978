// Crash-test writer for the key store (tests/crypto/keystore_test_support.hpp, run_crash_trials): opens the store
// and puts, removes and compacts in a loop until it is killed. Every operation is announced before it starts and
// acknowledged after it succeeded, one flushed line each, so that the test knows which operations were durable and
// which were in flight when SIGKILL arrived:
//   p <id> <version>   put starting          P <id> <version>   put acknowledged
//   r <id>             remove starting       R <id>             remove acknowledged
//   c                  compaction starting   C                  compaction done
// The records are BootstrapKeyRecords whose key bytes and AE-ID are derived from (id, version), so that the test
// can tell a complete record from a torn or mixed one.
//
//   s <i>              re-sealing under key i starts    S <i>              re-sealed under key i
// Default mode: put() — one operation in flight. Group mode: puts go through put_when_durable() with up to
// kMaxPutsInFlight of them queued; "P" comes from the durable handler, which deliver_durable() runs from a poll loop
// on durable_fd(), so acknowledgements may arrive after later operations. Removes and compactions stay synchronous
// (they wait for the queued puts first).
// Reseal mode: put() as in the default mode, and reseal() under the other of two master keys now and then (in half of
// the runs as the first operation). The store
// is opened with both (KeyStore::open's candidate keys); the first line says which one sealed it: "k <i>".
//
// usage: keystore_crash_writer <store dir> <master key file> <seed> <first version> [group | reseal <second key file>]
#include <poll.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dauth/crypto/keystore.hpp"

namespace {

// Must match expected_kpm() in keystore_test_support.hpp.
dauth::SecretBuffer kpm_for(const std::string& id, unsigned long long version) {
  dauth::SecretBuffer kpm(16);
  for (std::size_t i = 0; i < 8; ++i) kpm.data()[i] = static_cast<std::uint8_t>(version >> (56 - 8 * i));
  for (std::size_t i = 0; i < 8; ++i) kpm.data()[8 + i] = static_cast<std::uint8_t>(id[i % id.size()] + i);
  return kpm;
}

dauth::crypto::BootstrapKeyRecord record_for(const std::string& id, unsigned long long version) {
  dauth::crypto::BootstrapKeyRecord record;
  record.kpm_id = id;
  record.kpm = kpm_for(id, version);
  record.ae_id = "CAE-v" + std::to_string(version);
  return record;
}

[[noreturn]] void fail(const dauth::Error& error) {
  std::fprintf(stderr, "%s\n", error.to_string().c_str());
  std::fflush(stdout);
  std::_Exit(1);
}

constexpr int kMaxPutsInFlight = 8;

// Waits for durable_fd() (at most timeout_ms; -1 = until readable) and runs the due handlers.
void deliver_when_ready(dauth::crypto::KeyStore& store, int timeout_ms) {
  pollfd ready{store.durable_fd(), POLLIN, 0};
  const int n = ::poll(&ready, 1, timeout_ms);
  if (n < 0 && errno != EINTR) {
    std::fprintf(stderr, "poll: %s\n", std::strerror(errno));
    std::_Exit(1);
  }
  if (n > 0) store.deliver_durable();
}

}  // namespace

int main(int argc, char** argv) {
  const bool group = argc == 6 && std::string(argv[5]) == "group";
  const bool reseal = argc == 7 && std::string(argv[5]) == "reseal";
  if (argc != 5 && !group && !reseal) {
    std::fprintf(stderr,
                 "usage: %s <store dir> <master key file> <seed> <first version> [group | reseal <second key file>]\n",
                 argv[0]);
    return 2;
  }
  std::vector<std::string> key_files = {argv[2]};
  if (reseal) key_files.emplace_back(argv[6]);
  std::vector<dauth::SecretBuffer> keys;
  for (const auto& file : key_files) {
    auto key = dauth::crypto::load_master_key_file(file);
    if (!key) fail(key.error());
    keys.push_back(std::move(key).value());
  }
  dauth::crypto::OpenReport report;
  auto store = dauth::crypto::KeyStore::open(argv[1], std::move(keys), &report);
  if (!store) fail(store.error());
  std::size_t sealed_with = report.master_key_index;
  if (reseal) {
    std::printf("k %zu\n", sealed_with);
    std::fflush(stdout);
  }
  std::mt19937_64 random(std::strtoull(argv[3], nullptr, 10));
  unsigned long long version = std::strtoull(argv[4], nullptr, 10);
  constexpr int kIds = 40;  // a small pool, so that puts overwrite and removes find something
  int puts_in_flight = 0;
  bool first_operation = reseal && random() % 2 == 0;  // half of the runs: the kill hits that reseal or later
  for (;;) {
    if (group) deliver_when_ready(*store, puts_in_flight >= kMaxPutsInFlight ? -1 : 0);
    if (puts_in_flight >= kMaxPutsInFlight) continue;
    const int dice = static_cast<int>(random() % 100);
    const std::string id = "k" + std::to_string(random() % kIds) + "@mef.example.net";
    // Half of the reseal runs start with one, so that kills land in one on a slow build (sanitizers) too.
    if (reseal && (first_operation || dice >= 92)) {
      first_operation = false;
      const std::size_t to = 1 - sealed_with;
      auto key = dauth::crypto::load_master_key_file(key_files[to]);
      if (!key) fail(key.error());
      std::printf("s %zu\n", to);
      std::fflush(stdout);
      if (auto ok = store->reseal(std::move(key).value()); !ok) fail(ok.error());
      sealed_with = to;
      std::printf("S %zu\n", to);
    } else if (dice < 6) {
      std::printf("c\n");
      std::fflush(stdout);
      if (auto ok = store->compact(); !ok) fail(ok.error());
      std::printf("C\n");
    } else if (dice < 25 && store->find(dauth::crypto::RecordKind::bootstrap_key, id) != nullptr) {
      std::printf("r %s\n", id.c_str());
      std::fflush(stdout);
      if (auto ok = store->remove(dauth::crypto::RecordKind::bootstrap_key, id); !ok) fail(ok.error());
      std::printf("R %s\n", id.c_str());
    } else {
      ++version;
      std::printf("p %s %llu\n", id.c_str(), version);
      std::fflush(stdout);
      if (group) {
        ++puts_in_flight;
        auto on_durable = [id, version, &puts_in_flight](dauth::Result<void> written) {
          if (!written) fail(written.error());
          --puts_in_flight;
          std::printf("P %s %llu\n", id.c_str(), version);
          std::fflush(stdout);
        };
        if (auto ok = store->put_when_durable(record_for(id, version), std::move(on_durable)); !ok) fail(ok.error());
      } else {
        if (auto ok = store->put(record_for(id, version)); !ok) fail(ok.error());
        std::printf("P %s %llu\n", id.c_str(), version);
      }
    }
    std::fflush(stdout);
  }
}

// Crash-test writer for the key store (tests/crypto/test_keystore.cpp, "crash consistency"): opens the store and
// puts, removes and compacts in a loop until it is killed. Every operation is announced before it starts and
// acknowledged after it returned ok, one flushed line each, so that the test knows which operations were durable
// and which single one was in flight when SIGKILL arrived:
//   p <id> <version>   put starting          P <id> <version>   put acknowledged
//   r <id>             remove starting       R <id>             remove acknowledged
//   c                  compaction starting   C                  compaction done
// The records are BootstrapKeyRecords whose key bytes and AE-ID are derived from (id, version), so that the test
// can tell a complete record from a torn or mixed one.
//
// usage: keystore_crash_writer <store dir> <master key file> <seed> <first version>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "dauth/crypto/keystore.hpp"

namespace {

// Must match expected_kpm() in test_keystore.cpp.
dauth::SecretBuffer kpm_for(const std::string& id, unsigned long long version) {
  dauth::SecretBuffer kpm(16);
  for (std::size_t i = 0; i < 8; ++i) kpm.data()[i] = static_cast<std::uint8_t>(version >> (56 - 8 * i));
  for (std::size_t i = 0; i < 8; ++i) kpm.data()[8 + i] = static_cast<std::uint8_t>(id[i % id.size()] + i);
  return kpm;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s <store dir> <master key file> <seed> <first version>\n", argv[0]);
    return 2;
  }
  auto key = dauth::crypto::load_master_key_file(argv[2]);
  if (!key) {
    std::fprintf(stderr, "%s\n", key.error().to_string().c_str());
    return 1;
  }
  auto store = dauth::crypto::KeyStore::open(argv[1], std::move(key).value());
  if (!store) {
    std::fprintf(stderr, "%s\n", store.error().to_string().c_str());
    return 1;
  }
  std::mt19937_64 random(std::strtoull(argv[3], nullptr, 10));
  unsigned long long version = std::strtoull(argv[4], nullptr, 10);
  constexpr int kIds = 40;  // a small pool, so that puts overwrite and removes find something
  for (;;) {
    const int dice = static_cast<int>(random() % 100);
    const std::string id = "k" + std::to_string(random() % kIds) + "@mef.example.net";
    if (dice < 6) {
      std::printf("c\n");
      std::fflush(stdout);
      if (auto ok = store->compact(); !ok) {
        std::fprintf(stderr, "%s\n", ok.error().to_string().c_str());
        return 1;
      }
      std::printf("C\n");
    } else if (dice < 25 && store->find(dauth::crypto::RecordKind::bootstrap_key, id) != nullptr) {
      std::printf("r %s\n", id.c_str());
      std::fflush(stdout);
      if (auto ok = store->remove(dauth::crypto::RecordKind::bootstrap_key, id); !ok) {
        std::fprintf(stderr, "%s\n", ok.error().to_string().c_str());
        return 1;
      }
      std::printf("R %s\n", id.c_str());
    } else {
      ++version;
      std::printf("p %s %llu\n", id.c_str(), version);
      std::fflush(stdout);
      dauth::crypto::BootstrapKeyRecord record;
      record.kpm_id = id;
      record.kpm = kpm_for(id, version);
      record.ae_id = "CAE-v" + std::to_string(version);
      if (auto ok = store->put(std::move(record)); !ok) {
        std::fprintf(stderr, "%s\n", ok.error().to_string().c_str());
        return 1;
      }
      std::printf("P %s %llu\n", id.c_str(), version);
    }
    std::fflush(stdout);
  }
}

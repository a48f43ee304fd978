// Key store load speed (docs/keystore-format.md: loading 100k records must take well under a second).
//
// Writes 100k records of every kind through the public API into a store on tmpfs (/dev/shm when there is one, so
// that 100k fdatasyncs do not dominate the set-up), then times KeyStore::open() of the snapshot alone and of the
// snapshot plus a journal, against two baselines measured in the same run on the same data:
//   read    read() of the same file bytes (the floor: what any loader must pay),
//   aead    crypto_aead_xchacha20poly1305_ietf_decrypt of as many entries of the same mean size, in memory.
// Prints a table; there is no pass/fail on timing (the machine is shared). Best of 3 runs for every row.
//
// usage: bench_keystore [records (default 100000)]
#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "dauth/crypto/keystore.hpp"

using namespace dauth;
using namespace dauth::crypto;
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double best_of_3(const std::function<void()>& run) {
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto start = Clock::now();
    run();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return best;
}

SecretBuffer master_key() {
  SecretBuffer key(kMasterKeySize);
  for (std::size_t i = 0; i < key.size(); ++i) key.data()[i] = static_cast<std::uint8_t>(i * 11 + 3);
  return key;
}

SecretBuffer key_bytes(std::size_t size, std::size_t n) {
  SecretBuffer key(size);
  for (std::size_t i = 0; i < size; ++i) key.data()[i] = static_cast<std::uint8_t>(n * 7 + i);
  return key;
}

std::string ke_id(std::size_t n) {
  char text[64];
  std::snprintf(text, sizeof text, "%032zX@mef.example.net", n);
  return text;
}

// Record n of a mix of every kind, with realistic field sizes.
Record mixed_record(std::size_t n) {
  const std::string ae = "CAE-device-" + std::to_string(n);
  switch (n % 7) {
    case 0:
      return BootstrapKeyRecord{"boot-" + std::to_string(n) + "@mef.example.net", key_bytes(32, n), ae};
    case 1:
      return EnroleeRecord{"enrolee-" + std::to_string(n) + "@mef.example.net",
                           key_bytes(32, n),
                           ae,
                           {"CAE-target-1", "CAE-target-2"},
                           86400,
                           false};
    case 2:
      return EnrolmentKeyRecord{ke_id(n), key_bytes(32, n), ae, {"CAE-target-1"}, 1900000000, 0};
    case 3:
      return SessionKeyRecord{ke_id(n), key_bytes(32, n), ae, "CAE-target-1", 22, 1900000000};
    case 4:
      return CertificateRecord{
          "cert-" + std::to_string(n), {Bytes(600, 0x30), Bytes(500, 0x31)}, key_bytes(121, n), 1900000000};
    case 5: {
      char serial[32];
      std::snprintf(serial, sizeof serial, "%016zX", n);
      return IssuanceRecord{serial, ae, 1700000000, 1900000000, 0};
    }
    default:
      return PinnedKeyRecord{"ni:///sha-256;key-" + std::to_string(n), ae};
  }
}

std::size_t read_file(const fs::path& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) std::abort();
  struct stat st {};
  ::fstat(fd, &st);
  std::vector<std::uint8_t> content(static_cast<std::size_t>(st.st_size));
  std::size_t done = 0;
  while (done < content.size()) {
    const ssize_t n = ::read(fd, content.data() + done, content.size() - done);
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  return done;
}

// Decrypts count entries of plaintext_size bytes each, in memory: the AEAD cost alone.
double aead_baseline(std::size_t count, std::size_t plaintext_size) {
  const SecretBuffer key = SecretBuffer::random(crypto_aead_xchacha20poly1305_ietf_KEYBYTES);
  std::vector<std::uint8_t> nonce(crypto_aead_xchacha20poly1305_ietf_NPUBBYTES, 1);
  std::vector<std::uint8_t> plain(plaintext_size, 0x42);
  std::vector<std::uint8_t> sealed(plaintext_size + crypto_aead_xchacha20poly1305_ietf_ABYTES);
  const std::uint8_t ad[27] = {};
  unsigned long long length = 0;
  crypto_aead_xchacha20poly1305_ietf_encrypt(sealed.data(), &length, plain.data(), plain.size(), ad, sizeof ad, nullptr,
                                             nonce.data(), key.data());
  SecretBuffer out(plaintext_size);
  return best_of_3([&] {
    for (std::size_t i = 0; i < count; ++i) {
      if (crypto_aead_xchacha20poly1305_ietf_decrypt(out.data(), &length, nullptr, sealed.data(), sealed.size(), ad,
                                                     sizeof ad, nonce.data(), key.data()) != 0) {
        std::abort();
      }
    }
  });
}

void print_row(const char* name, std::size_t records, double seconds, double read_s, double aead_s) {
  std::printf("%-40s %9zu %10.4f %12.0f %9.1fx %9.2fx\n", name, records, seconds,
              records > 0 ? static_cast<double>(records) / seconds : 0.0, seconds / read_s, seconds / aead_s);
}

}  // namespace

int main(int argc, char** argv) {
  const std::size_t records = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 100000;
  const std::size_t journal_puts = records / 5;
  const char* tmpdir = std::getenv("TMPDIR");
  const std::string base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : (tmpdir != nullptr ? tmpdir : "/tmp");
  std::string templ = base + "/dauth-bench-keystore-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) return 1;
  const fs::path dir = templ;
  std::printf("key store load benchmark: %zu records (+%zu journal puts) in %s\n", records, journal_puts, dir.c_str());

  double put_s = 0;
  double close_s = 0;
  {
    auto store = KeyStore::open(dir, master_key());
    if (!store) return std::fprintf(stderr, "%s\n", store.error().to_string().c_str()), 1;
    const auto start = Clock::now();
    for (std::size_t n = 0; n < records; ++n) {
      if (auto ok = store->put(mixed_record(n)); !ok)
        return std::fprintf(stderr, "%s\n", ok.error().to_string().c_str()), 1;
    }
    if (auto ok = store->compact(); !ok) return 1;
    put_s = std::chrono::duration<double>(Clock::now() - start).count();
    const auto closing = Clock::now();
    store = make_error(Errc::internal, "closed");  // destroys the store: every record's SecretBuffer is freed
    close_s = std::chrono::duration<double>(Clock::now() - closing).count();
  }
  const fs::path snapshot = dir / "keys.snapshot";
  const std::size_t snapshot_bytes = fs::file_size(snapshot);
  const std::size_t entry_plaintext = (snapshot_bytes - 18) / (records + 1) - 44;

  const double read_s = best_of_3([&] { (void)read_file(snapshot); });
  const double aead_s = aead_baseline(records, entry_plaintext);
  const double open_snapshot_s = best_of_3([&] {
    auto store = KeyStore::open(dir, master_key());
    if (!store || store->size() != records) std::abort();
  });

  // Materialising records (first find()/for_each()) costs one guarded allocation per secret.
  double materialise_s = 0;
  std::size_t materialised = 0;
  {
    auto store = KeyStore::open(dir, master_key());
    if (!store) return 1;
    const auto start = Clock::now();
    store->for_each(RecordKind::session_key, [&](const Record&) { ++materialised; });
    materialise_s = std::chrono::duration<double>(Clock::now() - start).count();
  }

  {
    auto store = KeyStore::open(dir, master_key());
    if (!store) return 1;
    for (std::size_t n = 0; n < journal_puts; ++n) {
      if (!store->put(mixed_record(n * 3))) return 1;
    }
  }
  const std::size_t journal_bytes = fs::file_size(dir / "keys.journal");
  const double read_both_s = best_of_3([&] {
    (void)read_file(snapshot);
    (void)read_file(dir / "keys.journal");
  });
  const double aead_both_s = aead_baseline(records + journal_puts, entry_plaintext);
  OpenReport report;
  const double open_both_s = best_of_3([&] {
    auto store = KeyStore::open(dir, master_key(), &report);
    if (!store || store->size() != records) std::abort();
  });

  std::printf("snapshot %zu bytes, journal %zu bytes, mean entry plaintext %zu bytes\n\n", snapshot_bytes,
              journal_bytes, entry_plaintext);
  std::printf("%-40s %9s %10s %12s %10s %10s\n", "operation", "records", "seconds", "records/s", "vs read", "vs aead");
  print_row("baseline: read() snapshot", records, read_s, read_s, aead_s);
  print_row("baseline: AEAD-open entries in memory", records, aead_s, read_s, aead_s);
  print_row("open(): snapshot only", records, open_snapshot_s, read_s, aead_s);
  print_row("baseline: read() snapshot + journal", records + journal_puts, read_both_s, read_both_s, aead_both_s);
  print_row("baseline: AEAD-open snapshot + journal", records + journal_puts, aead_both_s, read_both_s, aead_both_s);
  print_row("open(): snapshot + journal", records + journal_puts, open_both_s, read_both_s, aead_both_s);
  std::printf("\nfirst for_each() of the %zu session keys (materialises them): %.4f s, %.1f us per record\n",
              materialised, materialise_s,
              materialised ? 1e6 * materialise_s / static_cast<double>(materialised) : 0.0);
  std::printf("set-up: %zu put() + compact() on %s: %.2f s (%.0f puts/s); closing that store: %.2f s\n", records,
              base.c_str(), put_s, static_cast<double>(records) / put_s, close_s);
  std::printf("journal entries replayed by the last open(): %zu\n", report.journal_entries);
  std::error_code ignored;
  fs::remove_all(dir, ignored);
  return 0;
}

// libFuzzer target for the sealed key store (crypto/src/keystore_codec.hpp, keystore.cpp).
//
// Input: byte 0 = mode (bit 0: the entries go to the journal instead of the snapshot; bit 1: cut the last 5 bytes
// off that file), then entry plaintexts, each as u16 big-endian length + bytes (a length past the end takes the
// rest). Every plaintext goes through the entry decoders directly; then they are sealed with a fixed test master
// key into a real store directory, so that KeyStore::open() runs its whole logic (end marker, counts, duplicates,
// removes, torn tails) on entries whose tags verify, followed by a compaction and a second open that must agree.
// The decoders must refuse bad input with an Error, never crash, leak or read out of bounds; what decodes must
// encode back to the same bytes.
//
// Seeds come from a real store: DAUTH_FUZZ_KEYSTORE_WRITE_SEEDS=<dir> ./fuzz_keystore -runs=0 decrypts the files of
// a freshly written store and writes them in the input format above (tests/fuzz/corpus/fuzz_keystore/).
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../../crypto/src/keystore_codec.hpp"
#include "dauth/crypto/kdf.hpp"
#include "dauth/crypto/keystore.hpp"

namespace codec = dauth::crypto::keystore_codec;
using dauth::Bytes;
using dauth::ByteView;
using dauth::SecretBuffer;
namespace fs = std::filesystem;

namespace {

constexpr std::uint64_t kGeneration = 7;

SecretBuffer fuzz_master_key() {
  SecretBuffer key(dauth::crypto::kMasterKeySize);
  for (std::size_t i = 0; i < key.size(); ++i) key.data()[i] = static_cast<std::uint8_t>(0xa5 ^ i);
  return key;
}

// The same derivation as KeyStore::open() (docs/keystore-format.md, "Keys").
const SecretBuffer& sealing_key() {
  static const SecretBuffer key = [] {
    auto derived = dauth::crypto::hkdf_sha256(fuzz_master_key(), ByteView(), ByteView::of("dauth key store v1 sealing"),
                                              codec::kSealingKeySize);
    if (!derived.ok()) std::abort();
    return std::move(derived).value();
  }();
  return key;
}

// A fresh 0700 directory (on tmpfs when there is one), removed with its content on destruction: libFuzzer may end
// the process without running atexit handlers, so nothing may outlive one input.
class WorkDir {
 public:
  WorkDir() {
    const char* tmpdir = std::getenv("TMPDIR");
    const std::string base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : (tmpdir != nullptr ? tmpdir : "/tmp");
    std::string templ = base + "/dauth-fuzz-keystore-XXXXXX";
    if (::mkdtemp(templ.data()) == nullptr) std::abort();
    path_ = templ;
  }
  ~WorkDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  WorkDir(const WorkDir&) = delete;
  WorkDir& operator=(const WorkDir&) = delete;
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

void write_store_file(const fs::path& path, const Bytes& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(content.data()), static_cast<std::streamsize>(content.size()));
  out.close();
  fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write, fs::perm_options::replace);
}

void check_decoders(ByteView plaintext) {
  auto skimmed = codec::parse_entry(plaintext, codec::SecretFields::skip);
  auto decoded = codec::parse_entry(plaintext, codec::SecretFields::copy);
  if (skimmed.ok() != decoded.ok()) __builtin_trap();
  const auto measured = codec::measure_entry(plaintext);
  if (measured && *measured > plaintext.size) __builtin_trap();
  if (!decoded.ok()) return;
  if (!measured || *measured != plaintext.size) __builtin_trap();  // a whole entry measures as itself
  if (decoded->op == codec::EntryOp::put) {
    // Canonical encoding: the decoded record encodes back to exactly the bytes it came from.
    const auto& record = *decoded->record;
    if (codec::encoded_record_size(record) != decoded->record_bytes.size) __builtin_trap();
    SecretBuffer again(decoded->record_bytes.size);
    codec::write_record(record, again.data());
    if (!again.equals(decoded->record_bytes)) __builtin_trap();
    if (dauth::crypto::id_of(*skimmed->record) != dauth::crypto::id_of(record)) __builtin_trap();
    auto lazy = codec::parse_record(decoded->record_bytes, codec::SecretFields::copy);
    if (!lazy.ok()) __builtin_trap();
    (void)dauth::crypto::validate(record);
  }
}

void run_store(const std::vector<ByteView>& plaintexts, bool into_journal, bool tear) {
  const WorkDir work;
  const fs::path& dir = work.path();
  Bytes snapshot;
  Bytes journal;
  codec::append_header(snapshot, codec::FileKind::snapshot, kGeneration);
  codec::append_header(journal, codec::FileKind::journal, kGeneration);
  Bytes& target = into_journal ? journal : snapshot;
  const auto kind = into_journal ? codec::FileKind::journal : codec::FileKind::snapshot;
  std::uint64_t sequence = 0;
  for (const ByteView& plaintext : plaintexts) {
    codec::append_sealed_entry(target, sealing_key(), kind, kGeneration, sequence++, plaintext);
  }
  if (into_journal) {
    std::uint8_t end[codec::kEndEntrySize];
    codec::write_end_entry(0, end);
    codec::append_sealed_entry(snapshot, sealing_key(), codec::FileKind::snapshot, kGeneration, 0,
                               ByteView(end, sizeof end));
  }
  if (tear) target.resize(target.size() > codec::kHeaderSize + 5 ? target.size() - 5 : target.size());
  write_store_file(dir / "keys.snapshot", snapshot);
  write_store_file(dir / "keys.journal", journal);

  std::size_t size = 0;
  {
    dauth::crypto::OpenReport report;
    auto store = dauth::crypto::KeyStore::open(dir, fuzz_master_key(), &report);
    if (!store.ok()) return;
    std::size_t visited = 0;
    for (std::uint8_t k = 1; k <= std::variant_size_v<dauth::crypto::Record>; ++k) {
      store->for_each(static_cast<dauth::crypto::RecordKind>(k), [&](const dauth::crypto::Record&) { ++visited; });
    }
    if (visited != store->size()) __builtin_trap();  // every indexed record must decode
    if (!store->compact().ok()) __builtin_trap();
    size = store->size();
  }
  // What one open accepted and compacted, the next open reads back whole.
  dauth::crypto::OpenReport report;
  auto reopened = dauth::crypto::KeyStore::open(dir, fuzz_master_key(), &report);
  if (!reopened.ok() || reopened->size() != size || report.snapshot_records != size || report.torn_tail) {
    __builtin_trap();
  }
}

// ---- seeds from a real store -----------------------------------------------------------------------------------

std::vector<Bytes> decrypt_file(const fs::path& path, codec::FileKind kind) {
  std::ifstream in(path, std::ios::binary);
  const Bytes file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto header = codec::parse_header(file, kind, path.filename().string());
  std::vector<Bytes> plaintexts;
  if (!header.ok()) return plaintexts;
  std::size_t offset = codec::kHeaderSize;
  for (std::uint64_t sequence = 0; offset < file.size(); ++sequence) {
    const codec::Frame frame = codec::read_frame(file, offset);
    if (frame.status != codec::FrameStatus::complete) break;
    SecretBuffer plain(frame.length - codec::kTagSize);
    if (!codec::open_entry(sealing_key(), kind, header->generation, sequence, frame, plain.data())) break;
    plaintexts.emplace_back(plain.data(), plain.data() + plain.size());  // test keys only: fine outside SecretBuffer
    offset += frame.total_size;
  }
  return plaintexts;
}

void write_seed(const fs::path& dir, const std::string& name, std::uint8_t mode, const std::vector<Bytes>& entries) {
  Bytes input{mode};
  for (const auto& entry : entries) {
    input.push_back(static_cast<std::uint8_t>(entry.size() >> 8));
    input.push_back(static_cast<std::uint8_t>(entry.size()));
    input.insert(input.end(), entry.begin(), entry.end());
  }
  std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(input.data()), static_cast<std::streamsize>(input.size()));
}

SecretBuffer pattern(std::size_t size, std::uint8_t seed) {
  SecretBuffer secret(size);
  for (std::size_t i = 0; i < size; ++i) secret.data()[i] = static_cast<std::uint8_t>(seed + 3 * i);
  return secret;
}

void write_seeds(const fs::path& out_dir) {
  using namespace dauth::crypto;
  fs::create_directories(out_dir);
  const WorkDir work;
  const fs::path& store_dir = work.path();
  {
    auto store = KeyStore::open(store_dir, fuzz_master_key());
    if (!store.ok()) std::abort();
    const std::string ke_id = "000102030405060708090A0B0C0D0E0F@mef.example.net";
    std::vector<Record> records;
    records.emplace_back(BootstrapKeyRecord{"boot-1@mef.example.net", pattern(16, 1), "CAE-meter-01"});
    records.emplace_back(EnroleeRecord{
        "enrolee-7@mef.example.net", pattern(16, 2), "CAE-meter-07", {"CAE-target-1", "/in-cse/CAE-t2"}, 86400, true});
    records.emplace_back(EnrolmentKeyRecord{ke_id, pattern(32, 3), "CAE-meter-01", {"CAE-target-1"}, 1900000000, 0});
    records.emplace_back(SessionKeyRecord{ke_id, pattern(32, 4), "CAE-meter-01", "CAE-target-1", 22, 1900000000});
    records.emplace_back(CertificateRecord{"mef-ca", {Bytes{0x30, 0x03, 0x02, 0x01, 0x01}}, pattern(40, 5), 0});
    records.emplace_back(CertificateRecord{"CAE-token", {Bytes{0x30, 0x03, 0x02, 0x01, 0x02}}, SecretBuffer(), 7,
                                           "pkcs11:token=t;object=CAE-token"});
    records.emplace_back(IssuanceRecord{"01AB", "CAE-meter-01", 1700000000, 1800000000, 0});
    records.emplace_back(PinnedKeyRecord{"ni:///sha-256;abcd", "CAE-rpk-9"});
    for (auto& record : records) {
      if (!store->put(std::move(record)).ok()) std::abort();
    }
    if (!store->compact().ok()) std::abort();
    if (!store->put(BootstrapKeyRecord{"boot-2@mef.example.net", pattern(20, 6), "CAE-2"}).ok()) std::abort();
    if (!store->remove(RecordKind::pinned_key, "ni:///sha-256;abcd").ok()) std::abort();
  }
  const auto snapshot = decrypt_file(store_dir / "keys.snapshot", codec::FileKind::snapshot);
  const auto journal = decrypt_file(store_dir / "keys.journal", codec::FileKind::journal);
  if (snapshot.size() != 8 || journal.size() != 2) std::abort();
  write_seed(out_dir, "snapshot", 0, snapshot);
  write_seed(out_dir, "journal", 1, journal);
  write_seed(out_dir, "journal-torn", 3, journal);
  for (std::size_t i = 0; i < snapshot.size(); ++i) write_seed(out_dir, "entry-" + std::to_string(i), 0, {snapshot[i]});
  write_seed(out_dir, "entry-remove", 1, {journal[1]});
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* seeds = std::getenv("DAUTH_FUZZ_KEYSTORE_WRITE_SEEDS")) write_seeds(seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t mode = data[0];
  std::vector<ByteView> plaintexts;
  std::size_t offset = 1;
  while (offset < size && plaintexts.size() < 64) {
    std::size_t length = size - offset >= 2 ? (std::size_t{data[offset]} << 8 | data[offset + 1]) : 0;
    offset += std::min<std::size_t>(2, size - offset);
    length = std::min(length, size - offset);
    plaintexts.emplace_back(data + offset, length);
    offset += length;
  }
  check_decoders(ByteView(data, size));
  for (const ByteView& plaintext : plaintexts) check_decoders(plaintext);
  run_store(plaintexts, (mode & 1) != 0, (mode & 2) != 0);
  return 0;
}

// The sealed key store (crypto/include/dauth/crypto/keystore.hpp, docs/keystore-format.md): real files in a
// temporary directory, real crashes (SIGKILL of a writer process).
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>

#include "dauth/crypto/key_file.hpp"
#include "dauth/crypto/keystore.hpp"
#include "keystore_test_support.hpp"
#include "support.hpp"
// The record encoding itself, for the compatibility of stores written before a field was added.
#include "../../crypto/src/keystore_codec.hpp"

using namespace dauth;
using namespace dauth::crypto;
using namespace dauth::crypto::keystore_test;
namespace fs = std::filesystem;

namespace {

const std::string kKeId1 = "000102030405060708090A0B0C0D0E0F@mef.example.net";
const std::string kKeId2 = "F0E0D0C0B0A090807060504030201000@mef.example.net";
const std::string kTokenKeyUri = "pkcs11:token=dauth;object=CAE-token-4;type=private";

// One record of every type, all fields set to values that differ from the defaults.
std::vector<Record> one_of_each() {
  std::vector<Record> records;
  records.emplace_back(BootstrapKeyRecord{"boot-1@mef.example.net", patterned_secret(16, 1), "CAE-meter-01"});
  records.emplace_back(EnroleeRecord{"enrolee-7@mef.example.net",
                                     patterned_secret(24, 2),
                                     "/in-cse/CAE-meter-07",
                                     {"CAE-target-1", "//sp.example/in-cse/CAE-t2"},
                                     86400,
                                     true});
  records.emplace_back(EnroleeRecord{"cert:CAE-cert-3", SecretBuffer(), "CAE-cert-3", {}, 3600, true});
  records.emplace_back(
      EnrolmentKeyRecord{kKeId1, patterned_secret(32, 3), "CAE-meter-01", {"CAE-target-1"}, 1900000000, 1800000000});
  records.emplace_back(
      SessionKeyRecord{kKeId2, patterned_secret(32, 4), "CAE-meter-01", "CAE-target-1", 40, 1900000123});
  records.emplace_back(CertificateRecord{
      "mef-ca", {Bytes{0x30, 0x82, 0x01}, Bytes{0x30, 0x03, 0x02, 0x01}}, patterned_secret(121, 5), -5});
  records.emplace_back(IssuanceRecord{"01AB", "CAE-meter-01", 1700000000, 1800000000, 0});
  records.emplace_back(PinnedKeyRecord{"ni:///sha-256;abcdEFGH-_", "CAE-rpk-9"});
  // A certificate whose key is in a PKCS#11 token: the optional trailing field.
  records.emplace_back(CertificateRecord{
      "CAE-token-4", {Bytes{0x30, 0x03, 0x02, 0x01, 0x07}}, SecretBuffer(), 1900000456, kTokenKeyUri});
  return records;
}

bool same(const SecretBuffer& a, const SecretBuffer& b) { return a.equals(b); }
bool same(const std::string& a, const std::string& b) { return a == b; }
bool same(const std::vector<std::string>& a, const std::vector<std::string>& b) { return a == b; }
bool same(const std::vector<Bytes>& a, const std::vector<Bytes>& b) { return a == b; }
template <class T>
std::enable_if_t<std::is_arithmetic_v<T>, bool> same(T a, T b) {
  return a == b;
}

// Field-by-field equality; SecretBuffers compare with equals().
bool same_record(const Record& a, const Record& b) {
  if (a.index() != b.index()) return false;
  return std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        const T& y = std::get<T>(b);
        if constexpr (std::is_same_v<T, BootstrapKeyRecord>) {
          return same(x.kpm_id, y.kpm_id) && same(x.kpm, y.kpm) && same(x.ae_id, y.ae_id);
        } else if constexpr (std::is_same_v<T, EnroleeRecord>) {
          return same(x.credential_id, y.credential_id) && same(x.kpm, y.kpm) && same(x.enrolee_id, y.enrolee_id) &&
                 same(x.targets, y.targets) && same(x.enrolment_lifetime_s, y.enrolment_lifetime_s) &&
                 same(x.certificate_enrolment, y.certificate_enrolment);
        } else if constexpr (std::is_same_v<T, EnrolmentKeyRecord>) {
          return same(x.ke_id, y.ke_id) && same(x.ke, y.ke) && same(x.enrolee_id, y.enrolee_id) &&
                 same(x.targets, y.targets) && same(x.expires_at, y.expires_at) && same(x.revoked_at, y.revoked_at);
        } else if constexpr (std::is_same_v<T, SessionKeyRecord>) {
          return same(x.ke_id, y.ke_id) && same(x.key, y.key) && same(x.peer_ae_id, y.peer_ae_id) &&
                 same(x.local_ae_id, y.local_ae_id) && same(x.suid, y.suid) && same(x.expires_at, y.expires_at);
        } else if constexpr (std::is_same_v<T, CertificateRecord>) {
          return same(x.name, y.name) && same(x.chain_der, y.chain_der) && same(x.private_key_der, y.private_key_der) &&
                 same(x.expires_at, y.expires_at) && same(x.private_key_uri, y.private_key_uri);
        } else if constexpr (std::is_same_v<T, IssuanceRecord>) {
          return same(x.serial_hex, y.serial_hex) && same(x.ae_id, y.ae_id) && same(x.issued_at, y.issued_at) &&
                 same(x.expires_at, y.expires_at) && same(x.revoked_at, y.revoked_at);
        } else if constexpr (std::is_same_v<T, PinnedKeyRecord>) {
          return same(x.public_key_id, y.public_key_id) && same(x.ae_id, y.ae_id);
        } else {
          return same(x.mef_fqdn, y.mef_fqdn) && same(x.issuer, y.issuer) && same(x.version, y.version) &&
                 same(x.serials, y.serials) && same(x.received_at, y.received_at);
        }
      },
      a);
}

Record copy_record(const Record& record) {
  return std::visit(
      [](const auto& r) -> Record {
        using T = std::decay_t<decltype(r)>;
        if constexpr (std::is_same_v<T, BootstrapKeyRecord>) {
          return T{r.kpm_id, r.kpm.clone(), r.ae_id};
        } else if constexpr (std::is_same_v<T, EnroleeRecord>) {
          return T{r.credential_id, r.kpm.clone(),          r.enrolee_id,
                   r.targets,       r.enrolment_lifetime_s, r.certificate_enrolment};
        } else if constexpr (std::is_same_v<T, EnrolmentKeyRecord>) {
          return T{r.ke_id, r.ke.clone(), r.enrolee_id, r.targets, r.expires_at, r.revoked_at};
        } else if constexpr (std::is_same_v<T, SessionKeyRecord>) {
          return T{r.ke_id, r.key.clone(), r.peer_ae_id, r.local_ae_id, r.suid, r.expires_at};
        } else if constexpr (std::is_same_v<T, CertificateRecord>) {
          return T{r.name, r.chain_der, r.private_key_der.clone(), r.expires_at, r.private_key_uri};
        } else {
          return r;
        }
      },
      record);
}

void require_all_present(const KeyStore& store, const std::vector<Record>& records) {
  for (const auto& record : records) {
    const Record* found = store.find(kind_of(record), id_of(record));
    INFO(std::string(to_string(kind_of(record))) + " " + std::string(id_of(record)));
    REQUIRE(found != nullptr);
    CHECK(same_record(*found, record));
  }
}

// A store with a snapshot of several records and a journal with puts, an overwrite and a remove.
void build_mixed_store(const fs::path& dir) {
  KeyStore store = open_store(dir);
  for (auto& record : one_of_each()) REQUIRE(store.put(std::move(record)).ok());
  REQUIRE(store.compact().ok());
  REQUIRE(store.put(bootstrap(1, 9)).ok());
  REQUIRE(store.put(bootstrap(2, 10)).ok());
  REQUIRE(store.put(bootstrap(1, 11)).ok());
  REQUIRE(store.remove(RecordKind::pinned_key, "ni:///sha-256;abcdEFGH-_").ok());
}

}  // namespace

TEST_CASE("key store: every record type survives a round trip and a restart", "[keystore]") {
  test::TempDir dir;
  const std::vector<Record> records = one_of_each();
  {
    OpenReport report;
    KeyStore store = open_store(dir.path(), &report);
    CHECK(report.snapshot_records == 0);
    CHECK(store.size() == 0);
    for (const auto& record : records) REQUIRE(store.put(copy_record(record)).ok());
    require_all_present(store, records);
    CHECK(store.size() == records.size());
  }
  OpenReport report;
  KeyStore reopened = open_store(dir.path(), &report);
  CHECK(report.journal_entries == records.size());
  CHECK_FALSE(report.torn_tail);
  CHECK(reopened.size() == records.size());
  CHECK(reopened.size(RecordKind::enrolee) == 2);
  require_all_present(reopened, records);
  const auto* session = reopened.find<SessionKeyRecord>(session_key_id(kKeId2, "CAE-target-1", 40));
  REQUIRE(session != nullptr);
  CHECK(session->suid == 40);
  CHECK(reopened.find<BootstrapKeyRecord>(kKeId2) == nullptr);
  CHECK(reopened.find(RecordKind::session_key, "absent") == nullptr);

  std::vector<std::string> ids;
  reopened.for_each(RecordKind::enrolee, [&](const Record& r) { ids.emplace_back(id_of(r)); });
  CHECK(ids == std::vector<std::string>{"cert:CAE-cert-3", "enrolee-7@mef.example.net"});

  for (const char* name : {"keys.snapshot", "keys.journal"}) {
    struct stat st {};
    REQUIRE(::stat((dir / name).c_str(), &st) == 0);
    CHECK((st.st_mode & 0777) == 0600);
  }
}

TEST_CASE("key store: overwrite and remove survive a restart, before and after compaction", "[keystore]") {
  test::TempDir dir;
  {
    KeyStore store = open_store(dir.path());
    for (int i = 0; i < 20; ++i) REQUIRE(store.put(bootstrap(i, static_cast<std::uint8_t>(i))).ok());
    REQUIRE(store.put(bootstrap(3, 99)).ok());
    REQUIRE(store.remove(RecordKind::bootstrap_key, "boot-4@mef.example.net").ok());
    const auto missing = store.remove(RecordKind::bootstrap_key, "boot-4@mef.example.net");
    REQUIRE_FALSE(missing.ok());
    CHECK(missing.error().code == Errc::not_found);
  }
  for (int round = 0; round < 2; ++round) {
    OpenReport report;
    KeyStore store = open_store(dir.path(), &report);
    CHECK(store.size() == 19);
    CHECK(store.find<BootstrapKeyRecord>("boot-4@mef.example.net") == nullptr);
    const auto* three = store.find<BootstrapKeyRecord>("boot-3@mef.example.net");
    REQUIRE(three != nullptr);
    CHECK(three->kpm.equals(patterned_secret(16, 99)));
    if (round == 0) {
      CHECK(report.journal_entries == 22);
      REQUIRE(store.compact().ok());
      CHECK(store.size() == 19);
      REQUIRE(store.put(bootstrap(30, 30)).ok());
      REQUIRE(store.remove(RecordKind::bootstrap_key, "boot-30@mef.example.net").ok());
    } else {
      CHECK(report.snapshot_records == 19);
      CHECK(report.journal_entries == 2);
    }
  }
}

TEST_CASE("key store: sync_stats counts one journal fdatasync per put and remove and none for refusals",
          "[keystore]") {
  test::TempDir dir;
  KeyStore store = open_store(dir.path());
  const auto before = store.sync_stats();
  for (int i = 0; i < 5; ++i) REQUIRE(store.put(bootstrap(i, static_cast<std::uint8_t>(i))).ok());
  REQUIRE(store.remove(RecordKind::bootstrap_key, "boot-2@mef.example.net").ok());
  REQUIRE_FALSE(store.remove(RecordKind::bootstrap_key, "boot-2@mef.example.net").ok());  // nothing written
  REQUIRE_FALSE(store.put(BootstrapKeyRecord{"no at sign", patterned_secret(16, 1), "CAE-x"}).ok());
  const auto after = store.sync_stats();
  CHECK(after.syncs - before.syncs == 6);
  CHECK(after.time > before.time);
}

TEST_CASE("key store: a put of exactly the stored record writes nothing and holds() tells so without decoding",
          "[keystore]") {
  test::TempDir dir;
  const std::vector<Record> records = one_of_each();
  {
    KeyStore store = open_store(dir.path());
    for (const auto& record : records) {
      CHECK_FALSE(store.holds(record));
      REQUIRE(store.put(copy_record(record)).ok());
      CHECK(store.holds(record));
    }
    const auto syncs = store.sync_stats().syncs;
    for (const auto& record : records) REQUIRE(store.put(copy_record(record)).ok());  // stored as put: lazy slots
    CHECK(store.sync_stats().syncs == syncs);
    // Decoded by find(): still compared field for field.
    REQUIRE(store.find<BootstrapKeyRecord>("boot-1@mef.example.net") != nullptr);
    REQUIRE(store.put(copy_record(records[0])).ok());
    CHECK(store.sync_stats().syncs == syncs);
  }
  // After a restart the records lie encoded in the arenas of the opened files: the same.
  {
    OpenReport report;
    KeyStore store = open_store(dir.path(), &report);
    CHECK(report.journal_entries == records.size());  // the repeated puts left no entry
    const auto syncs = store.sync_stats().syncs;
    for (const auto& record : records) {
      CHECK(store.holds(record));
      REQUIRE(store.put(copy_record(record)).ok());
    }
    CHECK(store.sync_stats().syncs == syncs);
    // Any field that differs is a real put: a key byte, a target, a flag.
    auto changed_key = copy_record(records[0]);
    std::get<BootstrapKeyRecord>(changed_key).kpm = patterned_secret(16, 77);
    auto changed_target = copy_record(records[1]);
    std::get<EnroleeRecord>(changed_target).targets.back() = "CAE-target-9";
    auto changed_flag = copy_record(records[1]);
    std::get<EnroleeRecord>(changed_flag).certificate_enrolment = false;
    for (auto* record : {&changed_key, &changed_target, &changed_flag}) {
      CHECK_FALSE(store.holds(*record));
      REQUIRE(store.put(copy_record(*record)).ok());
      CHECK(store.holds(*record));
    }
    CHECK(store.sync_stats().syncs == syncs + 3);
    CHECK(store.find<BootstrapKeyRecord>("boot-1@mef.example.net")->kpm.equals(patterned_secret(16, 77)));
  }
  OpenReport report;
  CHECK(open_store(dir.path(), &report).size() == records.size());
  CHECK(report.journal_entries == records.size() + 3);
}

TEST_CASE("key store: put() compacts by itself when the journal grows past 4096 entries", "[keystore]") {
  // 4100 fdatasyncs take seconds to tens of seconds on a busy disk; on tmpfs they are free and the compaction logic
  // under test is the same.
  const std::unique_ptr<test::TempDir> owned = temp_dir_in_memory();
  const test::TempDir& dir = *owned;
  {
    KeyStore store = open_store(dir.path());
    for (int i = 0; i < 4100; ++i) REQUIRE(store.put(bootstrap(i % 10, static_cast<std::uint8_t>(i))).ok());
  }
  OpenReport report;
  KeyStore store = open_store(dir.path(), &report);
  CHECK(report.snapshot_records == 10);
  CHECK(report.journal_entries < 10);
  CHECK(store.size() == 10);
  const auto* last = store.find<BootstrapKeyRecord>("boot-9@mef.example.net");
  REQUIRE(last != nullptr);
  CHECK(last->kpm.equals(patterned_secret(16, static_cast<std::uint8_t>(4099))));
}

TEST_CASE("key store: validate() refuses bad identifiers and key sizes", "[keystore]") {
  test::TempDir dir;
  KeyStore store = open_store(dir.path());
  auto refused = [&](Record record, const std::string& fragment) {
    const auto result = store.put(std::move(record));
    INFO(fragment);
    REQUIRE_FALSE(result.ok());
    CHECK(result.error().code == Errc::invalid_argument);
    CHECK_THAT(result.error().message, Catch::Contains(fragment));
  };
  refused(BootstrapKeyRecord{"boot@mef.example.net", patterned_secret(15, 1), "CAE-1"}, "15 bytes");
  refused(BootstrapKeyRecord{"no-at-sign", patterned_secret(16, 1), "CAE-1"}, "kpm_id");
  refused(BootstrapKeyRecord{"boot@mef.example.net", patterned_secret(16, 1), "CAE 1"}, "ae_id");
  refused(EnrolmentKeyRecord{kKeId1, patterned_secret(31, 1), "CAE-1", {}, 0, 0}, "exactly 32");
  refused(SessionKeyRecord{"000102030405060708090a0b0c0d0e0f@mef.example.net", patterned_secret(32, 1), "CAE-1",
                           "CAE-2", 22, 0},
          "canonical");
  refused(SessionKeyRecord{kKeId1, patterned_secret(32, 1), "CAE-1", "CAE-2", 300, 0}, "suid");
  refused(EnroleeRecord{"e@mef.example.net", patterned_secret(16, 1), "CAE-1", {"bad target!"}, 0, false}, "targets");
  refused(CertificateRecord{"mef-ca", {Bytes{}}, patterned_secret(10, 1), 0}, "chain_der[0] is empty");
  // An empty chain is a raw public key credential (keystore.hpp).
  CHECK(validate(CertificateRecord{"CAE-rpk", {}, patterned_secret(10, 1), 0}).ok());
  // The key sealed here or in a token: exactly one of the two, and a token key by its lower-case RFC 7512 URI.
  CHECK(validate(CertificateRecord{"CAE-tok", {Bytes{0x30}}, SecretBuffer(), 0, kTokenKeyUri}).ok());
  refused(CertificateRecord{"CAE-tok", {Bytes{0x30}}, SecretBuffer(), 0}, "both empty");
  refused(CertificateRecord{"CAE-tok", {Bytes{0x30}}, patterned_secret(10, 1), 0, kTokenKeyUri}, "both set");
  refused(CertificateRecord{"CAE-tok", {Bytes{0x30}}, SecretBuffer(), 0, "PKCS11:token=t;object=k"},
          "does not start with 'pkcs11:'");
  refused(IssuanceRecord{"01ab", "CAE-1", 0, 0, 0}, "serial_hex");
  refused(PinnedKeyRecord{"", "CAE-1"}, "id length 0");
  refused(EnroleeRecord{"cert:CAE-1", patterned_secret(16, 1), "CAE-1", {}, 0, false}, "has no kpm");
  refused(EnroleeRecord{"e@mef.example.net", SecretBuffer(), "CAE-1", {}, 0, true}, "kpm is 0 bytes");
  CHECK(store.size() == 0);
}

TEST_CASE("key store: a certificate-bootstrapped enrolee need not be offered certificate enrolment", "[keystore]") {
  test::TempDir dir;
  KeyStore store = open_store(dir.path());
  REQUIRE(store.put(EnroleeRecord{"cert:CAE-valve", SecretBuffer(), "CAE-valve", {"CAE-meter"}, 3600, false}));
  REQUIRE(store.put(EnroleeRecord{"rpk:ni:///sha-256;abc", SecretBuffer(), "CAE-pump", {}, 3600, true}));
  CHECK(store.size() == 2);
}

TEST_CASE("key store: a wrong master key is refused and names itself", "[keystore]") {
  test::TempDir dir;
  build_mixed_store(dir.path());
  const Bytes before = test::read_binary_file(dir / "keys.snapshot");
  const auto opened = KeyStore::open(dir.path(), test_master_key(2));
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::crypto);
  CHECK_THAT(opened.error().message, Catch::Contains("wrong master key") && Catch::Contains("keys.snapshot") &&
                                         Catch::Contains("byte offset 18"));
  CHECK(test::read_binary_file(dir / "keys.snapshot") == before);

  const auto short_key = KeyStore::open(dir.path(), SecretBuffer(16));
  REQUIRE_FALSE(short_key.ok());
  CHECK(short_key.error().code == Errc::invalid_argument);
}

TEST_CASE("key store: one flipped byte anywhere in the snapshot fails open() and leaves the file alone", "[keystore]") {
  // Thousands of rewrites and opens: on tmpfs, where the detection logic runs the same and costs less.
  const std::unique_ptr<test::TempDir> owned = temp_dir_in_memory();
  const test::TempDir& dir = *owned;
  build_mixed_store(dir.path());
  const Bytes snapshot = test::read_binary_file(dir / "keys.snapshot");
  const Bytes journal = test::read_binary_file(dir / "keys.journal");
  REQUIRE(snapshot.size() > 200);
  for (std::size_t offset = 0; offset < snapshot.size(); ++offset) {
    for (const std::uint8_t mask : {std::uint8_t{0x01}, std::uint8_t{0x80}}) {
      Bytes damaged = snapshot;
      damaged[offset] ^= mask;
      test::write_file(dir / "keys.snapshot", damaged);
      const auto opened = KeyStore::open(dir.path(), test_master_key());
      INFO("offset " << offset << " mask " << int{mask});
      REQUIRE_FALSE(opened.ok());
      CHECK((opened.error().code == Errc::corrupt || opened.error().code == Errc::crypto));
      CHECK_THAT(opened.error().message, Catch::Contains("keys.snapshot"));
      REQUIRE(test::read_binary_file(dir / "keys.snapshot") == damaged);
      REQUIRE(test::read_binary_file(dir / "keys.journal") == journal);
    }
  }
  test::write_file(dir / "keys.snapshot", snapshot);
  CHECK(KeyStore::open(dir.path(), test_master_key()).ok());
}

TEST_CASE("key store: one flipped byte anywhere in the journal fails open() and leaves the file alone", "[keystore]") {
  // Thousands of rewrites and opens: on tmpfs, where the detection logic runs the same and costs less.
  const std::unique_ptr<test::TempDir> owned = temp_dir_in_memory();
  const test::TempDir& dir = *owned;
  build_mixed_store(dir.path());
  const Bytes snapshot = test::read_binary_file(dir / "keys.snapshot");
  const Bytes journal = test::read_binary_file(dir / "keys.journal");
  const std::size_t entries_end = journal_entries_end(journal);
  REQUIRE(journal.size() == kJournalFillStep);  // the rest is zero fill, checked below
  for (std::size_t offset = 0; offset < entries_end; ++offset) {
    for (const std::uint8_t mask : {std::uint8_t{0x01}, std::uint8_t{0x80}}) {
      Bytes damaged = journal;
      damaged[offset] ^= mask;
      test::write_file(dir / "keys.journal", damaged);
      OpenReport report;
      const auto opened = KeyStore::open(dir.path(), test_master_key(), &report);
      INFO("offset " << offset << " mask " << int{mask} << ": " << error_of(opened));
      if (offset == 9 && damaged[offset] == 2) {  // the low byte of the version field
        // The version field is not sealed: 3 -> 2 reads the same entries under version 2's stricter torn-tail rule.
        REQUIRE(opened.ok());
        CHECK(report.journal_entries == 4);
        CHECK_FALSE(report.torn_tail);
        continue;
      }
      REQUIRE_FALSE(opened.ok());
      CHECK((opened.error().code == Errc::corrupt || opened.error().code == Errc::crypto));
      CHECK_THAT(opened.error().message, Catch::Contains("keys.journal"));
      REQUIRE(test::read_binary_file(dir / "keys.journal") == damaged);
      REQUIRE(test::read_binary_file(dir / "keys.snapshot") == snapshot);
    }
  }
  // Not even a length field grown past the end of the file passes for an interrupted append.
  CHECK(torn_files(dir.path()).empty());
  // A flipped byte in the zero fill cannot be told from an interrupted append whose first sector never reached the
  // disk: the store may refuse to open or set the bytes aside as a torn tail, but it never loses an entry.
  std::vector<std::size_t> fill_offsets;
  for (std::size_t offset = entries_end; offset < entries_end + 64; ++offset) fill_offsets.push_back(offset);
  for (std::size_t offset = entries_end + 64; offset < journal.size(); offset += 4093) fill_offsets.push_back(offset);
  fill_offsets.push_back(journal.size() - 1);
  for (const std::size_t offset : fill_offsets) {
    for (const std::uint8_t mask : {std::uint8_t{0x01}, std::uint8_t{0x80}}) {
      Bytes damaged = journal;
      damaged[offset] ^= mask;
      test::write_file(dir / "keys.journal", damaged);
      OpenReport report;
      const auto opened = KeyStore::open(dir.path(), test_master_key(), &report);
      INFO("fill offset " << offset << " mask " << int{mask} << ": " << error_of(opened));
      if (!opened.ok()) {
        CHECK(opened.error().code == Errc::corrupt);
        REQUIRE(test::read_binary_file(dir / "keys.journal") == damaged);
        continue;
      }
      CHECK(report.torn_tail.has_value());
      CHECK(report.journal_entries == 4);
      CHECK(opened->find<BootstrapKeyRecord>("boot-1@mef.example.net")->kpm.equals(patterned_secret(16, 11)));
      CHECK(fs::file_size(dir / "keys.journal") == entries_end);
      for (const auto& torn : torn_files(dir.path())) fs::remove(torn);
    }
  }
  test::write_file(dir / "keys.journal", journal);
  OpenReport report;
  KeyStore store = open_store(dir.path(), &report);
  CHECK(report.journal_entries == 4);
  CHECK_FALSE(report.torn_tail);
}

TEST_CASE("key store: a truncated snapshot fails open() at every length", "[keystore]") {
  // Thousands of rewrites and opens: on tmpfs, where the detection logic runs the same and costs less.
  const std::unique_ptr<test::TempDir> owned = temp_dir_in_memory();
  const test::TempDir& dir = *owned;
  build_mixed_store(dir.path());
  const Bytes snapshot = test::read_binary_file(dir / "keys.snapshot");
  for (std::size_t length = 0; length < snapshot.size(); ++length) {
    const Bytes cut(snapshot.begin(), snapshot.begin() + static_cast<std::ptrdiff_t>(length));
    test::write_file(dir / "keys.snapshot", cut);
    const auto opened = KeyStore::open(dir.path(), test_master_key());
    INFO("length " << length);
    REQUIRE_FALSE(opened.ok());
    CHECK(opened.error().code == Errc::corrupt);
    REQUIRE(test::read_binary_file(dir / "keys.snapshot") == cut);
  }
  // The most likely cut, right after a whole entry, names the missing end marker.
  test::write_file(dir / "keys.snapshot", snapshot);
  {
    KeyStore store = open_store(dir.path());
    REQUIRE(store.compact().ok());
  }
  const Bytes compacted = test::read_binary_file(dir / "keys.snapshot");
  // The end entry is 4 + 24 + 9 + 16 = 53 bytes.
  test::write_file(dir / "keys.snapshot", Bytes(compacted.begin(), compacted.end() - 53));
  const auto opened = KeyStore::open(dir.path(), test_master_key());
  REQUIRE_FALSE(opened.ok());
  CHECK_THAT(opened.error().message, Catch::Contains("no end marker"));
}

TEST_CASE("key store: a journal cut inside its last entry opens, reports and keeps the torn bytes", "[keystore]") {
  // Thousands of rewrites and opens: on tmpfs, where the detection logic runs the same and costs less.
  const std::unique_ptr<test::TempDir> owned = temp_dir_in_memory();
  const test::TempDir& dir = *owned;
  build_mixed_store(dir.path());
  const Bytes snapshot = test::read_binary_file(dir / "keys.snapshot");
  const Bytes journal = test::read_binary_file(dir / "keys.journal");
  // The last entry is the remove of the pinned key: 4 + 24 + (1 + 1 + 2 + 24) + 16 bytes. The cuts drop the zero
  // fill as well: the journal ends with the file, as a version 1 journal or a fill that never reached the disk.
  const std::size_t last_entry_size = 4 + 24 + 28 + 16;
  const std::size_t entries_end = journal_entries_end(journal);
  const std::size_t last_entry_start = entries_end - last_entry_size;
  for (std::size_t length = last_entry_start; length <= entries_end; ++length) {
    test::write_file(dir / "keys.snapshot", snapshot);
    const Bytes cut(journal.begin(), journal.begin() + static_cast<std::ptrdiff_t>(length));
    test::write_file(dir / "keys.journal", cut);
    INFO("length " << length);
    OpenReport report;
    {
      KeyStore store = open_store(dir.path(), &report);
      // Zeros at the end of a version 2 journal are fill: a cut after only zero bytes of the entry is a clean end.
      const bool torn = length < entries_end &&
                        std::any_of(cut.begin() + static_cast<std::ptrdiff_t>(last_entry_start), cut.end(),
                                    [](std::uint8_t b) { return b != 0; });
      CHECK(report.torn_tail.has_value() == torn);
      CHECK(report.journal_entries == (length == entries_end ? 4u : 3u));
      // Removed only when the remove entry is whole.
      CHECK((store.find(RecordKind::pinned_key, "ni:///sha-256;abcdEFGH-_") == nullptr) == (length == entries_end));
      const auto* one = store.find<BootstrapKeyRecord>("boot-1@mef.example.net");
      REQUIRE(one != nullptr);
      CHECK(one->kpm.equals(patterned_secret(16, 11)));
      const auto torn_list = torn_files(dir.path());
      REQUIRE(torn_list.size() == (torn ? 1u : 0u));
      if (torn) {
        CHECK_THAT(*report.torn_tail, Catch::Contains("keys.journal.torn-") &&
                                          Catch::Contains("byte offset " + std::to_string(last_entry_start)));
        CHECK(test::read_binary_file(torn_list.front()) ==
              Bytes(cut.begin() + static_cast<std::ptrdiff_t>(last_entry_start), cut.end()));
        CHECK(fs::file_size(dir / "keys.journal") == last_entry_start);
        // The store goes on: the next put lands where the torn entry began.
        REQUIRE(store.put(bootstrap(40, 40)).ok());
        fs::remove(torn_list.front());
      }
    }
    OpenReport again;
    KeyStore store = open_store(dir.path(), &again);
    CHECK_FALSE(again.torn_tail);
    CHECK(torn_files(dir.path()).empty());
  }
}

TEST_CASE("key store: the journal is preallocated with zeros, which appends fill before it grows by one step",
          "[keystore]") {
  // 700 durable puts: on tmpfs, where the fill logic runs the same and costs less.
  const std::unique_ptr<test::TempDir> owned = temp_dir_in_memory();
  const test::TempDir& dir = *owned;
  int grown_at = -1;
  {
    KeyStore store = open_store(dir.path());
    const Bytes empty = test::read_binary_file(dir / "keys.journal");
    REQUIRE(empty.size() == kJournalFillStep);
    CHECK(empty[8] == 0);
    CHECK(empty[9] == 3);  // format version 3: zero fill, several entries per append allowed
    CHECK(std::all_of(empty.begin() + kJournalHeaderSize, empty.end(), [](std::uint8_t b) { return b == 0; }));
    // About 100 bytes per entry: 700 of them need a second step of fill, and only then does the file grow.
    for (int n = 0; n < 700; ++n) {
      REQUIRE(store.put(bootstrap(n, static_cast<std::uint8_t>(n))).ok());
      const auto size = fs::file_size(dir / "keys.journal");
      if (grown_at < 0 && size != kJournalFillStep) {
        grown_at = n;
        CHECK(size == 2 * kJournalFillStep);
        CHECK(journal_entries_end(test::read_binary_file(dir / "keys.journal")) > kJournalFillStep);
      }
    }
  }
  CHECK(grown_at > 500);
  const Bytes journal = test::read_binary_file(dir / "keys.journal");
  CHECK(journal.size() == 2 * kJournalFillStep);
  const std::size_t entries_end = journal_entries_end(journal);
  CHECK(std::all_of(journal.begin() + static_cast<std::ptrdiff_t>(entries_end), journal.end(),
                    [](std::uint8_t b) { return b == 0; }));
  OpenReport report;
  KeyStore store = open_store(dir.path(), &report);
  CHECK(report.journal_entries == 700);
  CHECK_FALSE(report.torn_tail);
  CHECK(store.size() == 700);
  CHECK(store.find<BootstrapKeyRecord>("boot-699@mef.example.net")->kpm.equals(patterned_secret(16, static_cast<std::uint8_t>(699))));
}

TEST_CASE("key store: an interrupted append into the zero fill opens, reports and keeps what was written",
          "[keystore]") {
  // Sector by sector: each state a crash can leave when only some sectors of the last append reached the disk.
  const std::unique_ptr<test::TempDir> owned = temp_dir_in_memory();
  const test::TempDir& dir = *owned;
  build_mixed_store(dir.path());
  const Bytes snapshot = test::read_binary_file(dir / "keys.snapshot");
  const Bytes before = test::read_binary_file(dir / "keys.journal");
  // An entry over several sectors, whose last sector holds only 5 bytes of it (fewer than a zero run that counts).
  {
    KeyStore store = open_store(dir.path());
    REQUIRE(store.put(CertificateRecord{"CAE-big", {Bytes(3071, 0x5a)}, patterned_secret(64, 7), 0}).ok());
  }
  const Bytes after = test::read_binary_file(dir / "keys.journal");
  REQUIRE(after.size() == before.size());
  const std::size_t entry_start = journal_entries_end(before);
  const std::size_t entry_end = journal_entries_end(after);
  REQUIRE(entry_end - entry_start > 3000);
  REQUIRE(entry_end % 512 == 5);

  // Torn states: one sector of the entry lost, or everything from a sector boundary on (a write cut short).
  std::vector<std::pair<std::size_t, std::size_t>> lost;  // [from, to) reads as zeros
  for (std::size_t sector = entry_start / 512 * 512; sector < entry_end; sector += 512) {
    const std::size_t from = std::max(sector, entry_start);
    const std::size_t to = std::min(sector + 512, entry_end);
    lost.emplace_back(from, to);
    lost.emplace_back(from, entry_end);
  }
  for (const auto& [from, to] : lost) {
    test::write_file(dir / "keys.snapshot", snapshot);
    Bytes torn = after;
    std::fill(torn.begin() + static_cast<std::ptrdiff_t>(from), torn.begin() + static_cast<std::ptrdiff_t>(to), 0);
    test::write_file(dir / "keys.journal", torn);
    INFO("zeros at [" << from << ", " << to << "), entry [" << entry_start << ", " << entry_end << ")");
    if (from == entry_start && to == entry_end) {
      // Nothing of the append reached the disk: the journal as it was before.
      OpenReport report;
      KeyStore store = open_store(dir.path(), &report);
      CHECK_FALSE(report.torn_tail);
      CHECK(report.journal_entries == 4);
      continue;
    }
    {
      OpenReport report;
      KeyStore store = open_store(dir.path(), &report);
      REQUIRE(report.torn_tail.has_value());
      CHECK_THAT(*report.torn_tail, Catch::Contains("byte offset " + std::to_string(entry_start)));
      CHECK(report.journal_entries == 4);
      CHECK(store.find<CertificateRecord>("CAE-big") == nullptr);
      CHECK(store.find<BootstrapKeyRecord>("boot-1@mef.example.net")->kpm.equals(patterned_secret(16, 11)));
      const auto torn_list = torn_files(dir.path());
      REQUIRE(torn_list.size() == 1);
      const Bytes kept = test::read_binary_file(torn_list.front());
      REQUIRE(kept.size() >= 1);
      CHECK(kept.size() <= entry_end - entry_start);
      CHECK(std::equal(kept.begin(), kept.end(), torn.begin() + static_cast<std::ptrdiff_t>(entry_start)));
      CHECK(fs::file_size(dir / "keys.journal") == entry_start);
      fs::remove(torn_list.front());
      // The next put lands where the torn entry began and writes a new fill.
      REQUIRE(store.put(bootstrap(40, 40)).ok());
      CHECK(fs::file_size(dir / "keys.journal") == kJournalFillStep);
    }
    OpenReport again;
    KeyStore store = open_store(dir.path(), &again);
    CHECK_FALSE(again.torn_tail);
    CHECK(again.journal_entries == 5);
    CHECK(store.find<BootstrapKeyRecord>("boot-40@mef.example.net") != nullptr);
  }

  // The whole entry, with one flipped byte instead of lost sectors, is damage, not an interrupted append.
  for (const std::size_t offset : {entry_start + 40, entry_start + 1500, entry_end - 1}) {
    test::write_file(dir / "keys.snapshot", snapshot);
    Bytes damaged = after;
    damaged[offset] ^= 0x01;
    test::write_file(dir / "keys.journal", damaged);
    const auto opened = KeyStore::open(dir.path(), test_master_key());
    INFO("offset " << offset);
    REQUIRE_FALSE(opened.ok());
    CHECK(opened.error().code == Errc::corrupt);
    CHECK(test::read_binary_file(dir / "keys.journal") == damaged);
  }
}

TEST_CASE("key store: a version 1 journal (no zero fill) is read and appended to as it is", "[keystore]") {
  test::TempDir dir;
  build_mixed_store(dir.path());
  const Bytes snapshot = test::read_binary_file(dir / "keys.snapshot");
  Bytes journal = test::read_binary_file(dir / "keys.journal");
  journal.resize(journal_entries_end(journal));
  journal[9] = 1;  // the version field: entries authenticate the same under both versions
  test::write_file(dir / "keys.journal", journal);
  {
    OpenReport report;
    KeyStore store = open_store(dir.path(), &report);
    CHECK(report.journal_entries == 4);
    CHECK_FALSE(report.torn_tail);
    REQUIRE(store.put(bootstrap(41, 41)).ok());
    // Appended without fill: an older dauth still reads this file.
    const Bytes appended = test::read_binary_file(dir / "keys.journal");
    CHECK(appended.size() == journal_entries_end(appended));
    CHECK(appended[9] == 1);
  }
  {
    KeyStore store = open_store(dir.path());
    CHECK(store.find<BootstrapKeyRecord>("boot-41@mef.example.net") != nullptr);
    REQUIRE(store.compact().ok());
  }
  CHECK(test::read_binary_file(dir / "keys.journal")[9] == 3);  // the next journal is version 3

  // Zeros after the entries of a version 1 journal are damage, not fill.
  test::write_file(dir / "keys.snapshot", snapshot);
  Bytes padded = journal;
  padded.resize(padded.size() + 100, 0);
  test::write_file(dir / "keys.journal", padded);
  const auto opened = KeyStore::open(dir.path(), test_master_key());
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::corrupt);
}

TEST_CASE("key store: a crash during compaction leaves a stale journal that is replaced", "[keystore]") {
  test::TempDir dir;
  build_mixed_store(dir.path());
  const Bytes old_journal = test::read_binary_file(dir / "keys.journal");
  const Bytes old_snapshot = test::read_binary_file(dir / "keys.snapshot");
  {
    KeyStore store = open_store(dir.path());
    REQUIRE(store.compact().ok());
  }
  // The state after the snapshot rename and before the journal rename.
  test::write_file(dir / "keys.journal", old_journal);
  {
    OpenReport report;
    KeyStore store = open_store(dir.path(), &report);
    CHECK(report.snapshot_records == 9);
    CHECK(report.journal_entries == 0);
    CHECK(store.find(RecordKind::pinned_key, "ni:///sha-256;abcdEFGH-_") == nullptr);
    CHECK(store.find<BootstrapKeyRecord>("boot-1@mef.example.net")->kpm.equals(patterned_secret(16, 11)));
    REQUIRE(store.put(bootstrap(50, 50)).ok());
  }
  {
    KeyStore store = open_store(dir.path());
    CHECK(store.find<BootstrapKeyRecord>("boot-50@mef.example.net") != nullptr);
  }
  // A journal newer than its snapshot cannot come from a crash.
  const Bytes new_journal = test::read_binary_file(dir / "keys.journal");
  test::write_file(dir / "keys.snapshot", old_snapshot);
  auto opened = KeyStore::open(dir.path(), test_master_key());
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::corrupt);
  CHECK_THAT(opened.error().message, Catch::Contains("newer"));
  CHECK(test::read_binary_file(dir / "keys.journal") == new_journal);
  // A missing journal next to a non-empty snapshot is not a state a crash leaves either.
  fs::remove(dir / "keys.journal");
  opened = KeyStore::open(dir.path(), test_master_key());
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::corrupt);
}

TEST_CASE("key files are written whole: temporary, fsync, rename or link, 0600 whatever the umask", "[keystore]") {
  test::TempDir dir;
  const Bytes first{'o', 'n', 'e', '\n'};
  const Bytes second{'t', 'w', 'o', '\n'};

  const mode_t previous_umask = ::umask(0);  // the most permissive umask must not leak into a key file's mode
  const auto created = write_key_file(dir / "k", first, IfExists::refuse);
  ::umask(previous_umask);
  REQUIRE(created.ok());
  struct stat st {};
  REQUIRE(::stat((dir / "k").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(test::read_text_file(dir / "k") == "one\n");
  CHECK_FALSE(fs::exists(dir / "k.tmp"));

  // refuse: the old file stays, and no temporary is left.
  const auto again = write_key_file(dir / "k", second, IfExists::refuse);
  REQUIRE_FALSE(again.ok());
  CHECK(again.error().code == Errc::exists);
  CHECK(test::read_text_file(dir / "k") == "one\n");
  CHECK_FALSE(fs::exists(dir / "k.tmp"));

  // A leftover temporary: refuse leaves it alone (it may be someone's file) and says so; replace (the key store,
  // which holds its directory's lock) removes it and takes the name.
  test::write_file(dir / "m.tmp", "someone's\n", 0600);
  const auto blocked = write_key_file(dir / "m", first, IfExists::refuse);
  REQUIRE_FALSE(blocked.ok());
  CHECK(blocked.error().code == Errc::exists);
  CHECK_THAT(blocked.error().message, Catch::Contains((dir / "m.tmp").string()));
  CHECK(test::read_text_file(dir / "m.tmp") == "someone's\n");
  CHECK_FALSE(fs::exists(dir / "m"));
  test::write_file(dir / "k.tmp", "half a", 0600);
  REQUIRE(write_key_file(dir / "k", second, IfExists::replace).ok());
  CHECK(test::read_text_file(dir / "k") == "two\n");
  CHECK_FALSE(fs::exists(dir / "k.tmp"));

  // The master key goes the same way: a leftover of an interrupted write is never taken for a key.
  test::write_file(dir / "master.key.tmp", "0123", 0600);
  const auto master = write_new_master_key_file(dir / "master.key");
  REQUIRE_FALSE(master.ok());
  CHECK(master.error().code == Errc::exists);
  CHECK_FALSE(fs::exists(dir / "master.key"));
  fs::remove(dir / "master.key.tmp");
  REQUIRE(write_new_master_key_file(dir / "master.key").ok());
  CHECK(load_master_key_file(dir / "master.key").ok());
  CHECK_FALSE(fs::exists(dir / "master.key.tmp"));

  const auto no_directory = write_key_file(dir / "absent" / "k", first, IfExists::refuse);
  REQUIRE_FALSE(no_directory.ok());
  CHECK(no_directory.error().code == Errc::io);
}

TEST_CASE("key store: file and directory permissions are enforced", "[keystore]") {
  test::TempDir dir;
  build_mixed_store(dir.path());
  ::chmod((dir / "keys.snapshot").c_str(), 0644);
  auto opened = KeyStore::open(dir.path(), test_master_key());
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::permission);
  CHECK_THAT(opened.error().message, Catch::Contains("mode 0644") && Catch::Contains("0600"));
  ::chmod((dir / "keys.snapshot").c_str(), 0600);
  ::chmod((dir / "keys.journal").c_str(), 0640);
  opened = KeyStore::open(dir.path(), test_master_key());
  REQUIRE_FALSE(opened.ok());
  CHECK_THAT(opened.error().message, Catch::Contains("keys.journal") && Catch::Contains("mode 0640"));
  ::chmod((dir / "keys.journal").c_str(), 0600);

  ::chmod(dir.path().c_str(), 0770);
  opened = KeyStore::open(dir.path(), test_master_key());
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::permission);
  CHECK_THAT(opened.error().message, Catch::Contains("mode 0770") && Catch::Contains("group or others"));
  // The one rule and advice, which dauthd also gives for daemon.state_directory (test_dauthd.cpp).
  CHECK(opened.error().message ==
        check_store_directory_mode(S_IFDIR | 0770, "key store directory " + dir.path().string()).error().message);
  CHECK(check_store_directory_mode(S_IFDIR | 0750, "d").ok());
  CHECK(check_store_directory_mode(S_IFDIR | 0702, "d").error().code == Errc::permission);
  ::chmod(dir.path().c_str(), 0755);  // readable by others is fine, writable is not
  CHECK(KeyStore::open(dir.path(), test_master_key()).ok());
  ::chmod(dir.path().c_str(), 0700);

  const auto absent = KeyStore::open(dir / "absent", test_master_key());
  REQUIRE_FALSE(absent.ok());
  CHECK(absent.error().code == Errc::not_found);
}

TEST_CASE("key store: a second open of the same directory is refused while the first is open", "[keystore]") {
  test::TempDir dir;
  KeyStore first = open_store(dir.path());
  const auto second = KeyStore::open(dir.path(), test_master_key());
  REQUIRE_FALSE(second.ok());
  CHECK_THAT(second.error().message, Catch::Contains("another process"));
}

TEST_CASE("key store: a second KeyStore in the same process is refused too, and the lock goes with the store",
          "[keystore]") {
  test::TempDir dir;
  {
    KeyStore first = open_store(dir.path());
    KeyStore moved = std::move(first);  // the lock travels with the open store
    const auto second = KeyStore::open(dir.path(), test_master_key());
    REQUIRE_FALSE(second.ok());
    CHECK(second.error().code == Errc::io);
    CHECK_THAT(second.error().message, Catch::Contains("already open") && Catch::Contains(dir.path().string()));
  }
  CHECK(KeyStore::open(dir.path(), test_master_key()).ok());  // released with the store
}

TEST_CASE("key store: find() pointers survive other puts, removes and compaction, as keystore.hpp promises",
          "[keystore]") {
  // Under the sanitizer build a dangling pointer here is a use-after-free report, not a silent pass.
  test::TempDir dir;
  KeyStore store = open_store(dir.path());
  auto make_key = [](std::uint8_t seed, const std::string& ke_id) {
    EnrolmentKeyRecord record;
    record.ke_id = ke_id;
    record.ke = patterned_secret(32, seed);
    record.enrolee_id = "CAE-pointer";
    record.expires_at = 1700000000;
    return record;
  };
  const std::string kept_id = "000102030405060708090A0B0C0D0E0F@mef.example.net";
  const std::string other_id = "101112131415161718191A1B1C1D1E1F@mef.example.net";
  REQUIRE(store.put(make_key(1, kept_id)).ok());
  REQUIRE(store.put(make_key(2, other_id)).ok());
  const auto* kept = store.find<EnrolmentKeyRecord>(kept_id);
  REQUIRE(kept != nullptr);
  const SecretBuffer expected = patterned_secret(32, 1);

  REQUIRE(store.put(make_key(3, "202122232425262728292A2B2C2D2E2F@mef.example.net")).ok());
  REQUIRE(store.put(make_key(4, other_id)).ok());  // replaces another record
  REQUIRE(store.remove(RecordKind::enrolment_key, other_id).ok());
  REQUIRE(store.compact().ok());
  KeyStore moved = std::move(store);
  CHECK(kept->ke.equals(expected));
  CHECK(kept->ke_id == kept_id);
  CHECK(moved.find<EnrolmentKeyRecord>(kept_id) == kept);
}

TEST_CASE("key store: a directory that is not a directory, or is missing, is named in the error", "[keystore]") {
  test::TempDir dir;
  test::write_file(dir / "plain", std::string("x"));
  const auto not_dir = KeyStore::open(dir / "plain", test_master_key());
  REQUIRE_FALSE(not_dir.ok());
  CHECK(not_dir.error().code == Errc::invalid_argument);
  CHECK_THAT(not_dir.error().message, Catch::Contains("plain") && Catch::Contains("not a directory"));
}

TEST_CASE("read_key_file: reads at most one byte past the limit, refuses open modes and non-files", "[keystore]") {
  test::TempDir dir;
  test::write_file(dir / "short", std::string("abc"));
  test::write_file(dir / "long", std::string(100, 'x'));
  test::write_file(dir / "empty", std::string());
  auto short_file = read_key_file(dir / "short", "test key file", 10);
  REQUIRE(short_file.ok());
  CHECK(short_file->equals(ByteView::of("abc")));
  auto long_file = read_key_file(dir / "long", "test key file", 10);
  REQUIRE(long_file.ok());
  CHECK(long_file->size() == 11);  // the caller sees "longer than allowed" without the file being read whole
  auto empty = read_key_file(dir / "empty", "test key file", 10);
  REQUIRE(empty.ok());
  CHECK(empty->empty());

  test::write_file(dir / "open", std::string("secret-bytes"), 0620);
  auto open_mode = read_key_file(dir / "open", "test key file", 100);
  REQUIRE_FALSE(open_mode.ok());
  CHECK(open_mode.error().code == Errc::permission);
  CHECK_THAT(open_mode.error().message, Catch::Contains("test key file") && Catch::Contains("mode 0620") &&
                                            !Catch::Contains("secret-bytes"));
  auto directory = read_key_file(dir.path(), "test key file", 100);
  REQUIRE_FALSE(directory.ok());
  CHECK(directory.error().code == Errc::permission);
  CHECK_THAT(directory.error().message, Catch::Contains("not a regular file"));
  auto missing = read_key_file(dir / "missing", "test key file", 100);
  REQUIRE_FALSE(missing.ok());
  CHECK(missing.error().code == Errc::not_found);
}

TEST_CASE("master key file: format, mode and creation", "[keystore]") {
  test::TempDir dir;
  const std::string hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
  test::write_file(dir / "good", hex);
  test::write_file(dir / "good-newline", hex + "\n");
  auto plain = load_master_key_file(dir / "good");
  auto newline = load_master_key_file(dir / "good-newline");
  REQUIRE(plain.ok());
  REQUIRE(newline.ok());
  CHECK(plain->size() == kMasterKeySize);
  CHECK(plain->equals(*newline));
  CHECK(plain->data()[1] == 0x11);
  CHECK(plain->data()[31] == 0xff);

  const std::vector<std::pair<std::string, std::string>> bad = {
      {"short", hex.substr(0, 63)},
      {"long", hex + "0"},
      {"two-newlines", hex + "\n\n"},
      {"crlf", hex + "\r\n"},
      {"space", " " + hex.substr(1)},
      {"not-hex", "g" + hex.substr(1)},
      {"empty", ""},
  };
  for (const auto& [name, content] : bad) {
    test::write_file(dir / name, content);
    const auto loaded = load_master_key_file(dir / name);
    INFO(name);
    REQUIRE_FALSE(loaded.ok());
    CHECK(loaded.error().code == Errc::parse);
    CHECK_THAT(loaded.error().message, Catch::Contains("64 hex"));
    CHECK_THAT(loaded.error().message, !Catch::Contains(hex.substr(2, 20)));  // never echoes key material
  }

  test::write_file(dir / "open-mode", hex, 0644);
  auto loaded = load_master_key_file(dir / "open-mode");
  REQUIRE_FALSE(loaded.ok());
  CHECK(loaded.error().code == Errc::permission);
  CHECK_THAT(loaded.error().message, Catch::Contains("mode 0644") && Catch::Contains("chmod 600"));
  test::write_file(dir / "group-write", hex, 0620);
  CHECK(load_master_key_file(dir / "group-write").error().code == Errc::permission);
  CHECK(load_master_key_file(dir / "absent").error().code == Errc::not_found);
  CHECK(load_master_key_file(dir.path()).error().code == Errc::permission);  // a directory is not a key file

  const mode_t previous_umask = ::umask(022);  // a permissive umask must not leak into the key file's mode
  const auto created = write_new_master_key_file(dir / "new");
  ::umask(previous_umask);
  REQUIRE(created.ok());
  struct stat st {};
  REQUIRE(::stat((dir / "new").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(fs::file_size(dir / "new") == 65);
  auto fresh = load_master_key_file(dir / "new");
  REQUIRE(fresh.ok());
  CHECK_FALSE(fresh->equals(*plain));
  const auto again = write_new_master_key_file(dir / "new");
  REQUIRE_FALSE(again.ok());
  CHECK(again.error().code == Errc::exists);
  CHECK(load_master_key_file(dir / "new")->equals(*fresh));  // untouched
  REQUIRE(write_new_master_key_file(dir / "other").ok());
  CHECK_FALSE(load_master_key_file(dir / "other")->equals(*fresh));

  // The key file opens a store it sealed, and only that one.
  test::TempDir store_dir;
  {
    auto store = KeyStore::open(store_dir.path(), std::move(fresh).value());
    REQUIRE(store.ok());
    REQUIRE(store->put(bootstrap(1, 1)).ok());
  }
  CHECK(KeyStore::open(store_dir.path(), std::move(load_master_key_file(dir / "new")).value()).ok());
  CHECK(KeyStore::open(store_dir.path(), std::move(load_master_key_file(dir / "other")).value()).error().code ==
        Errc::crypto);
}

TEST_CASE("master key credential: read from $CREDENTIALS_DIRECTORY", "[keystore]") {
  test::TempDir dir;
  const std::string hex(64, 'a');
  test::write_file(dir / "dauth-master-key", hex + "\n", 0400);
  const char* previous = std::getenv("CREDENTIALS_DIRECTORY");
  const std::string saved = previous ? previous : "";

  ::unsetenv("CREDENTIALS_DIRECTORY");
  auto unset = load_master_key_credential("dauth-master-key");
  REQUIRE_FALSE(unset.ok());
  CHECK(unset.error().code == Errc::not_found);
  CHECK_THAT(unset.error().message, Catch::Contains("CREDENTIALS_DIRECTORY"));

  ::setenv("CREDENTIALS_DIRECTORY", dir.path().c_str(), 1);
  auto loaded = load_master_key_credential("dauth-master-key");
  REQUIRE(loaded.ok());
  CHECK(loaded->size() == kMasterKeySize);
  CHECK(loaded->data()[0] == 0xaa);
  CHECK(load_master_key_credential("absent").error().code == Errc::not_found);
  CHECK(load_master_key_credential("../dauth-master-key").error().code == Errc::invalid_argument);
  CHECK(load_master_key_credential("").error().code == Errc::invalid_argument);

  if (previous) {
    ::setenv("CREDENTIALS_DIRECTORY", saved.c_str(), 1);
  } else {
    ::unsetenv("CREDENTIALS_DIRECTORY");
  }
}

// ---- crash consistency -----------------------------------------------------------------------------------------

TEST_CASE("key store: SIGKILL at any moment loses no acknowledged put or remove", "[keystore][crash]") {
  run_crash_trials(WriterMode::synchronous, 20261123, std::chrono::seconds(20));
}

TEST_CASE("key store: a revocation list record (kind 8) survives the journal and a restart and compaction",
          "[keystore]") {
  // Added after kinds 1-7 without a format change: stores without it open as before (every other test here).
  test::TempDir dir;
  const RevocationListRecord list{"mef.example.net", "CN=Example MEF CA", 3, {"01AB", "52FF"}, 1800000000};
  std::vector<Record> expected;
  expected.emplace_back(list);
  {
    KeyStore store = open_store(dir.path());
    REQUIRE(store.put(list).ok());
  }
  {
    KeyStore store = open_store(dir.path());
    require_all_present(store, expected);
    CHECK(to_string(RecordKind::revocation_list) == "revocation_list");
    REQUIRE(store.compact().ok());
  }
  KeyStore store = open_store(dir.path());
  require_all_present(store, expected);
  CHECK(store.put(RevocationListRecord{"not a name", "", 0, {}, 0}).error().code == Errc::invalid_argument);
  CHECK(store.put(RevocationListRecord{"mef.example.net", "", 0, {"01ab"}, 0}).error().code == Errc::invalid_argument);
  // Serials are compared byte for byte with Certificate::serial_hex(): a leading zero octet would never match.
  CHECK(store.put(RevocationListRecord{"mef.example.net", "", 0, {"008F0102"}, 0}).error().code ==
        Errc::invalid_argument);
  CHECK(store.put(RevocationListRecord{"mef.example.net", "", 0, {"8F0102"}, 0}).ok());
}

// ---- master-key rotation (reseal) --------------------------------------------------------------------------------

TEST_CASE("key store: reseal moves every record under the new key and the old key no longer opens it",
          "[keystore][reseal]") {
  test::TempDir dir;
  {
    KeyStore store = open_store(dir.path());
    for (int i = 0; i < 20; ++i) REQUIRE(store.put(bootstrap(i, static_cast<std::uint8_t>(i))).ok());
    REQUIRE(store.remove(RecordKind::bootstrap_key, bootstrap(3, 3).kpm_id).ok());  // a journal entry to carry over
    CHECK(store.sealed_with(test_master_key(1)));
    REQUIRE(store.reseal(test_master_key(2)).ok());
    CHECK(store.sealed_with(test_master_key(2)));
    CHECK_FALSE(store.sealed_with(test_master_key(1)));
    // Written after the switch: sealed under the new key as well.
    REQUIRE(store.put(bootstrap(30, 30)).ok());
  }
  auto old_key = KeyStore::open(dir.path(), test_master_key(1));
  REQUIRE_FALSE(old_key.ok());
  CHECK(old_key.error().code == Errc::crypto);
  CHECK(old_key.error().message.find("wrong master key") != std::string::npos);

  std::vector<SecretBuffer> both;
  both.push_back(test_master_key(1));
  both.push_back(test_master_key(2));
  OpenReport report;
  auto opened = KeyStore::open(dir.path(), std::move(both), &report);
  INFO(error_of(opened));
  REQUIRE(opened.ok());
  CHECK(report.master_key_index == 1);
  CHECK(opened->size() == 20);
  CHECK(opened->find<BootstrapKeyRecord>(bootstrap(3, 3).kpm_id) == nullptr);
  const auto* kept = opened->find<BootstrapKeyRecord>(bootstrap(7, 7).kpm_id);
  REQUIRE(kept != nullptr);
  CHECK(kept->kpm.equals(patterned_secret(16, 7)));
  CHECK(opened->find<BootstrapKeyRecord>(bootstrap(30, 30).kpm_id) != nullptr);
}

TEST_CASE("key store: reseal under the key it is sealed with writes nothing", "[keystore][reseal]") {
  test::TempDir dir;
  KeyStore store = open_store(dir.path());
  REQUIRE(store.put(bootstrap(1, 1)).ok());
  const auto snapshot_before = test::read_binary_file(dir.path() / "keys.snapshot");
  REQUIRE(store.reseal(test_master_key(1)).ok());
  CHECK(test::read_binary_file(dir.path() / "keys.snapshot") == snapshot_before);
  CHECK(store.reseal(SecretBuffer(16)).error().code == Errc::invalid_argument);  // a master key is 32 bytes
}

TEST_CASE("key store: open with candidate keys names the one that opened it and refuses when none does",
          "[keystore][reseal]") {
  test::TempDir dir;
  { KeyStore store = open_store(dir.path(), nullptr, 5); }
  std::vector<SecretBuffer> wrong;
  wrong.push_back(test_master_key(1));
  wrong.push_back(test_master_key(2));
  auto refused = KeyStore::open(dir.path(), std::move(wrong));
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.error().code == Errc::crypto);
  CHECK(refused.error().message.find("tried 2 master keys") != std::string::npos);

  std::vector<SecretBuffer> first_fits;
  first_fits.push_back(test_master_key(5));
  first_fits.push_back(test_master_key(2));
  OpenReport report;
  report.master_key_index = 7;
  REQUIRE(KeyStore::open(dir.path(), std::move(first_fits), &report).ok());
  CHECK(report.master_key_index == 0);

  // A new store is sealed under the first key.
  test::TempDir fresh;
  std::vector<SecretBuffer> keys;
  keys.push_back(test_master_key(3));
  keys.push_back(test_master_key(4));
  auto created = KeyStore::open(fresh.path(), std::move(keys));
  REQUIRE(created.ok());
  CHECK(created->sealed_with(test_master_key(3)));
}

TEST_CASE("key store: the state a crash right after the re-sealed snapshot leaves opens with the new key",
          "[keystore][reseal]") {
  // The new key's snapshot of generation G with the journal of G-1 that reseal()'s compaction left under the old
  // key, without entries (docs/keystore-format.md "Re-sealing"). Made here by giving the new journal's header the
  // older generation: the header is not sealed, and an empty journal has no entry that binds it.
  test::TempDir dir;
  {
    KeyStore store = open_store(dir.path());
    for (int i = 0; i < 5; ++i) REQUIRE(store.put(bootstrap(i, static_cast<std::uint8_t>(i))).ok());
    REQUIRE(store.reseal(test_master_key(2)).ok());
  }
  constexpr std::size_t kGenerationOffset = 10;  // magic (8), version (2), generation (u64, big-endian)
  const Bytes snapshot = test::read_binary_file(dir.path() / "keys.snapshot");
  Bytes journal = test::read_binary_file(dir.path() / "keys.journal");
  REQUIRE(std::equal(snapshot.begin() + kGenerationOffset, snapshot.begin() + kGenerationOffset + 8,
                     journal.begin() + kGenerationOffset));
  REQUIRE(journal[kGenerationOffset + 7] > 0);
  --journal[kGenerationOffset + 7];  // G-1 (the generation here is small: no borrow)
  test::write_file(dir.path() / "keys.journal", journal);

  auto old_key = KeyStore::open(dir.path(), test_master_key(1));
  REQUIRE_FALSE(old_key.ok());
  CHECK(old_key.error().code == Errc::crypto);
  std::vector<SecretBuffer> both;
  both.push_back(test_master_key(1));
  both.push_back(test_master_key(2));
  OpenReport report;
  auto opened = KeyStore::open(dir.path(), std::move(both), &report);
  INFO(error_of(opened));
  REQUIRE(opened.ok());
  CHECK(report.master_key_index == 1);
  CHECK(opened->size() == 5);
  // The stale journal was replaced by one of the snapshot's generation: writes go on under the new key.
  REQUIRE(opened->put(bootstrap(6, 6)).ok());
}

TEST_CASE("key store: SIGKILL at any moment of a reseal leaves a store that one of the two keys opens whole",
          "[keystore][crash][reseal]") {
  run_crash_trials(WriterMode::reseal, 20261207, std::chrono::seconds(6));
}

TEST_CASE("key store: a certificate record without private_key_uri reads as written before the field existed, one "
          "with it is that encoding plus the field",
          "[keystore]") {
  namespace codec = dauth::crypto::keystore_codec;
  // Written by hand in the layout of docs/keystore-format.md before private_key_uri: kind 5, name, a chain of one
  // DER, private_key_der, expires_at.
  const std::string name = "CAE-old";
  Bytes old_encoding{5, 0, static_cast<std::uint8_t>(name.size())};
  old_encoding.insert(old_encoding.end(), name.begin(), name.end());
  const Bytes der{0x30, 0x01, 0x00};
  old_encoding.insert(old_encoding.end(), {0, 1, 0, 0, 0, static_cast<std::uint8_t>(der.size())});
  old_encoding.insert(old_encoding.end(), der.begin(), der.end());
  old_encoding.insert(old_encoding.end(), {0, 0, 0, 4, 0xa1, 0xa2, 0xa3, 0xa4});
  old_encoding.insert(old_encoding.end(), {0, 0, 0, 0, 0x70, 0, 0, 0x2a});

  auto old_record = codec::parse_record(old_encoding, codec::SecretFields::copy);
  REQUIRE(old_record.ok());
  const auto& old_certificate = std::get<CertificateRecord>(*old_record);
  CHECK(old_certificate.private_key_der.size() == 4);
  CHECK(old_certificate.private_key_uri.empty());
  CHECK(old_certificate.expires_at == 0x7000002a);
  Bytes rewritten(codec::encoded_record_size(*old_record));
  codec::write_record(*old_record, rewritten.data());
  CHECK(rewritten == old_encoding);

  // The token form: the same fields (private_key_der empty) and then u16 length + URI.
  const Record in_token(CertificateRecord{name, {der}, SecretBuffer(), 0x7000002a, kTokenKeyUri});
  Bytes token_encoding(codec::encoded_record_size(in_token));
  codec::write_record(in_token, token_encoding.data());
  Bytes expected = old_encoding;
  expected.erase(expected.end() - 16, expected.end());  // private_key_der (4 + 4 bytes) and expires_at
  expected.insert(expected.end(), {0, 0, 0, 0, 0, 0, 0, 0, 0x70, 0, 0, 0x2a, 0,
                                   static_cast<std::uint8_t>(kTokenKeyUri.size())});
  expected.insert(expected.end(), kTokenKeyUri.begin(), kTokenKeyUri.end());
  CHECK(token_encoding == expected);
  auto token_record = codec::parse_record(token_encoding, codec::SecretFields::copy);
  REQUIRE(token_record.ok());
  CHECK(std::get<CertificateRecord>(*token_record).private_key_uri == kTokenKeyUri);

  // Present means non-empty and "pkcs11:": anything else after the record is trailing bytes, so that each record
  // has one encoding; and an entry measured inside zero fill does not take the fill for the field.
  Bytes empty_field = old_encoding;
  empty_field.insert(empty_field.end(), {0, 0});
  auto refused = codec::parse_record(empty_field, codec::SecretFields::copy);
  REQUIRE(!refused.ok());
  CHECK_THAT(refused.error().message, Catch::Contains("2 trailing bytes"));
  Bytes entry_in_fill{static_cast<std::uint8_t>(codec::EntryOp::put)};
  entry_in_fill.insert(entry_in_fill.end(), old_encoding.begin(), old_encoding.end());
  entry_in_fill.resize(entry_in_fill.size() + 64, 0);
  CHECK(codec::measure_entry(entry_in_fill) == 1 + old_encoding.size());
}

TEST_CASE("key store: a SUID 22 session key written before SUID 23 keys existed loads under its id and a SUID 23 "
          "key of the same KeID and AE is kept next to it",
          "[keystore]") {
  namespace codec = dauth::crypto::keystore_codec;
  // A SUID 22 record in the layout of docs/keystore-format.md, written by hand: kind 4, ke_id, key, peer_ae_id,
  // local_ae_id, suid (i32), expires_at. Put entries carry no id, so this is what any earlier release stored.
  const std::string peer = "CAE-meter";
  const std::string local = "CAE-valve";
  const SecretBuffer saef_key = patterned_secret(32, 7);
  Bytes old_encoding{4, 0, static_cast<std::uint8_t>(kKeId1.size())};
  old_encoding.insert(old_encoding.end(), kKeId1.begin(), kKeId1.end());
  old_encoding.insert(old_encoding.end(), {0, 0, 0, 32});
  old_encoding.insert(old_encoding.end(), saef_key.data(), saef_key.data() + saef_key.size());
  old_encoding.insert(old_encoding.end(), {0, static_cast<std::uint8_t>(peer.size())});
  old_encoding.insert(old_encoding.end(), peer.begin(), peer.end());
  old_encoding.insert(old_encoding.end(), {0, static_cast<std::uint8_t>(local.size())});
  old_encoding.insert(old_encoding.end(), local.begin(), local.end());
  old_encoding.insert(old_encoding.end(), {0, 0, 0, 22});
  old_encoding.insert(old_encoding.end(), {0, 0, 0, 0, 0x70, 0, 0, 0x2a});
  auto old_record = codec::parse_record(old_encoding, codec::SecretFields::copy);
  REQUIRE(old_record.ok());
  // The id every earlier release used for it (and wrote in its journal removals).
  const std::string old_id = kKeId1 + "#" + local;
  CHECK(id_of(*old_record) == old_id);
  CHECK(session_key_id(kKeId1, local) == old_id);
  CHECK(session_key_id(kKeId1, local, 22) == old_id);
  CHECK(session_key_id(kKeId1, local, 23) == old_id + "#23");

  test::TempDir dir;
  {
    KeyStore store = open_store(dir.path());
    REQUIRE(store.put(std::move(*old_record)).ok());
  }
  {
    KeyStore store = open_store(dir.path());
    const auto* saef = store.find<SessionKeyRecord>(old_id);
    REQUIRE(saef != nullptr);
    CHECK(saef->key.equals(saef_key));
    CHECK(saef->suid == 22);
    REQUIRE(store.put(SessionKeyRecord{kKeId1, patterned_secret(32, 9), peer, local, 23, 0x7000002b}).ok());
    CHECK(store.size(RecordKind::session_key) == 2);
  }
  for (int round = 0; round < 2; ++round) {  // from the journal, then from a snapshot
    KeyStore store = open_store(dir.path());
    REQUIRE(store.size(RecordKind::session_key) == 2);
    const auto* saef = store.find<SessionKeyRecord>(session_key_id(kKeId1, local, 22));
    const auto* esprim = store.find<SessionKeyRecord>(session_key_id(kKeId1, local, 23));
    REQUIRE(saef != nullptr);
    REQUIRE(esprim != nullptr);
    CHECK(saef->key.equals(saef_key));
    CHECK(esprim->key.equals(patterned_secret(32, 9)));
    CHECK(esprim->suid == 23);
    CHECK(esprim->expires_at == 0x7000002b);
    REQUIRE(store.compact().ok());
  }
  {
    // A removal by the id an earlier release wrote removes the SUID 22 record only.
    KeyStore store = open_store(dir.path());
    REQUIRE(store.remove(RecordKind::session_key, old_id).ok());
  }
  KeyStore store = open_store(dir.path());
  CHECK(store.find<SessionKeyRecord>(old_id) == nullptr);
  CHECK(store.find<SessionKeyRecord>(old_id + "#23") != nullptr);
}

// Group commit of the sealed key store (KeyStore::put_when_durable, keystore.hpp; journal version 3 in
// docs/keystore-format.md): handlers, failed writes taken back, ordering with the synchronous calls, the destructor,
// torn group tails on open, and SIGKILL with several puts in flight.
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <optional>
#include <string>
#include <vector>

#include "dauth/crypto/keystore.hpp"
#include "keystore_test_support.hpp"
#include "support.hpp"

using namespace dauth;
using namespace dauth::crypto;
using namespace dauth::crypto::keystore_test;
namespace fs = std::filesystem;

namespace {

// Generous: a loaded machine (or a sanitizer build) may take long for one fdatasync; the tests assert no timing.
constexpr int kReadableTimeoutMs = 20000;

bool readable(int fd, int timeout_ms) {
  pollfd ready{fd, POLLIN, 0};
  return ::poll(&ready, 1, timeout_ms) == 1 && (ready.revents & POLLIN) != 0;
}

std::string boot_id(int n) { return "boot-" + std::to_string(n) + "@mef.example.net"; }

// What a durable handler was called with, and how often.
struct Outcome {
  int calls = 0;
  std::optional<Errc> error;
};

KeyStore::DurableHandler record_into(Outcome& outcome) {
  return [&outcome](Result<void> written) {
    ++outcome.calls;
    if (!written) outcome.error = written.error().code;
  };
}

// Lowers the file size limit (RLIMIT_FSIZE, soft) with SIGXFSZ ignored, so that a write past it fails with EFBIG
// instead of killing the process; restores both, whatever the test does in between.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    if (::getrlimit(RLIMIT_FSIZE, &saved_limit_) != 0) return;
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    ignoring_ = ::sigaction(SIGXFSZ, &ignore, &saved_action_) == 0;
    rlimit lowered = saved_limit_;
    lowered.rlim_cur = bytes;
    limited_ = ignoring_ && ::setrlimit(RLIMIT_FSIZE, &lowered) == 0;
  }
  ~FileSizeLimit() {
    if (limited_) ::setrlimit(RLIMIT_FSIZE, &saved_limit_);
    if (ignoring_) ::sigaction(SIGXFSZ, &saved_action_, nullptr);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;
  bool active() const { return limited_; }

 private:
  rlimit saved_limit_{};
  struct sigaction saved_action_ {};
  bool ignoring_ = false;
  bool limited_ = false;
};

// A BootstrapKeyRecord whose size varies with n (AE-IDs of 5 to 34 characters), so that entries start at many
// different distances from a sector boundary (among the first 40, three start 8 to 27 bytes before one).
BootstrapKeyRecord varied_record(int n) {
  return BootstrapKeyRecord{boot_id(n), patterned_secret(16, static_cast<std::uint8_t>(n + 1)),
                            "CAE-" + std::to_string(n) + std::string(static_cast<std::size_t>(n * 13 % 29), 'a')};
}

// Puts varied_record(0 .. count-1) with put_when_durable() and finishes them; then, when big_entries > 0, that many
// certificate records of about 100 KB each. Returns the journal once the store is closed.
Bytes write_group_journal(const fs::path& dir, int count, int big_entries = 0) {
  {
    KeyStore store = open_store(dir);
    std::vector<Outcome> outcomes(static_cast<std::size_t>(count + big_entries));
    for (int n = 0; n < count; ++n) {
      REQUIRE(store.put_when_durable(varied_record(n), record_into(outcomes[static_cast<std::size_t>(n)])).ok());
    }
    for (int n = 0; n < big_entries; ++n) {
      CertificateRecord big{"CAE-big-" + std::to_string(n), {Bytes(100000, static_cast<std::uint8_t>(n + 1))},
                            patterned_secret(64, 7), 0};
      REQUIRE(store.put_when_durable(std::move(big), record_into(outcomes[static_cast<std::size_t>(count + n)])).ok());
    }
    store.finish_queued_writes();
    for (const auto& outcome : outcomes) {
      REQUIRE(outcome.calls == 1);
      REQUIRE_FALSE(outcome.error);
    }
  }
  return test::read_binary_file(dir / "keys.journal");
}

// The index of the entry that holds byte `at` (offsets from journal_entry_offsets(), the last one the end).
std::size_t entry_holding(const std::vector<std::size_t>& offsets, std::size_t at) {
  return static_cast<std::size_t>(std::upper_bound(offsets.begin(), offsets.end(), at) - offsets.begin()) - 1;
}

// Zero-filled sectors that a crash inside one group append can leave: whole 512-byte sectors after the 10th entry
// (a lost middle sector; its start may fall anywhere in an entry, frame header included).
std::vector<std::size_t> lost_sectors_after_tenth(const std::vector<std::size_t>& offsets) {
  std::vector<std::size_t> sectors;
  for (std::size_t sector = (offsets[10] + 511) / 512 * 512; sector + 512 <= offsets.back(); sector += 512) {
    sectors.push_back(sector);
  }
  return sectors;
}

// Opens the damaged journal and checks the torn-tail outcome: entries before `damaged_entry` present, it and all
// later ones absent, the bytes from its start on kept in a keys.journal.torn-* file, the journal cut there.
void require_torn_group_tail(const fs::path& dir, const Bytes& damaged, const std::vector<std::size_t>& offsets,
                             std::size_t damaged_entry, int count) {
  const std::size_t torn_start = offsets[damaged_entry];
  {
    OpenReport report;
    KeyStore store = open_store(dir, &report);
    REQUIRE(report.torn_tail.has_value());
    CHECK_THAT(*report.torn_tail, Catch::Contains("byte offset " + std::to_string(torn_start)) &&
                                      Catch::Contains("keys.journal.torn-"));
    CHECK(report.journal_entries == damaged_entry);
    for (int n = 0; n < count; ++n) {
      const auto* found = store.find<BootstrapKeyRecord>(boot_id(n));
      INFO("record " << n);
      if (static_cast<std::size_t>(n) < damaged_entry) {
        REQUIRE(found != nullptr);
        CHECK(found->kpm.equals(patterned_secret(16, static_cast<std::uint8_t>(n + 1))));
      } else {
        CHECK(found == nullptr);
      }
    }
    CHECK(store.size() == damaged_entry);
    const auto torn = torn_files(dir);
    REQUIRE(torn.size() == 1);
    const Bytes kept = test::read_binary_file(torn.front());
    // Everything from the torn entry to the last non-zero byte: the later entries of the group too.
    REQUIRE(kept.size() <= offsets.back() - torn_start);
    CHECK(kept.size() + 16 > offsets.back() - torn_start);
    CHECK(std::equal(kept.begin(), kept.end(), damaged.begin() + static_cast<std::ptrdiff_t>(torn_start)));
    CHECK(std::all_of(damaged.begin() + static_cast<std::ptrdiff_t>(torn_start + kept.size()), damaged.end(),
                      [](std::uint8_t b) { return b == 0; }));
    CHECK(fs::file_size(dir / "keys.journal") == torn_start);
    fs::remove(torn.front());
    // The store goes on from the cut.
    REQUIRE(store.put(bootstrap(100, 100)).ok());
  }
  OpenReport again;
  KeyStore store = open_store(dir, &again);
  CHECK_FALSE(again.torn_tail);
  CHECK(again.journal_entries == damaged_entry + 1);
  CHECK(store.find<BootstrapKeyRecord>(boot_id(100)) != nullptr);
}

// Reopens the store: no torn tail, journal_entries entries, and exactly bootstrap(n, n) for n < puts.
void require_reopens_with_bootstraps(const std::filesystem::path& dir, int puts, std::size_t journal_entries) {
  OpenReport report;
  KeyStore store = open_store(dir, &report);
  CHECK_FALSE(report.torn_tail);
  CHECK(report.journal_entries == journal_entries);
  CHECK(store.size() == static_cast<std::size_t>(puts));
  for (int n = 0; n < puts; ++n) {
    const auto* found = store.find<BootstrapKeyRecord>(boot_id(n));
    INFO("record " << n);
    REQUIRE(found != nullptr);
    CHECK(found->kpm.equals(patterned_secret(16, static_cast<std::uint8_t>(n))));
  }
}

}  // namespace

TEST_CASE("key store group commit: handlers run from deliver_durable() in order and with ok", "[keystore][group]") {
  test::TempDir dir;
  constexpr int kPuts = 30;
  {
    KeyStore store = open_store(dir.path());
    REQUIRE(store.put(bootstrap(0, 100)).ok());  // record 0 is then a replacement
    const auto before = store.sync_stats();
    std::vector<int> delivered;
    std::vector<bool> ok;
    for (int n = 0; n < kPuts; ++n) {
      REQUIRE(store
                  .put_when_durable(bootstrap(n, static_cast<std::uint8_t>(n)),
                                    [&delivered, &ok, n](Result<void> written) {
                                      delivered.push_back(n);
                                      ok.push_back(written.ok());
                                    })
                  .ok());
      // Shown at once, long before it is durable.
      const auto* shown = store.find<BootstrapKeyRecord>(boot_id(n));
      REQUIRE(shown != nullptr);
      CHECK(shown->kpm.equals(patterned_secret(16, static_cast<std::uint8_t>(n))));
    }
    // Refused at once, and its handler never runs.
    bool invalid_called = false;
    const auto invalid = store.put_when_durable(BootstrapKeyRecord{"no at sign", patterned_secret(16, 1), "CAE-x"},
                                                [&invalid_called](Result<void>) { invalid_called = true; });
    REQUIRE_FALSE(invalid.ok());
    CHECK(invalid.error().code == Errc::invalid_argument);

    REQUIRE(readable(store.durable_fd(), kReadableTimeoutMs));
    CHECK(delivered.empty());  // the flush thread only signals; handlers run on this thread
    while (delivered.size() < static_cast<std::size_t>(kPuts)) {
      REQUIRE(readable(store.durable_fd(), kReadableTimeoutMs));
      store.deliver_durable();
    }
    // A readiness may still be pending from a flush that this thread absorbed early; one more delivery clears it.
    store.deliver_durable();
    CHECK_FALSE(readable(store.durable_fd(), 0));
    std::vector<int> in_order(kPuts);
    for (int n = 0; n < kPuts; ++n) in_order[static_cast<std::size_t>(n)] = n;
    CHECK(delivered == in_order);  // each once, oldest first
    CHECK(std::all_of(ok.begin(), ok.end(), [](bool b) { return b; }));
    CHECK_FALSE(invalid_called);

    const auto after = store.sync_stats();
    CHECK(after.entries - before.entries == static_cast<std::uint64_t>(kPuts));
    CHECK(after.syncs - before.syncs >= 1);
    CHECK(after.syncs - before.syncs <= static_cast<std::uint64_t>(kPuts));
  }
  require_reopens_with_bootstraps(dir.path(), kPuts, kPuts + 1);
}

TEST_CASE("key store group commit: a failed write is taken back and reported to its handler and those queued behind",
          "[keystore][group]") {
  test::TempDir dir;
  {
    KeyStore store = open_store(dir.path());
    REQUIRE(store.put(bootstrap(1, 1)).ok());
    const auto journal_size = fs::file_size(dir / "keys.journal");
    REQUIRE(journal_size == kJournalFillStep);
    Outcome big, replacing, adding;
    bool replacing_queued = false;
    bool adding_queued = false;
    {
      // The journal may not grow: the large entry needs a new step of zero fill, so its write fails with EFBIG.
      FileSizeLimit limit(static_cast<rlim_t>(journal_size));
      REQUIRE(limit.active());
      REQUIRE(store
                  .put_when_durable(CertificateRecord{"CAE-big", {Bytes(100000, 0x5a)}, patterned_secret(64, 7), 0},
                                    record_into(big))
                  .ok());
      CHECK(store.find<CertificateRecord>("CAE-big") != nullptr);
      // Small entries that would fit into the fill on their own. They are queued behind the large one, unless its
      // failure is already known: then they are refused at once (either way nothing of them may remain).
      replacing_queued = store.put_when_durable(bootstrap(1, 2), record_into(replacing)).ok();
      if (replacing_queued) CHECK(store.find<BootstrapKeyRecord>(boot_id(1))->kpm.equals(patterned_secret(16, 2)));
      adding_queued = store.put_when_durable(bootstrap(2, 3), record_into(adding)).ok();
      if (adding_queued) CHECK(store.find<BootstrapKeyRecord>(boot_id(2)) != nullptr);

      REQUIRE(readable(store.durable_fd(), kReadableTimeoutMs));
      // Known but not delivered: further writes are refused at once, and without calling their handler.
      Outcome refused;
      const auto refused_put = store.put_when_durable(bootstrap(3, 4), record_into(refused));
      REQUIRE_FALSE(refused_put.ok());
      CHECK(refused_put.error().code == Errc::io);
      CHECK(store.find<BootstrapKeyRecord>(boot_id(3)) == nullptr);
      CHECK(big.calls == 0);

      store.deliver_durable();
      CHECK(refused.calls == 0);
    }
    INFO("queued behind the failed write: replacing " << replacing_queued << ", adding " << adding_queued);
    CHECK(big.calls == 1);
    CHECK(big.error == Errc::io);
    CHECK(replacing.calls == (replacing_queued ? 1 : 0));
    if (replacing_queued) CHECK(replacing.error == Errc::io);
    CHECK(adding.calls == (adding_queued ? 1 : 0));
    if (adding_queued) CHECK(adding.error == Errc::io);
    // Taken back: the previous record again, or none.
    CHECK(store.find<CertificateRecord>("CAE-big") == nullptr);
    const auto* one = store.find<BootstrapKeyRecord>(boot_id(1));
    REQUIRE(one != nullptr);
    CHECK(one->kpm.equals(patterned_secret(16, 1)));
    CHECK(store.find<BootstrapKeyRecord>(boot_id(2)) == nullptr);
    CHECK(store.size() == 1);

    // Not broken: with the limit gone, both kinds of put work again (the large entry included).
    Outcome after;
    REQUIRE(store
                .put_when_durable(CertificateRecord{"CAE-big", {Bytes(100000, 0x5b)}, patterned_secret(64, 8), 0},
                                  record_into(after))
                .ok());
    store.finish_queued_writes();
    CHECK(after.calls == 1);
    CHECK_FALSE(after.error);
    REQUIRE(store.put(bootstrap(4, 5)).ok());
  }
  OpenReport report;
  KeyStore store = open_store(dir.path(), &report);
  CHECK_FALSE(report.torn_tail);
  CHECK(report.journal_entries == 3);
  CHECK(store.size() == 3);
  CHECK(store.find<BootstrapKeyRecord>(boot_id(1))->kpm.equals(patterned_secret(16, 1)));
  CHECK(store.find<BootstrapKeyRecord>(boot_id(2)) == nullptr);
  const auto* big = store.find<CertificateRecord>("CAE-big");
  REQUIRE(big != nullptr);
  CHECK(big->chain_der == std::vector<Bytes>{Bytes(100000, 0x5b)});
  CHECK(store.find<BootstrapKeyRecord>(boot_id(4)) != nullptr);
}

TEST_CASE("key store group commit: put() remove() and compact() write after the queued puts",
          "[keystore][group]") {
  test::TempDir dir;
  {
    KeyStore store = open_store(dir.path());
    std::vector<std::pair<int, bool>> delivered;  // (put, ok)
    auto handler = [&delivered](int put) {
      return [&delivered, put](Result<void> written) { delivered.emplace_back(put, written.ok()); };
    };
    REQUIRE(store.put_when_durable(bootstrap(1, 1), handler(1)).ok());
    REQUIRE(store.put(bootstrap(1, 2)).ok());  // replaces the queued one: must land after it
    CHECK(store.find<BootstrapKeyRecord>(boot_id(1))->kpm.equals(patterned_secret(16, 2)));
    REQUIRE(store.put_when_durable(bootstrap(2, 3), handler(2)).ok());
    REQUIRE(store.remove(RecordKind::bootstrap_key, boot_id(2)).ok());
    CHECK(store.find<BootstrapKeyRecord>(boot_id(2)) == nullptr);
    REQUIRE(store.put_when_durable(bootstrap(3, 4), handler(3)).ok());
    REQUIRE(store.compact().ok());
    REQUIRE(store.put_when_durable(bootstrap(4, 5), handler(4)).ok());
    REQUIRE(store.put(bootstrap(5, 6)).ok());
    // The synchronous calls waited for the queued writes but left their handlers to deliver_durable().
    CHECK(delivered.empty());
    store.deliver_durable();
    const std::vector<std::pair<int, bool>> expected = {{1, true}, {2, true}, {3, true}, {4, true}};
    CHECK(delivered == expected);
  }
  OpenReport report;
  KeyStore store = open_store(dir.path(), &report);
  CHECK_FALSE(report.torn_tail);
  CHECK(report.snapshot_records == 2);  // boot-1 (second version) and boot-3
  CHECK(report.journal_entries == 2);   // boot-4, boot-5
  CHECK(store.find<BootstrapKeyRecord>(boot_id(1))->kpm.equals(patterned_secret(16, 2)));
  CHECK(store.find<BootstrapKeyRecord>(boot_id(2)) == nullptr);
  CHECK(store.find<BootstrapKeyRecord>(boot_id(3))->kpm.equals(patterned_secret(16, 4)));
  CHECK(store.find<BootstrapKeyRecord>(boot_id(4))->kpm.equals(patterned_secret(16, 5)));
  CHECK(store.size() == 4);
}

TEST_CASE("key store group commit: the destructor writes queued puts and drops their handlers",
          "[keystore][group]") {
  test::TempDir dir;
  constexpr int kPuts = 20;
  int calls = 0;
  {
    KeyStore store = open_store(dir.path());
    for (int n = 0; n < kPuts; ++n) {
      REQUIRE(store.put_when_durable(bootstrap(n, static_cast<std::uint8_t>(n)), [&calls](Result<void>) { ++calls; })
                  .ok());
    }
  }  // destroyed without deliver_durable()
  CHECK(calls == 0);
  require_reopens_with_bootstraps(dir.path(), kPuts, kPuts);
}

TEST_CASE("key store group commit: a group append with lost sectors opens with its whole tail set aside",
          "[keystore][group]") {
  test::TempDir dir;
  constexpr int kEntries = 40;
  const Bytes journal = write_group_journal(dir.path(), kEntries);
  const Bytes snapshot = test::read_binary_file(dir / "keys.snapshot");
  const std::vector<std::size_t> offsets = journal_entry_offsets(journal);
  REQUIRE(offsets.size() == kEntries + 1);
  CHECK(journal[9] == 3);  // format version 3: several entries per append

  // A lost sector in the middle of the group: the entry it cuts and everything after it go.
  const std::vector<std::size_t> sectors = lost_sectors_after_tenth(offsets);
  REQUIRE(sectors.size() >= 3);
  for (const std::size_t sector : sectors) {
    Bytes damaged = journal;
    std::fill_n(damaged.begin() + static_cast<std::ptrdiff_t>(sector), 512, 0);
    test::write_file(dir / "keys.journal", damaged);
    test::write_file(dir / "keys.snapshot", snapshot);
    const std::size_t damaged_entry = entry_holding(offsets, sector);
    INFO("zeros at [" << sector << ", " << sector + 512 << "), entry " << damaged_entry << " at "
                      << offsets[damaged_entry]);
    require_torn_group_tail(dir.path(), damaged, offsets, damaged_entry, kEntries);
  }

  // The first sector of an entry lost where the sector boundary falls inside its frame header (8 to 27 bytes in).
  int lost_heads = 0;
  for (std::size_t entry = 1; entry + 1 < offsets.size(); ++entry) {
    const std::size_t boundary = (offsets[entry] / 512 + 1) * 512;
    const std::size_t span = boundary - offsets[entry];
    if (span < 8 || span > 27 || boundary >= offsets.back()) continue;
    ++lost_heads;
    Bytes damaged = journal;
    std::fill(damaged.begin() + static_cast<std::ptrdiff_t>(offsets[entry]),
              damaged.begin() + static_cast<std::ptrdiff_t>(boundary), 0);
    test::write_file(dir / "keys.journal", damaged);
    test::write_file(dir / "keys.snapshot", snapshot);
    INFO("zeros at [" << offsets[entry] << ", " << boundary << "), entry " << entry);
    require_torn_group_tail(dir.path(), damaged, offsets, entry, kEntries);
  }
  CHECK(lost_heads >= 2);
}

TEST_CASE("key store group commit: a torn entry with more than one group after it or in a version 2 journal is "
          "corrupt",
          "[keystore][group]") {
  test::TempDir dir;
  constexpr int kEntries = 40;
  // Three entries of ~100 KB after the small ones: more than one group (256 KiB) can follow a torn entry.
  const Bytes journal = write_group_journal(dir.path(), kEntries, 3);
  const std::vector<std::size_t> offsets = journal_entry_offsets(journal);
  REQUIRE(offsets.size() == kEntries + 3 + 1);
  const std::vector<std::size_t> sectors = lost_sectors_after_tenth(offsets);
  REQUIRE_FALSE(sectors.empty());
  const std::size_t sector = sectors.front();  // inside the small entries
  REQUIRE(sector + 512 < offsets[kEntries]);
  REQUIRE(offsets.back() - sector > (std::size_t{256} << 10));

  Bytes damaged = journal;
  std::fill_n(damaged.begin() + static_cast<std::ptrdiff_t>(sector), 512, 0);
  test::write_file(dir / "keys.journal", damaged);
  auto opened = KeyStore::open(dir.path(), test_master_key());
  INFO(error_of(opened));
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::corrupt);
  CHECK_THAT(opened.error().message, Catch::Contains("keys.journal"));
  CHECK(test::read_binary_file(dir / "keys.journal") == damaged);
  CHECK(torn_files(dir.path()).empty());

  // The same damage without the large entries behind it is a torn tail (the positive case above) — unless the
  // version field says 2: a version 2 journal allows nothing but zeros after a torn entry.
  test::TempDir small_dir;
  const Bytes small = write_group_journal(small_dir.path(), kEntries);
  const std::vector<std::size_t> small_offsets = journal_entry_offsets(small);
  const std::size_t small_sector = lost_sectors_after_tenth(small_offsets).front();
  Bytes version_2 = small;
  std::fill_n(version_2.begin() + static_cast<std::ptrdiff_t>(small_sector), 512, 0);
  REQUIRE(version_2[9] == 3);
  version_2[9] = 2;
  test::write_file(small_dir / "keys.journal", version_2);
  opened = KeyStore::open(small_dir.path(), test_master_key());
  INFO(error_of(opened));
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::corrupt);
  CHECK(test::read_binary_file(small_dir / "keys.journal") == version_2);
  CHECK(torn_files(small_dir.path()).empty());
  // Control: as version 3 the same bytes are a torn tail.
  version_2[9] = 3;
  test::write_file(small_dir / "keys.journal", version_2);
  OpenReport report;
  KeyStore store = open_store(small_dir.path(), &report);
  CHECK(report.torn_tail.has_value());
}

TEST_CASE("key store group commit: SIGKILL at any moment loses no acknowledged put or remove", "[keystore][crash]") {
  run_crash_trials(WriterMode::group, 20261124, std::chrono::seconds(8));
}

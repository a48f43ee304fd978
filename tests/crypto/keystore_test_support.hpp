// Helpers shared by the key store suites (test_keystore.cpp, test_keystore_group.cpp): keys, stores, the journal's
// frame layout (docs/keystore-format.md) and the SIGKILL crash trials against keystore_crash_writer.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dauth/crypto/keystore.hpp"
#include "support.hpp"

namespace dauth::crypto::keystore_test {

inline SecretBuffer test_master_key(std::uint8_t seed = 1) {
  SecretBuffer key(kMasterKeySize);
  for (std::size_t i = 0; i < key.size(); ++i) key.data()[i] = static_cast<std::uint8_t>(seed * 31 + i * 7);
  return key;
}

inline SecretBuffer patterned_secret(std::size_t size, std::uint8_t seed) {
  SecretBuffer secret(size);
  for (std::size_t i = 0; i < size; ++i) secret.data()[i] = static_cast<std::uint8_t>(seed + i * 13);
  return secret;
}

// A TempDir on /dev/shm (tmpfs) when there is one, else under $TMPDIR.
inline std::unique_ptr<test::TempDir> temp_dir_in_memory() {
  struct stat st {};
  if (::stat("/dev/shm", &st) != 0 || !S_ISDIR(st.st_mode) || ::access("/dev/shm", W_OK) != 0) {
    return std::make_unique<test::TempDir>();
  }
  const char* previous = std::getenv("TMPDIR");
  const std::string saved = previous ? previous : "";
  ::setenv("TMPDIR", "/dev/shm", 1);
  auto dir = std::make_unique<test::TempDir>();
  if (previous) {
    ::setenv("TMPDIR", saved.c_str(), 1);
  } else {
    ::unsetenv("TMPDIR");
  }
  return dir;
}

inline KeyStore open_store(const std::filesystem::path& dir, OpenReport* report = nullptr,
                           std::uint8_t key_seed = 1) {
  auto store = KeyStore::open(dir, test_master_key(key_seed), report);
  INFO((store ? std::string("ok") : store.error().to_string()));
  REQUIRE(store.ok());
  return std::move(store).value();
}

inline BootstrapKeyRecord bootstrap(int n, std::uint8_t seed) {
  return BootstrapKeyRecord{"boot-" + std::to_string(n) + "@mef.example.net", patterned_secret(16, seed),
                            "CAE-" + std::to_string(n)};
}

inline std::vector<std::filesystem::path> torn_files(const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> found;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().filename().string().rfind("keys.journal.torn-", 0) == 0) found.push_back(entry.path());
  }
  return found;
}

inline std::string error_of(const Result<KeyStore>& result) {
  return result ? std::string() : result.error().to_string();
}

// docs/keystore-format.md: journal frames are u32 length | 24-byte nonce | ciphertext; a version 2 or 3 journal is
// then zero-filled up to its preallocated size.
constexpr std::size_t kJournalHeaderSize = 18;
constexpr std::size_t kFrameHeaderSize = 4 + 24;
constexpr std::size_t kJournalFillStep = 64 * 1024;

// The start offsets of a journal's frames, found from the length fields alone (a length of 0 is the zero fill).
inline std::vector<std::size_t> journal_entry_offsets(const Bytes& journal) {
  std::vector<std::size_t> offsets;
  std::size_t offset = kJournalHeaderSize;
  while (offset + kFrameHeaderSize <= journal.size()) {
    const std::size_t length = std::size_t{journal[offset]} << 24 | std::size_t{journal[offset + 1]} << 16 |
                               std::size_t{journal[offset + 2]} << 8 | journal[offset + 3];
    if (length == 0) break;
    offsets.push_back(offset);
    offset += kFrameHeaderSize + length;
  }
  offsets.push_back(offset);  // the end of the last frame: where the zero fill begins
  return offsets;
}

// The end of the last frame of a journal (where its zero fill begins).
inline std::size_t journal_entries_end(const Bytes& journal) { return journal_entry_offsets(journal).back(); }

// ---- crash consistency: keystore_crash_writer killed with SIGKILL ----------------------------------------------

// Must match kpm_for() in keystore_crash_writer.cpp.
inline SecretBuffer expected_kpm(const std::string& id, unsigned long long version) {
  SecretBuffer kpm(16);
  for (std::size_t i = 0; i < 8; ++i) kpm.data()[i] = static_cast<std::uint8_t>(version >> (56 - 8 * i));
  for (std::size_t i = 0; i < 8; ++i) kpm.data()[8 + i] = static_cast<std::uint8_t>(id[i % id.size()] + i);
  return kpm;
}

struct WriterRun {
  std::string output;
  int status = 0;
};

// Starts the writer and kills it with SIGKILL: delay after it printed a line starting with wait_for ("" = any
// output: the store is open and the loop runs), or without wait_for delay after the start (the kill may hit open()
// and its recovery). Returns everything it printed.
inline WriterRun run_and_kill(const std::vector<std::string>& argv, std::chrono::microseconds delay,
                              const std::optional<std::string>& wait_for) {
  int out[2];
  REQUIRE(::pipe2(out, O_CLOEXEC) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::dup2(out[1], 1);
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::close(out[1]);
  WriterRun run;
  char buffer[4096];
  const auto waited_for = [&] {
    return !run.output.empty() && (wait_for->empty() || run.output.rfind(*wait_for, 0) == 0 ||
                                   run.output.find("\n" + *wait_for) != std::string::npos);
  };
  while (wait_for && !waited_for()) {
    const ssize_t n = ::read(out[0], buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    run.output.append(buffer, static_cast<std::size_t>(n));
  }
  std::this_thread::sleep_for(delay);
  ::kill(pid, SIGKILL);
  for (;;) {
    const ssize_t n = ::read(out[0], buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    run.output.append(buffer, static_cast<std::size_t>(n));
  }
  ::close(out[0]);
  while (::waitpid(pid, &run.status, 0) < 0 && errno == EINTR) {
  }
  return run;
}

// The operations of one trial on one record, in the order the writer announced them. The journal holds a prefix of
// all announced operations, so after the crash a record is in the state of its last acknowledged operation or of a
// later one (or, with none acknowledged, in its state before the trial or after any of its operations). With one
// operation in flight (the synchronous writer) that is "acknowledged or the one in flight"; with several puts in
// flight (group mode) it is any of them from the last acknowledged one on, whatever order the acknowledgements
// arrived in: a put's handler may report after a later remove of the same record.
struct RecordHistory {
  struct Operation {
    std::optional<unsigned long long> result;  // the version put, or nullopt = removed
    bool acknowledged = false;
  };
  std::optional<unsigned long long> before;  // the state the trial started from
  std::vector<Operation> operations;

  std::vector<std::optional<unsigned long long>> allowed() const {
    std::vector<std::optional<unsigned long long>> states;
    std::size_t from = 0;
    for (std::size_t i = 0; i < operations.size(); ++i) {
      if (operations[i].acknowledged) from = i;
    }
    const bool any_acknowledged = !operations.empty() && operations[from].acknowledged;
    if (!any_acknowledged) states.push_back(before);
    for (std::size_t i = from; i < operations.size(); ++i) states.push_back(operations[i].result);
    return states;
  }
};

// synchronous: put(); group: put_when_durable() with several puts in flight; reseal: put() and reseal() between
// two master keys, the store reopened with both after each kill.
enum class WriterMode { synchronous, group, reseal };

// Runs keystore_crash_writer (put(), or put_when_durable() with several puts in flight) and kills it at random
// moments, then checks after each kill that the reopened store lost no acknowledged put or remove, holds no record
// that was never written and no mixture of two versions. Trials stop after max_trials or after the time budget.
inline void run_crash_trials(WriterMode mode, std::uint32_t seed, std::chrono::seconds budget) {
  namespace fs = std::filesystem;
  test::TempDir dir;
  fs::create_directory(dir / "store");
  ::chmod((dir / "store").c_str(), 0700);
  REQUIRE(write_new_master_key_file(dir / "master.key").ok());
  auto master = load_master_key_file(dir / "master.key");
  REQUIRE(master.ok());
  REQUIRE(write_new_master_key_file(dir / "second.key").ok());
  auto second = load_master_key_file(dir / "second.key");
  REQUIRE(second.ok());
  std::size_t sealed_with = 0;  // reseal mode: which key sealed the store after the last kill
  int kills_in_reseal = 0;
  std::map<std::size_t, int> reopened_with;

  std::mt19937 random(seed);
  std::map<std::string, std::optional<unsigned long long>> recovered;  // each record's state after the last kill
  unsigned long long next_version = 0;
  int kills_in_compaction = 0;
  int kills_with_several_puts_in_flight = 0;
  int acknowledged_total = 0;
  constexpr int kMaxTrials = 200;
  const auto deadline = std::chrono::steady_clock::now() + budget;
  int trials = 0;
  for (; trials < kMaxTrials && std::chrono::steady_clock::now() < deadline; ++trials) {
    next_version += 1000000;
    // One trial in five kills during start-up, so that open() itself (recovery included) gets interrupted.
    const bool during_start = trials % 5 == 4;
    // A reseal writes and syncs the store twice: its kills need a longer span than single puts.
    const std::uint32_t span_us = during_start ? 30000 : mode == WriterMode::reseal ? 60000 : 15000;
    const auto delay = std::chrono::microseconds(random() % span_us);
    std::vector<std::string> argv = {DAUTH_KEYSTORE_CRASH_WRITER, (dir / "store").string(),
                                     (dir / "master.key").string(), std::to_string(random()),
                                     std::to_string(next_version)};
    if (mode == WriterMode::group) argv.emplace_back("group");
    if (mode == WriterMode::reseal) {
      argv.emplace_back("reseal");
      argv.push_back((dir / "second.key").string());
    }
    // Group mode waits for the first acknowledgement: a slow build (TSan) spends the first milliseconds on starting
    // the flush thread, and kills there alone would acknowledge nothing. Start-up kills still hit the first puts.
    std::optional<std::string> wait_for;
    if (!during_start) wait_for = mode == WriterMode::group ? "P " : mode == WriterMode::reseal ? "k " : "";
    const WriterRun run = run_and_kill(argv, delay, wait_for);
    INFO("trial " << trials
                  << " output tail: " << run.output.substr(run.output.size() > 300 ? run.output.size() - 300 : 0));
    REQUIRE(WIFSIGNALED(run.status));  // it never stops by itself: an exit is a failure of the writer

    // Replay the writer's lines over the histories; only whole lines count.
    std::map<std::string, RecordHistory> histories;
    for (const auto& [id, state] : recovered) histories[id].before = state;
    std::map<unsigned long long, std::pair<std::string, std::size_t>> puts_by_version;  // -> id, operation index
    std::istringstream lines(run.output.substr(0, run.output.rfind('\n') + 1));
    std::string line;
    std::string last_op;
    int puts_in_flight = 0;
    // Reseal mode: the keys that may seal the store now: the last one acknowledged, and the one of a reseal in flight.
    std::vector<std::size_t> allowed_keys = {sealed_with};
    while (std::getline(lines, line)) {
      std::istringstream fields(line);
      std::string op, id;
      unsigned long long version = 0;
      fields >> op >> id >> version;
      if (op == "p") {
        auto& operations = histories[id].operations;
        puts_by_version[version] = {id, operations.size()};
        operations.push_back({version, false});
        ++puts_in_flight;
      } else if (op == "r") {
        histories[id].operations.push_back({std::nullopt, false});
      } else if (op == "P") {
        const auto found = puts_by_version.find(version);
        INFO(line);
        REQUIRE(found != puts_by_version.end());  // acknowledged, never announced: a writer bug
        REQUIRE(found->second.first == id);
        histories[id].operations[found->second.second].acknowledged = true;
        --puts_in_flight;
        ++acknowledged_total;
      } else if (op == "k") {
        allowed_keys = {static_cast<std::size_t>(std::stoul(id))};
      } else if (op == "s") {
        allowed_keys.push_back(static_cast<std::size_t>(std::stoul(id)));
      } else if (op == "S") {
        allowed_keys = {static_cast<std::size_t>(std::stoul(id))};
      } else if (op == "R") {
        auto& operations = histories[id].operations;
        INFO(line);
        REQUIRE((!operations.empty() && !operations.back().result));  // removes are synchronous: the last one
        operations.back().acknowledged = true;
        ++acknowledged_total;
      }
      last_op = op;
    }
    if (last_op == "c") ++kills_in_compaction;
    if (last_op == "s") ++kills_in_reseal;
    if (puts_in_flight >= 2) ++kills_with_several_puts_in_flight;

    OpenReport report;
    std::vector<SecretBuffer> keys;
    keys.push_back(master->clone());
    if (mode == WriterMode::reseal) keys.push_back(second->clone());
    auto opened = KeyStore::open(dir / "store", std::move(keys), &report);
    INFO(error_of(opened));
    REQUIRE(opened.ok());
    if (mode == WriterMode::reseal) {
      // At every instant exactly one of the two keys opens the store: the acknowledged one, or the new one of a
      // reseal that was in flight.
      INFO("opened with key " << report.master_key_index << ", last operation " << last_op);
      REQUIRE(std::find(allowed_keys.begin(), allowed_keys.end(), report.master_key_index) != allowed_keys.end());
      sealed_with = report.master_key_index;
      ++reopened_with[sealed_with];
    }
    KeyStore& store = opened.value();
    std::size_t present = 0;
    for (auto& [id, history] : histories) {
      const auto* found = store.find<BootstrapKeyRecord>(id);
      std::optional<unsigned long long> actual;
      if (found != nullptr) {
        const std::string& ae = found->ae_id;
        REQUIRE(ae.rfind("CAE-v", 0) == 0);
        actual = std::stoull(ae.substr(5));
        INFO(id << " version " << *actual);
        REQUIRE(found->kpm.equals(expected_kpm(id, *actual)));  // never a mixture of two versions
        ++present;
      }
      const auto allowed = history.allowed();
      std::string allowed_text;
      for (const auto& state : allowed) allowed_text += (state ? std::to_string(*state) : "absent") + " ";
      INFO(id << " found " << (actual ? std::to_string(*actual) : "absent") << ", allowed " << allowed_text);
      REQUIRE(std::find(allowed.begin(), allowed.end(), actual) != allowed.end());
      recovered[id] = actual;  // the recovered state is the next trial's baseline
    }
    // Nothing appears that was never written.
    REQUIRE(store.size() == present);
    for (const auto& torn : torn_files(dir / "store")) fs::remove(torn);
  }
  INFO("trials " << trials << ", acknowledged operations " << acknowledged_total << ", kills announced during "
                 << "compaction " << kills_in_compaction << ", kills with several puts in flight "
                 << kills_with_several_puts_in_flight);
  // The kills must have hit the loop and compactions, whatever the speed of the machine (sanitizers included).
  CHECK(trials >= 20);
  CHECK(acknowledged_total > 0);
  CHECK(kills_in_compaction > 0);
  // Group mode must really have had unacknowledged puts queued together when it was killed.
  if (mode == WriterMode::group) CHECK(kills_with_several_puts_in_flight > 0);
  if (mode == WriterMode::reseal) {
    INFO("kills announced during a reseal " << kills_in_reseal << ", reopened with key 0: " << reopened_with[0]
                                            << ", with key 1: " << reopened_with[1]);
    CHECK(kills_in_reseal > 0);
    CHECK(reopened_with[0] > 0);
    CHECK(reopened_with[1] > 0);
  }
}

}  // namespace dauth::crypto::keystore_test

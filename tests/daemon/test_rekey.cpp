// Master-key rotation end to end (dauthd(8) MASTER KEY ROTATION): the real dauthd and dauthctl, a file-sourced
// current and next master key, and SIGKILL of dauthd at random moments of `dauthctl rekey`. After every kill the
// next start must open the store by itself (READY=1), with every configured row intact (the start writes none of
// them again), sealed under the old key, or under the new one when the kill came after the switch or the reply.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "daemon_process.hpp"
#include "loopback_ports.hpp"
#include "support.hpp"

using dauth::test::DaemonProcess;
using dauth::test::NotifyListener;
using dauth::test::run_command;
using dauth::test::TempDir;

namespace {

const std::string kCurrentHex = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const std::string kNextHex = "c0ffee00112233445566778899aabbccddeeff00112233445566778899aabb01";
const std::string kKpmHex = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
constexpr int kRows = 400;  // enrolee rows: a store big enough that a rotation takes a few milliseconds

struct RotationDeployment {
  TempDir dir;
  std::filesystem::path config = dir / "dauthd.toml";
  std::filesystem::path socket = dir / "control";
  std::filesystem::path log = dir / "dauthd.log";
  std::filesystem::path state = dir / "state";
  std::uint16_t mef_port = dauth::test::free_loopback_port();
  std::filesystem::path key_files[2] = {dir / "current.key", dir / "next.key"};

  RotationDeployment() {
    std::filesystem::create_directory(state);
    std::filesystem::permissions(state, std::filesystem::perms::owner_all, std::filesystem::perm_options::replace);
    dauth::test::write_file(key_files[0], kCurrentHex + "\n", 0600);
    dauth::test::write_file(key_files[1], kNextHex + "\n", 0600);
    dauth::test::write_file(dir / "meter.kpm", kKpmHex + "\n", 0600);
    std::string text = "[daemon]\n"
                       "state_directory = \"" + state.string() + "\"\n"
                       "control_socket = \"" + socket.string() + "\"\n"
                       "master_key_source = \"file\"\n"
                       "master_key_file = \"" + key_files[0].string() + "\"\n"
                       "master_key_next_file = \"" + key_files[1].string() + "\"\n"
                       "\n[mef]\nfqdn = \"mef.example.net\"\nlisten = \"127.0.0.1:" + std::to_string(mef_port) + "\"\n";
    for (int i = 0; i < kRows; ++i) {
      text += "\n[[mef.enrolee]]\nkpm_id = \"meter" + std::to_string(i) + "@mef.example.net\"\n"
              "kpm_file = \"" + (dir / "meter.kpm").string() + "\"\nenrolee_id = \"CAE-meter" + std::to_string(i) +
              "\"\n";
    }
    dauth::test::write_file(config, text, 0600);
  }

  dauth::test::CommandResult ctl(std::vector<std::string> args) const {
    std::vector<std::string> argv = {DAUTHCTL_PATH, "-s", socket.string()};
    argv.insert(argv.end(), args.begin(), args.end());
    return run_command(argv);
  }
  nlohmann::json ctl_json(std::vector<std::string> args) const {
    args.insert(args.begin(), "--json");
    const auto r = ctl(args);
    INFO(r.output);
    REQUIRE(r.exit_code == 0);
    return nlohmann::json::parse(r.output);
  }
  // The generation field of a store file's plain header (docs/keystore-format.md), or 0 if absent.
  std::uint64_t generation(const char* name) const {
    if (!std::filesystem::exists(state / name)) return 0;
    const auto bytes = dauth::test::read_binary_file(state / name);
    std::uint64_t g = 0;
    for (std::size_t i = 10; i < 18 && i < bytes.size(); ++i) g = (g << 8) | bytes[i];
    return g;
  }
};

// dauthd started and READY=1 seen; killed by the destructor if still running.
struct RunningDaemon {
  NotifyListener notify;
  DaemonProcess process;
  RunningDaemon(const RotationDeployment& d, const std::string& name)
      : notify(d.dir / ("notify-" + name)),
        process({DAUTHD_PATH, "-c", d.config.string()}, {notify.environment()}, d.log) {}
  bool ready() { return notify.wait_for("READY=1").has_value(); }
};

// `dauthctl rekey --key-file FILE`, started and not waited for.
pid_t start_rekey(const RotationDeployment& d, const std::filesystem::path& key_file) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const std::string socket = d.socket.string();
    const std::string key = key_file.string();
    const int null = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    ::dup2(null, 1);
    ::dup2(null, 2);
    ::execl(DAUTHCTL_PATH, DAUTHCTL_PATH, "-s", socket.c_str(), "rekey", "--key-file", key.c_str(),
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return pid;
}

int wait_exit_code(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::string sealed_with(const RotationDeployment& d) {
  return d.ctl_json({"status"}).value("key_store_sealed_with", "?");
}

// After a start: every configured row was in the store unchanged (the start wrote none of them again).
void require_rows_intact(const RotationDeployment& d) {
  const auto stats = d.ctl_json({"stats"});
  CHECK(stats.value("keystore_fdatasync_total", std::int64_t{-1}) == 0);
  CHECK(stats.value("keystore_records", std::int64_t{-1}) == kRows);
}

}  // namespace

TEST_CASE("dauthctl rekey: the store is sealed under the next key, and a restart opens it with that key",
          "[dauthd][rekey]") {
  RotationDeployment d;
  {
    RunningDaemon daemon(d, "first");
    INFO(dauth::test::read_text_file(d.log));
    REQUIRE(daemon.ready());
    CHECK(sealed_with(d) == "current");
    // A key dauthd would not find at its next start is refused: nothing would open the re-sealed store.
    dauth::test::write_file(d.dir / "stray.key", std::string(64, 'a') + "\n", 0600);
    const auto stray = d.ctl({"rekey", "--key-file", (d.dir / "stray.key").string()});
    CHECK(stray.exit_code == 2);  // invalid_argument: a usage error (dauthctl(1))
    CHECK_THAT(stray.output, Catch::Contains("would not find it at its next start"));
    // The key travels by descriptor and must be a master key (32 bytes), checked by dauthctl before it connects.
    dauth::test::write_file(d.dir / "short.key", std::string(32, 'b') + "\n", 0600);
    const auto short_key = d.ctl({"rekey", "--key-file", (d.dir / "short.key").string()});
    CHECK(short_key.exit_code == 2);
    CHECK_THAT(short_key.output, Catch::Contains("must be 64"));

    const auto rotated = d.ctl_json({"rekey", "--key-file", d.key_files[1].string()});
    CHECK(rotated["rotated"] == true);
    CHECK(rotated["key"] == "next");
    CHECK(rotated["records"] == kRows);
    CHECK(sealed_with(d) == "next");
    const auto again = d.ctl_json({"rekey", "--key-file", d.key_files[1].string()});
    CHECK(again["rotated"] == false);
    daemon.process.signal(SIGTERM);
    REQUIRE(daemon.process.wait() == 0);
  }
  {
    RunningDaemon daemon(d, "second");
    INFO(dauth::test::read_text_file(d.log));
    REQUIRE(daemon.ready());
    CHECK(sealed_with(d) == "next");
    require_rows_intact(d);
    daemon.process.signal(SIGTERM);
    REQUIRE(daemon.process.wait() == 0);
  }
  // The operator makes the next key the current one: the store opens with it, no next key needed.
  std::filesystem::rename(d.key_files[1], d.key_files[0]);
  RunningDaemon daemon(d, "promoted");
  INFO(dauth::test::read_text_file(d.log));
  REQUIRE(daemon.ready());
  CHECK(sealed_with(d) == "current");
  require_rows_intact(d);
  const std::string log = dauth::test::read_text_file(d.log);
  CHECK(log.find(kCurrentHex) == std::string::npos);
  CHECK(log.find(kNextHex) == std::string::npos);
}

TEST_CASE("dauthctl rekey: SIGKILL of dauthd at any moment leaves a store its next start opens with every row",
          "[dauthd][rekey][crash]") {
  RotationDeployment d;
  std::mt19937 random(20261207);
  std::size_t sealed = 0;  // 0: current key, 1: next key
  const char* names[2] = {"current", "next"};
  // Calibration: how long one rotation takes from dauthctl's start to its exit, here and now.
  std::chrono::microseconds span{0};
  {
    RunningDaemon daemon(d, "calibrate");
    INFO(dauth::test::read_text_file(d.log));
    REQUIRE(daemon.ready());
    const auto started = std::chrono::steady_clock::now();
    REQUIRE(wait_exit_code(start_rekey(d, d.key_files[1])) == 0);
    span = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started);
    sealed = 1;
    daemon.process.signal(SIGTERM);
    REQUIRE(daemon.process.wait() == 0);
  }
  // What the kills left: by key, and by the files' generations relative to those before the rotation (docs/
  // keystore-format.md "Re-sealing": +0 nothing written yet; snapshot +1 the compaction; snapshot +2 with the journal
  // +1 the switch done and the new journal not yet; +2/+2 finished).
  std::map<std::string, int> outcomes;
  int acknowledged = 0;
  // 60 trials take about 7 s here; the deadline only stops a slow build (ASan, a loaded machine) after enough.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(25);
  int trials = 0;
  for (; trials < 60 && std::chrono::steady_clock::now() < deadline; ++trials) {
    const std::size_t target = 1 - sealed;
    const std::uint64_t before = d.generation("keys.snapshot");
    const auto delay = std::chrono::microseconds(random() % (span.count() * 13 / 10 + 1));
    int rekey_exit = -1;
    {
      RunningDaemon daemon(d, "trial-" + std::to_string(trials));
      INFO("trial " << trials << "\n" << dauth::test::read_text_file(d.log));
      // The key assertion: whatever the previous kill left, this start opened the store by itself.
      REQUIRE(daemon.ready());
      REQUIRE(sealed_with(d) == names[sealed]);
      require_rows_intact(d);
      const pid_t rekey = start_rekey(d, d.key_files[target]);
      std::this_thread::sleep_for(delay);
      ::kill(daemon.process.pid(), SIGKILL);
      REQUIRE(daemon.process.wait().has_value());
      rekey_exit = wait_exit_code(rekey);
    }
    const std::uint64_t snapshot = d.generation("keys.snapshot") - before;
    const std::uint64_t journal = d.generation("keys.journal") - before;
    const bool temporary = std::filesystem::exists(d.state / "keys.snapshot.tmp") ||
                           std::filesystem::exists(d.state / "keys.journal.tmp");
    outcomes["snapshot +" + std::to_string(snapshot) + " journal +" + std::to_string(journal) +
             (temporary ? " (a .tmp left)" : "")]++;
    const bool switched = snapshot == 2;
    if (rekey_exit == 0) ++acknowledged;
    INFO("trial " << trials << ": snapshot +" << snapshot << ", journal +" << journal << ", dauthctl exit "
                  << rekey_exit);
    REQUIRE((rekey_exit != 0 || switched));  // an acknowledged rotation is durable
    if (switched) sealed = target;
    outcomes[std::string("left sealed under the ") + (switched ? "new" : "old") + " key"]++;
  }
  // One more start after the last kill.
  RunningDaemon daemon(d, "last");
  INFO(dauth::test::read_text_file(d.log));
  REQUIRE(daemon.ready());
  CHECK(sealed_with(d) == names[sealed]);
  require_rows_intact(d);

  std::string summary;
  for (const auto& [what, count] : outcomes) summary += what + ": " + std::to_string(count) + "\n";
  INFO("rotation span " << span.count() << " us, trials " << trials << ", acknowledged " << acknowledged << "\n"
                        << summary);
  CHECK(trials >= 15);
  CHECK(outcomes["left sealed under the old key"] > 0);
  CHECK(outcomes["left sealed under the new key"] > 0);
  WARN(summary);
}

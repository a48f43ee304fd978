// What a control client gets for a request dauthd refuses, and what the operator sees of it: a real dauthd (MEF role)
// and raw AF_UNIX clients. Every line gets one reply (an empty one too), arguments a verb does not take are refused
// by name, and every failure reply is logged once with the client's uid and pid, through the log's rate limit.
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "daemon_process.hpp"
#include "loopback_ports.hpp"
#include "support.hpp"

using dauth::test::DaemonProcess;
using dauth::test::TempDir;

namespace {

int connect_to(const std::filesystem::path& socket) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, socket.c_str(), sizeof address.sun_path - 1);
  REQUIRE(::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
  return fd;
}

// Sends `bytes`, ends the request stream, and returns the reply lines dauthd wrote before closing.
std::vector<nlohmann::json> converse(const std::filesystem::path& socket, const std::string& bytes) {
  const int fd = connect_to(socket);
  timeval timeout{static_cast<time_t>(dauth::test::kHangLimit.count()), 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  // A refused connection may be closed before the request is sent (EPIPE): its reply is read all the same.
  (void)::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  ::shutdown(fd, SHUT_WR);
  std::string text;
  char buffer[4096];
  for (ssize_t n; (n = ::recv(fd, buffer, sizeof buffer, 0)) > 0;) text.append(buffer, static_cast<std::size_t>(n));
  ::close(fd);
  std::vector<nlohmann::json> replies;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) replies.push_back(nlohmann::json::parse(line));
  return replies;
}

struct MefDaemon {
  TempDir dir;
  std::filesystem::path socket = dir / "control";
  std::filesystem::path log = dir / "dauthd.log";
  std::unique_ptr<DaemonProcess> process;

  explicit MefDaemon(int max_control_clients = 8) {
    std::filesystem::create_directory(dir / "state");
    std::filesystem::permissions(dir / "state", std::filesystem::perms::owner_all,
                                 std::filesystem::perm_options::replace);
    dauth::test::write_file(dir / "master.key", std::string(64, 'a') + "\n", 0600);
    dauth::test::write_file(dir / "dauthd.toml",
                            "[daemon]\nstate_directory = \"" + (dir / "state").string() + "\"\n"
                            "control_socket = \"" + socket.string() + "\"\n"
                            "master_key_source = \"file\"\nmaster_key_file = \"" + (dir / "master.key").string() +
                                "\"\nmax_control_clients = " + std::to_string(max_control_clients) +
                                "\n\n[mef]\nfqdn = \"mef.example.net\"\nlisten = \"127.0.0.1:" +
                                std::to_string(dauth::test::free_loopback_port()) + "\"\n",
                            0600);
    process = std::make_unique<DaemonProcess>(
        std::vector<std::string>{DAUTHD_PATH, "-c", (dir / "dauthd.toml").string()}, std::vector<std::string>{}, log);
    REQUIRE(dauth::test::wait_for_control_socket(socket));
    // With max_control_clients = 1 the probe's connection may still count until dauthd has seen it close.
    bool served = false;
    for (int i = 0; i < 100 && !served; ++i) {
      const auto replies = converse("{\"verb\":\"status\"}\n");
      served = replies.size() == 1 && replies[0]["ok"] == true;
      if (!served) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    REQUIRE(served);
  }
  std::vector<nlohmann::json> converse(const std::string& bytes) const { return ::converse(socket, bytes); }

  ~MefDaemon() { stop(); }
  void stop() {
    if (stopped) return;
    stopped = true;
    process->signal(SIGTERM);
    process->wait();
  }
  bool stopped = false;

  // The log lines containing `text`.
  std::vector<std::string> log_lines(const std::string& text) const {
    std::vector<std::string> lines;
    std::istringstream in(dauth::test::read_text_file(log));
    for (std::string line; std::getline(in, line);) {
      if (line.find(text) != std::string::npos) lines.push_back(line);
    }
    return lines;
  }
  // Polls the log (dauthd writes the line right after queueing the reply, before the client reads it).
  std::vector<std::string> wait_log_lines(const std::string& text, std::size_t count) const {
    for (int i = 0; i < 100; ++i) {
      auto lines = log_lines(text);
      if (lines.size() >= count) return lines;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return log_lines(text);
  }
};

const std::string kClient = "uid " + std::to_string(::getuid()) + " pid " + std::to_string(::getpid());

}  // namespace

TEST_CASE("an empty request line gets an error reply and the next line is still served", "[dauthd][control]") {
  MefDaemon d;
  const auto replies = converse(d.socket, "\n\r\n{\"verb\":\"status\"}\n");
  REQUIRE(replies.size() == 3);
  for (int i = 0; i < 2; ++i) {
    CHECK(replies[i]["ok"] == false);
    CHECK(replies[i]["code"] == "parse");
    CHECK_THAT(replies[i]["error"].get<std::string>(), Catch::StartsWith("empty request line"));
  }
  CHECK(replies[2]["ok"] == true);
}

TEST_CASE("arguments a verb does not take are refused by name before it runs", "[dauthd][control]") {
  MefDaemon d;
  const auto replies = converse(d.socket,
                                "{\"verb\":\"status\",\"args\":{\"verbose\":true}}\n"
                                "{\"verb\":\"revoke\",\"args\":{\"ids\":\"x@mef.example.net\",\"force\":1}}\n"
                                "{\"verb\":\"enrolees.remove\",\"args\":{\"id\":\"nobody@mef.example.net\"}}\n");
  REQUIRE(replies.size() == 3);
  CHECK(replies[0]["code"] == "invalid_argument");
  CHECK(replies[0]["error"] == "status: unknown argument(s) 'verbose'; it takes none");
  CHECK(replies[1]["code"] == "invalid_argument");
  CHECK(replies[1]["error"] == "revoke: unknown argument(s) 'force', 'ids'; it takes id");
  // A declared argument reaches the verb (here: no such row, not an argument error).
  CHECK(replies[2]["code"] == "not_found");
}

TEST_CASE("every control failure is logged once with its reason and the client's uid and pid", "[dauthd][control]") {
  MefDaemon d(/*max_control_clients=*/1);
  const auto replies = converse(d.socket,
                                "\n"
                                "{not json\n"
                                "{\"verb\":\"frobnicate\"}\n"
                                "{\"verb\":\"status\",\"args\":{\"x\":1}}\n"
                                "{\"verb\":\"peers\"}\n"
                                "{\"verb\":\"status\"}\n");
  REQUIRE(replies.size() == 6);
  CHECK(replies[5]["ok"] == true);
  const std::string prefix = "<5>control: request of " + kClient + " refused (";
  const auto lines = d.wait_log_lines(prefix, 5);
  INFO(dauth::test::read_text_file(d.log));
  REQUIRE(lines.size() == 5);  // five failures, one line each; the status that succeeded is not there
  CHECK(lines[0] == prefix + "parse): " + replies[0]["error"].get<std::string>());
  CHECK(lines[1] == prefix + "parse): " + replies[1]["error"].get<std::string>());
  CHECK(lines[2] == prefix + "invalid_argument): " + replies[2]["error"].get<std::string>());
  CHECK(lines[3] == prefix + "invalid_argument): status: unknown argument(s) 'x'; it takes none");
  CHECK(lines[4] == prefix + "unsupported): peers: no peer role configured ([peer] section)");

  // A connection beyond daemon.max_control_clients: a warning, since something holds every connection.
  const std::string limit_warning = "<4>control: connection of " + kClient + " refused (limit): ";
  const std::size_t warnings_before = d.log_lines(limit_warning).size();  // the start-up probe may have had some
  const int held = connect_to(d.socket);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // accepted before the next one arrives
  const auto refused = converse(d.socket, "{\"verb\":\"status\"}\n");
  ::close(held);
  REQUIRE(refused.size() == 1);
  CHECK(refused[0]["code"] == "limit");
  CHECK(d.wait_log_lines(limit_warning, warnings_before + 1).size() == warnings_before + 1);
}

TEST_CASE("a client failing in a loop gets the log's rate limit: 5 lines then one count of the rest", "[dauthd][control]") {
  MefDaemon d;
  std::string flood;
  for (int i = 0; i < 30; ++i) flood += "{\"verb\":\"frobnicate\"}\n";
  const auto replies = converse(d.socket, flood);
  CHECK(replies.size() == 30);  // every request still gets its reply
  const auto lines = d.wait_log_lines("control: request of", 5);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // a 6th line would be there by now
  CHECK(d.log_lines("control: request of").size() == 5);
  CHECK(lines.size() == 5);
  // The count of the rest comes at exit (or when the interval ends): stop the daemon and read it.
  d.stop();
  const auto summary = d.log_lines("25 more control request lines about uid");
  CHECK(summary.size() == 1);
}

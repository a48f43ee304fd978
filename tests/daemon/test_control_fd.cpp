// Keys over the control socket (docs/control-protocol.md "Passing keys"): descriptors sent with SCM_RIGHTS belong
// to the request whose line carried them, are closed after it on every path, are refused by verbs that take none
// and beyond the cap; read_hex_key_fd applies the key-file rules to them (mode for a regular file, content for a
// pipe, never blocking on an open writer). A real ControlServer runs its EventLoop on a thread; the client is here.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cstring>
#include <thread>

#include "dauth/daemon/control_socket.hpp"
#include "dauth/unique_fd.hpp"
#include "secret_file.hpp"
#include "support.hpp"

using dauth::Errc;
using dauth::daemon::ControlRequest;
using dauth::daemon::ControlServer;
using dauth::daemon::EventLoop;
using dauth::daemon::detail::read_hex_key_fd;

namespace {

const std::string kKeyHex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

std::string fingerprint_of(const std::string& hex) {
  auto key = dauth::secret_from_hex(hex);
  REQUIRE(key.ok());
  return key->fingerprint();
}

// A pipe holding `content`; the write end is closed unless keep_writer.
struct Pipe {
  int read = -1;
  int write = -1;
  Pipe(const std::string& content, bool keep_writer) {
    int ends[2];
    REQUIRE(::pipe2(ends, O_CLOEXEC) == 0);
    read = ends[0];
    write = ends[1];
    REQUIRE(::write(write, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
    if (!keep_writer) close_write();
  }
  ~Pipe() {
    close_read();
    close_write();
  }
  void close_read() {
    if (read >= 0) ::close(read);
    read = -1;
  }
  void close_write() {
    if (write >= 0) ::close(write);
    write = -1;
  }
  // With our read end closed: true iff no process holds a read end any more (the server closed its copy).
  bool no_reader_left() {
    close_read();
    if (write < 0) {
      // Re-open a writer is impossible; the caller keeps the writer when it wants this check.
      FAIL("no_reader_left needs the write end");
    }
    return ::write(write, "x", 1) < 0 && errno == EPIPE;
  }
};

// The server under test, its loop on a thread.
class Server {
 public:
  explicit Server(const std::filesystem::path& path) {
    ::signal(SIGPIPE, SIG_IGN);
    auto loop = EventLoop::create();
    REQUIRE(loop.ok());
    loop_ = std::move(loop).value();
    auto server = ControlServer::open(*loop_, {path, "", 4});
    REQUIRE(server.ok());
    server_ = std::move(server).value();
    // "key": reads the key of the descriptor args.key_fd names, like credentials.add.
    auto key = server_->add_verb(
        "key",
        [](const ControlRequest& r) -> dauth::Result<nlohmann::json> {
          if (r.fds.empty()) return dauth::make_error(Errc::invalid_argument, "key: no file descriptor");
          auto read = read_hex_key_fd(r.fds.at(r.args.value("key_fd", 0)).get(), "key: key_fd", 16, 64);
          if (!read) return std::move(read).error();
          return nlohmann::json{{"fingerprint", read->fingerprint()}, {"fds", r.fds.size()}};
        },
        1);
    REQUIRE(key.ok());
    verbs_.push_back(std::move(key).value());
    auto plain = server_->add_verb("plain", [](const ControlRequest&) -> dauth::Result<nlohmann::json> {
      return nlohmann::json::object();
    });
    REQUIRE(plain.ok());
    verbs_.push_back(std::move(plain).value());
    auto tick = loop_->add_timer(std::chrono::milliseconds(5), std::chrono::milliseconds(5), [this] {
      if (stop_) loop_->stop();
    });
    REQUIRE(tick.ok());
    tick_ = std::move(tick).value();
    thread_ = std::thread([this] { (void)loop_->run(); });
  }
  ~Server() {
    stop_ = true;
    thread_.join();
  }

 private:
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<ControlServer> server_;
  std::vector<ControlServer::VerbRegistration> verbs_;
  EventLoop::Registration tick_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class Client {
 public:
  explicit Client(const std::filesystem::path& path) {
    fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::strcpy(address.sun_path, path.c_str());
    REQUIRE(::connect(fd_.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
    timeval timeout{30, 0};
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  }
  void send(const std::string& bytes, const std::vector<int>& fds = {}) {
    iovec part{const_cast<char*>(bytes.data()), bytes.size()};
    msghdr message{};
    message.msg_iov = &part;
    message.msg_iovlen = 1;
    std::vector<char> control(fds.empty() ? 0 : CMSG_SPACE(sizeof(int) * fds.size()));
    if (!fds.empty()) {
      message.msg_control = control.data();
      message.msg_controllen = control.size();
      cmsghdr* header = CMSG_FIRSTHDR(&message);
      header->cmsg_level = SOL_SOCKET;
      header->cmsg_type = SCM_RIGHTS;
      header->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(header), fds.data(), sizeof(int) * fds.size());
    }
    REQUIRE(::sendmsg(fd_.get(), &message, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
  }
  nlohmann::json reply() {
    for (;;) {
      if (const auto newline = buffer_.find('\n'); newline != std::string::npos) {
        auto line = buffer_.substr(0, newline);
        buffer_.erase(0, newline + 1);
        return nlohmann::json::parse(line);
      }
      char chunk[4096];
      const ssize_t n = ::recv(fd_.get(), chunk, sizeof chunk, 0);
      REQUIRE(n > 0);
      buffer_.append(chunk, static_cast<std::size_t>(n));
    }
  }
  // True when the server closed the connection (EOF after any pending reply).
  bool closed_by_server() {
    char chunk[64];
    return ::recv(fd_.get(), chunk, sizeof chunk, 0) == 0;
  }

 private:
  dauth::UniqueFd fd_;
  std::string buffer_;
};

}  // namespace

TEST_CASE("a key passed as a pipe reaches the verb, and the descriptor is closed after the request", "[control][fd]") {
  dauth::test::TempDir dir;
  Server server(dir / "control");
  Client client(dir / "control");

  // Pipe with the writer closed: read whole.
  Pipe key(kKeyHex + "\n", false);
  client.send("{\"verb\":\"key\",\"args\":{\"key_fd\":0}}\n", {key.read});
  const auto ok = client.reply();
  INFO(ok.dump());
  REQUIRE(ok["ok"] == true);
  CHECK(ok["result"]["fingerprint"] == fingerprint_of(kKeyHex));
  CHECK(ok["result"]["fds"] == 1);

  // A writer still open: refused at once (the loop never waits for it), and the server's copy is closed.
  Pipe open_writer(kKeyHex, true);
  client.send("{\"verb\":\"key\",\"args\":{\"key_fd\":0}}\n", {open_writer.read});
  const auto refused = client.reply();
  CHECK(refused["ok"] == false);
  CHECK_THAT(refused["error"].get<std::string>(), Catch::Contains("the pipe's writer has not closed it"));
  CHECK(open_writer.no_reader_left());
}

TEST_CASE("descriptors belong to the line that carried them", "[control][fd]") {
  dauth::test::TempDir dir;
  Server server(dir / "control");
  Client client(dir / "control");
  Pipe key(kKeyHex, false);
  // Two requests in one write: the descriptor rides on the first byte, so it belongs to the first line only.
  client.send("{\"verb\":\"key\"}\n{\"verb\":\"key\"}\n", {key.read});
  const auto first = client.reply();
  const auto second = client.reply();
  CHECK(first["ok"] == true);
  CHECK(second["ok"] == false);
  CHECK_THAT(second["error"].get<std::string>(), Catch::Contains("no file descriptor"));

  // Sent with the second part of a line split over two writes: still that line's.
  Pipe later(kKeyHex, false);
  client.send("{\"verb\":\"key\",");
  client.send("\"args\":{}}\n", {later.read});
  CHECK(client.reply()["ok"] == true);
}

TEST_CASE("a verb that takes no descriptor refuses them, and they are closed unread", "[control][fd]") {
  dauth::test::TempDir dir;
  Server server(dir / "control");
  Client client(dir / "control");
  Pipe key(kKeyHex, true);
  client.send("{\"verb\":\"plain\"}\n", {key.read});
  const auto refused = client.reply();
  CHECK(refused["ok"] == false);
  CHECK(refused["code"] == "invalid_argument");
  CHECK(refused["error"] == "plain: 1 file descriptor(s) sent with the request, closed unread; this verb takes none");
  CHECK(key.no_reader_left());

  // Two for a verb that takes one: refused before the handler runs; both closed.
  Pipe a(kKeyHex, true);
  Pipe b(kKeyHex, true);
  client.send("{\"verb\":\"key\"}\n", {a.read, b.read});
  CHECK_THAT(client.reply()["error"].get<std::string>(), Catch::Contains("this verb takes at most 1"));
  CHECK(a.no_reader_left());
  CHECK(b.no_reader_left());

  // Garbage and unknown verbs close them too.
  Pipe c(kKeyHex, true);
  client.send("not json\n", {c.read});
  CHECK(client.reply()["code"] == "parse");
  CHECK(c.no_reader_left());
}

TEST_CASE("more descriptors than the cap close the connection with a limit reply", "[control][fd]") {
  dauth::test::TempDir dir;
  Server server(dir / "control");
  Client client(dir / "control");
  std::vector<std::unique_ptr<Pipe>> pipes;
  std::vector<int> fds;
  for (std::size_t i = 0; i < ControlServer::kMaxFdsPerRequest + 1; ++i) {
    pipes.push_back(std::make_unique<Pipe>(kKeyHex, true));
    fds.push_back(pipes.back()->read);
  }
  client.send("{\"verb\":\"key\"}\n", fds);
  const auto refused = client.reply();
  CHECK(refused["code"] == "limit");
  CHECK_THAT(refused["error"].get<std::string>(), Catch::Contains("file descriptors sent with one request"));
  CHECK(client.closed_by_server());
  for (auto& p : pipes) CHECK(p->no_reader_left());
}

TEST_CASE("read_hex_key_fd: key-file modes for regular files, content rules for everything", "[control][fd]") {
  dauth::test::TempDir dir;
  const auto open_file = [&](const std::string& name, const std::string& content, int mode) {
    dauth::test::write_file(dir / name, content, mode);
    const int fd = ::open((dir / name).c_str(), O_RDONLY | O_CLOEXEC);
    REQUIRE(fd >= 0);
    return fd;
  };
  {
    const int fd = open_file("good", kKeyHex + "\n", 0600);
    auto key = read_hex_key_fd(fd, "key_fd 0", 16, 64);
    REQUIRE(key.ok());
    CHECK(key->fingerprint() == fingerprint_of(kKeyHex));
    // pread: the sender's offset is untouched, so a second read sees the same.
    CHECK(read_hex_key_fd(fd, "key_fd 0", 16, 64).ok());
    ::close(fd);
  }
  for (const int mode : {0644, 0640, 0604, 0660}) {
    const int fd = open_file("loose", kKeyHex, mode);
    ::fchmod(fd, static_cast<mode_t>(mode));  // umask-proof
    auto refused = read_hex_key_fd(fd, "key_fd 0", 16, 64);
    ::close(fd);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.error().code == Errc::permission);
    char expected[8];
    std::snprintf(expected, sizeof expected, "%04o", mode);
    CHECK_THAT(refused.error().message, Catch::Contains(std::string("mode ") + expected + ", must not be readable"));
    CHECK(refused.error().message.find(kKeyHex) == std::string::npos);
  }
  const auto content_error = [&](const std::string& content) {
    Pipe pipe(content, false);
    auto r = read_hex_key_fd(pipe.read, "key_fd 0", 16, 64);
    REQUIRE_FALSE(r.ok());
    CHECK(r.error().code == Errc::invalid_argument);
    if (content.size() >= 8) CHECK(r.error().message.find(content.substr(0, 8)) == std::string::npos);  // not quoted
    return r.error().message;
  };
  CHECK_THAT(content_error(std::string(200, 'a')), Catch::Contains("longer than 129 bytes"));
  CHECK_THAT(content_error(std::string(64, 'z')), Catch::Contains("not hexadecimal"));
  CHECK_THAT(content_error("0011"), Catch::Contains("4 hex characters; must be 32–128"));
  CHECK_THAT(content_error(""), Catch::Contains("0 hex characters"));

  // Neither a regular file nor a pipe: refused without reading (a socket, a character device).
  int pair[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) == 0);
  auto socket_refused = read_hex_key_fd(pair[0], "key_fd 0", 16, 64);
  ::close(pair[0]);
  ::close(pair[1]);
  REQUIRE_FALSE(socket_refused.ok());
  CHECK(socket_refused.error().code == Errc::permission);
  CHECK_THAT(socket_refused.error().message, Catch::Contains("not a regular file or a pipe"));
  const int null = ::open("/dev/zero", O_RDONLY | O_CLOEXEC);
  REQUIRE(null >= 0);
  CHECK_FALSE(read_hex_key_fd(null, "key_fd 0", 16, 64).ok());
  ::close(null);
}

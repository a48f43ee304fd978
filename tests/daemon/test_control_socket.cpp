// ControlServer set-up rules that need no client: file mode, refusing to replace files, one daemon per socket,
// verb registration lifetime, and the uniform reply shape.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstring>

#include "dauth/daemon/control_socket.hpp"
#include "support.hpp"

using dauth::Errc;
using dauth::daemon::ControlServer;
using dauth::daemon::EventLoop;

TEST_CASE("the control socket is created 0600 and removed on destruction", "[control]") {
  dauth::test::TempDir dir;
  auto loop = EventLoop::create();
  REQUIRE(loop.ok());
  const auto path = dir / "control";
  {
    auto server = ControlServer::open(**loop, {path, "", 4});
    REQUIRE(server.ok());
    struct stat st {};
    REQUIRE(::lstat(path.c_str(), &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    CHECK((st.st_mode & 0777) == 0600);

    // A second server on the same path finds the first one alive and refuses.
    auto second = ControlServer::open(**loop, {path, "", 4});
    REQUIRE_FALSE(second.ok());
    CHECK(second.error().code == Errc::exists);
    CHECK_THAT(second.error().message, Catch::Contains("another process"));
  }
  CHECK_FALSE(std::filesystem::exists(path));
}

TEST_CASE("a stale socket is replaced, any other file is not", "[control]") {
  dauth::test::TempDir dir;
  auto loop = EventLoop::create();
  REQUIRE(loop.ok());
  const auto path = dir / "control";
  // A socket file nobody listens on: what a killed daemon leaves behind.
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strcpy(address.sun_path, path.c_str());
  REQUIRE(::bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0);
  ::close(fd);
  CHECK(ControlServer::open(**loop, {path, "", 4}).ok());

  dauth::test::write_file(dir / "not-a-socket", std::string("data"));
  auto refused = ControlServer::open(**loop, {dir / "not-a-socket", "", 4});
  REQUIRE_FALSE(refused.ok());
  CHECK_THAT(refused.error().message, Catch::Contains("is not a socket; refusing to replace it"));
  CHECK(dauth::test::read_text_file(dir / "not-a-socket") == "data");

  const std::string long_name(120, 'x');
  auto too_long = ControlServer::open(**loop, {dir / long_name, "", 4});
  REQUIRE_FALSE(too_long.ok());
  CHECK_THAT(too_long.error().message, Catch::Contains("must be at most 107 (sockaddr_un)"));
}

TEST_CASE("verbs stay registered while their registration lives", "[control]") {
  dauth::test::TempDir dir;
  auto loop = EventLoop::create();
  REQUIRE(loop.ok());
  auto server = ControlServer::open(**loop, {dir / "control", "", 4});
  REQUIRE(server.ok());
  {
    auto verb = (*server)->add_verb("ping", [](const dauth::daemon::ControlRequest&) -> dauth::Result<nlohmann::json> {
      return nlohmann::json{{"pong", true}};
    });
    REQUIRE(verb.ok());
    CHECK((*server)->verbs() == std::vector<std::string>{"ping"});
    auto twice = (*server)->add_verb("ping", nullptr);
    REQUIRE_FALSE(twice.ok());
    CHECK(twice.error().code == Errc::exists);
  }
  CHECK((*server)->verbs().empty());
}

TEST_CASE("replies have one shape for success and failure", "[control]") {
  const auto ok = nlohmann::json::parse(ControlServer::reply_line(nlohmann::json{{"n", 1}}));
  CHECK(ok == nlohmann::json{{"ok", true}, {"result", {{"n", 1}}}});
  const auto failed = nlohmann::json::parse(
      ControlServer::reply_line(dauth::make_error(Errc::unsupported, "enrol: not available yet")));
  CHECK(failed == nlohmann::json{{"ok", false}, {"error", "enrol: not available yet"}, {"code", "unsupported"}});
  // Invalid UTF-8 in a message is replaced, not thrown on.
  const auto odd = ControlServer::reply_line(dauth::make_error(Errc::parse, std::string("bad \xff byte")));
  CHECK(nlohmann::json::parse(odd)["ok"] == false);
}

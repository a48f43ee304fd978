// Node::add_watch (transport.hpp): an outside descriptor joins the Node's loop, e.g. a key store's durable_fd.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "dauth/transport/transport.hpp"

using namespace dauth;

namespace {

bool readable(int fd) {
  pollfd ready{fd, POLLIN, 0};
  return ::poll(&ready, 1, 0) == 1;
}

}  // namespace

TEST_CASE("transport: a watched descriptor wakes fd() and its handler runs each round until removed",
          "[transport][watch]") {
  auto node = transport::Node::create(transport::NodeConfig{});
  REQUIRE(node.ok());
  const int event = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  REQUIRE(event >= 0);
  int rounds_with_work = 0;
  int calls = 0;
  REQUIRE((*node)->add_watch(event, [&] {
    ++calls;
    eventfd_t value = 0;
    if (eventfd_read(event, &value) == 0) ++rounds_with_work;
  }).ok());
  CHECK_FALSE(readable((*node)->fd()));

  REQUIRE(eventfd_write(event, 1) == 0);
  CHECK(readable((*node)->fd()));  // level-triggered: the loop wakes for the outside work
  (*node)->process_ready();
  CHECK(rounds_with_work == 1);
  CHECK_FALSE(readable((*node)->fd()));  // the handler cleared it

  const auto duplicate = (*node)->add_watch(event, [] {});
  REQUIRE_FALSE(duplicate.ok());
  CHECK(duplicate.error().code == Errc::exists);

  (*node)->remove_watch(event);
  const int calls_before = calls;
  REQUIRE(eventfd_write(event, 1) == 0);
  CHECK_FALSE(readable((*node)->fd()));
  (*node)->process_ready();
  CHECK(calls == calls_before);
  ::close(event);
}

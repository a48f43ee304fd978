// EventLoop: fd watches, timers and signals through one epoll set; RAII registrations remove themselves,
// also from inside their own callback.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>

#include "dauth/daemon/event_loop.hpp"

using dauth::daemon::EventLoop;

TEST_CASE("a timer repeats until its registration is destroyed inside its own callback", "[event_loop]") {
  auto loop = EventLoop::create();
  REQUIRE(loop.ok());
  int fired = 0;
  EventLoop::Registration timer;
  auto added = (*loop)->add_timer(std::chrono::milliseconds(1), std::chrono::milliseconds(1), [&] {
    if (++fired == 3) {
      timer.reset();  // removal from inside the callback
      (*loop)->stop();
    }
  });
  REQUIRE(added.ok());
  timer = std::move(added).value();
  CHECK((*loop)->watch_count() == 1);
  REQUIRE((*loop)->run().ok());
  CHECK(fired == 3);
  CHECK((*loop)->watch_count() == 0);
  CHECK_FALSE(timer.active());
}

TEST_CASE("an fd watch sees data, and a destroyed watch sees nothing more", "[event_loop]") {
  auto loop = EventLoop::create();
  REQUIRE(loop.ok());
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  std::string seen;
  auto watch = (*loop)->watch(fds[0], EPOLLIN, [&](std::uint32_t events) {
    CHECK((events & EPOLLIN) != 0);
    char buffer[16];
    const ssize_t n = ::read(fds[0], buffer, sizeof buffer);
    if (n > 0) seen.append(buffer, static_cast<std::size_t>(n));
    (*loop)->stop();
  });
  REQUIRE(watch.ok());
  REQUIRE(::write(fds[1], "ping", 4) == 4);
  REQUIRE((*loop)->run().ok());
  CHECK(seen == "ping");

  watch->reset();
  REQUIRE(::write(fds[1], "more", 4) == 4);
  // Only a one-shot timer can end this run: the pipe is readable, but nobody watches it any more.
  auto stop = (*loop)->add_timer(std::chrono::milliseconds(5), std::chrono::milliseconds(0), [&] { (*loop)->stop(); });
  REQUIRE(stop.ok());
  REQUIRE((*loop)->run().ok());
  CHECK(seen == "ping");
  ::close(fds[0]);
  ::close(fds[1]);
}

TEST_CASE("signals arrive through the signalfd with their sender", "[event_loop]") {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  sigset_t previous;
  REQUIRE(::pthread_sigmask(SIG_BLOCK, &set, &previous) == 0);
  {
    auto loop = EventLoop::create();
    REQUIRE(loop.ok());
    int signo = 0;
    pid_t sender = 0;
    auto watch = (*loop)->on_signals({SIGUSR1}, [&](const signalfd_siginfo& info) {
      signo = static_cast<int>(info.ssi_signo);
      sender = static_cast<pid_t>(info.ssi_pid);
      (*loop)->stop();
    });
    REQUIRE(watch.ok());
    REQUIRE(::kill(::getpid(), SIGUSR1) == 0);
    REQUIRE((*loop)->run().ok());
    CHECK(signo == SIGUSR1);
    CHECK(sender == ::getpid());
  }
  REQUIRE(::pthread_sigmask(SIG_SETMASK, &previous, nullptr) == 0);
}

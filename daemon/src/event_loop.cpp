#include "dauth/daemon/event_loop.hpp"

#include <signal.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <string>

namespace dauth::daemon {

namespace {
Error system_error(const std::string& what) {
  return make_error(Errc::io, "event loop: " + what + ": " + std::strerror(errno));
}

timespec to_timespec(std::chrono::milliseconds ms) {
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(ms.count() / 1000);
  ts.tv_nsec = static_cast<long>((ms.count() % 1000) * 1000000);
  return ts;
}
}  // namespace

EventLoop::Registration::Registration(Registration&& other) noexcept : loop_(other.loop_), id_(other.id_) {
  other.loop_ = nullptr;
}

EventLoop::Registration& EventLoop::Registration::operator=(Registration&& other) noexcept {
  if (this != &other) {
    reset();
    loop_ = other.loop_;
    id_ = other.id_;
    other.loop_ = nullptr;
  }
  return *this;
}

void EventLoop::Registration::reset() noexcept {
  if (loop_) loop_->remove(id_);
  loop_ = nullptr;
}

Result<void> EventLoop::Registration::set_events(std::uint32_t events) {
  if (!loop_) return make_error(Errc::internal, "event loop: set_events on an empty registration");
  return loop_->modify(id_, events);
}

Result<std::unique_ptr<EventLoop>> EventLoop::create() {
  const int fd = ::epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) return system_error("epoll_create1");
  return std::unique_ptr<EventLoop>(new EventLoop(fd));
}

EventLoop::~EventLoop() = default;  // each Entry closes the descriptor it owns

Result<EventLoop::Registration> EventLoop::add(Entry entry, std::uint32_t events) {
  const std::uint64_t id = next_id_++;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = id;  // ids are never reused, so a stale event for a removed entry finds nothing
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_ADD, entry.fd, &ev) != 0) {
    return system_error("epoll_ctl ADD fd " + std::to_string(entry.fd));  // `entry` closes an owned fd
  }
  entries_.emplace(id, std::move(entry));
  return Registration(this, id);
}

void EventLoop::remove(std::uint64_t id) noexcept {
  const auto it = entries_.find(id);
  if (it == entries_.end()) return;
  ::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_DEL, it->second.fd, nullptr);
  // Closes an owned fd. A running callback holds its own shared_ptr, so erasing here is safe.
  entries_.erase(it);
}

Result<void> EventLoop::modify(std::uint64_t id, std::uint32_t events) {
  const auto it = entries_.find(id);
  if (it == entries_.end()) return make_error(Errc::not_found, "event loop: no watch " + std::to_string(id));
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = id;
  if (::epoll_ctl(epoll_fd_.get(), EPOLL_CTL_MOD, it->second.fd, &ev) != 0) return system_error("epoll_ctl MOD");
  return ok_result();
}

Result<EventLoop::Registration> EventLoop::watch(int fd, std::uint32_t events, FdCallback callback) {
  Entry entry{Kind::fd, fd, UniqueFd(), std::make_shared<FdCallback>(std::move(callback)), nullptr, nullptr};
  return add(std::move(entry), events);
}

Result<EventLoop::Registration> EventLoop::add_timer(std::chrono::milliseconds first,
                                                     std::chrono::milliseconds interval, TimerCallback callback) {
  UniqueFd owned(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
  if (!owned.valid()) return system_error("timerfd_create");
  const int fd = owned.get();
  itimerspec spec{};
  // A zero it_value disarms a timerfd: the earliest "now" is one nanosecond.
  spec.it_value = first.count() > 0 ? to_timespec(first) : timespec{0, 1};
  spec.it_interval = to_timespec(interval);
  if (::timerfd_settime(fd, 0, &spec, nullptr) != 0) {
    return system_error("timerfd_settime");
  }
  Entry entry{Kind::timer, fd, std::move(owned), nullptr, std::make_shared<TimerCallback>(std::move(callback)), nullptr};
  return add(std::move(entry), EPOLLIN);
}

Result<EventLoop::Registration> EventLoop::on_signals(std::initializer_list<int> signals,
                                                      SignalCallback callback) {
  sigset_t set;
  sigemptyset(&set);
  for (const int s : signals) sigaddset(&set, s);
  UniqueFd owned(::signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC));
  if (!owned.valid()) return system_error("signalfd");
  const int fd = owned.get();
  Entry entry{Kind::signal, fd, std::move(owned), nullptr, nullptr, std::make_shared<SignalCallback>(std::move(callback))};
  return add(std::move(entry), EPOLLIN);
}

void EventLoop::dispatch(std::uint64_t id, std::uint32_t events) {
  const auto it = entries_.find(id);
  if (it == entries_.end()) return;  // removed by an earlier callback of this batch
  const Entry& entry = it->second;
  switch (entry.kind) {
    case Kind::fd: {
      const auto callback = entry.on_fd;
      (*callback)(events);
      return;
    }
    case Kind::timer: {
      std::uint64_t expirations = 0;
      if (::read(entry.fd, &expirations, sizeof expirations) != static_cast<ssize_t>(sizeof expirations)) return;
      const auto callback = entry.on_timer;
      (*callback)();  // missed expirations collapse into one call: timers here are periodic chores
      return;
    }
    case Kind::signal: {
      const auto callback = entry.on_signal;
      const int fd = entry.fd;
      signalfd_siginfo info{};
      while (::read(fd, &info, sizeof info) == static_cast<ssize_t>(sizeof info)) {
        (*callback)(info);
        if (entries_.find(id) == entries_.end()) return;  // the callback removed its own registration
      }
      return;
    }
  }
}

Result<void> EventLoop::run() {
  running_ = true;
  std::array<epoll_event, 32> events{};
  while (running_) {
    const int n = ::epoll_wait(epoll_fd_.get(), events.data(), static_cast<int>(events.size()), -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      running_ = false;
      return system_error("epoll_wait");
    }
    for (int i = 0; i < n && running_; ++i) dispatch(events[static_cast<std::size_t>(i)].data.u64,
                                                     events[static_cast<std::size_t>(i)].events);
  }
  return ok_result();
}

}  // namespace dauth::daemon

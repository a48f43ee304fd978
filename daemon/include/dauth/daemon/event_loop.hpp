// The daemon's single-threaded event loop (docs/transport.md §1): one epoll set over file descriptors (libcoap's epoll
// fd, the control socket and its clients), a signalfd and timerfds. Callbacks run on the loop's thread and must
// not block.
//
// Every registration returns a Registration; destroying it removes the watch (and closes the timerfd/signalfd
// the loop created for it), so a component's registrations are torn down with the component (docs/conventions.md §16).
// A Registration may be destroyed from inside any callback, including its own: removal is deferred safely.
// The loop must outlive every Registration it handed out.
#pragma once

#include <sys/epoll.h>
#include <sys/signalfd.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>

#include "dauth/error.hpp"
#include "dauth/unique_fd.hpp"

namespace dauth::daemon {

class EventLoop {
 public:
  class Registration {
   public:
    Registration() = default;
    ~Registration() { reset(); }
    Registration(Registration&& other) noexcept;
    Registration& operator=(Registration&& other) noexcept;
    Registration(const Registration&) = delete;
    Registration& operator=(const Registration&) = delete;

    // Removes the watch now (no callback runs for it afterwards).
    void reset() noexcept;
    bool active() const noexcept { return loop_ != nullptr; }
    // File watches only: changes the epoll event mask (EPOLLIN, EPOLLOUT, ...).
    Result<void> set_events(std::uint32_t events);

   private:
    friend class EventLoop;
    Registration(EventLoop* loop, std::uint64_t id) : loop_(loop), id_(id) {}
    EventLoop* loop_ = nullptr;
    std::uint64_t id_ = 0;
  };

  using FdCallback = std::function<void(std::uint32_t events)>;
  using TimerCallback = std::function<void()>;
  using SignalCallback = std::function<void(const signalfd_siginfo&)>;

  // Errc::io if epoll cannot be created.
  static Result<std::unique_ptr<EventLoop>> create();
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Watches fd (owned by the caller, who must keep it open while the Registration lives).
  Result<Registration> watch(int fd, std::uint32_t events, FdCallback callback);
  // First run after `first`, then every `interval` (zero: once). Monotonic clock.
  Result<Registration> add_timer(std::chrono::milliseconds first, std::chrono::milliseconds interval,
                                 TimerCallback callback);
  // Delivers the signals through a signalfd. The caller must have blocked them (sigprocmask) in every thread
  // beforehand, or they keep their default action.
  Result<Registration> on_signals(std::initializer_list<int> signals, SignalCallback callback);

  // Runs until stop(); Errc::io if epoll_wait fails for another reason than EINTR.
  Result<void> run();
  void stop() noexcept { running_ = false; }

  std::size_t watch_count() const noexcept { return entries_.size(); }

 private:
  enum class Kind : std::uint8_t { fd, timer, signal };
  struct Entry {
    Kind kind;
    int fd;
    UniqueFd owned;  // fd itself when the loop created it (timers, signals); closed with the entry
    std::shared_ptr<FdCallback> on_fd;
    std::shared_ptr<TimerCallback> on_timer;
    std::shared_ptr<SignalCallback> on_signal;
  };

  explicit EventLoop(int epoll_fd) : epoll_fd_(epoll_fd) {}
  Result<Registration> add(Entry entry, std::uint32_t events);
  void remove(std::uint64_t id) noexcept;
  Result<void> modify(std::uint64_t id, std::uint32_t events);
  void dispatch(std::uint64_t id, std::uint32_t events);

  UniqueFd epoll_fd_;  // closed after the owned descriptors (the destructor closes those)
  bool running_ = false;
  std::uint64_t next_id_ = 1;
  std::map<std::uint64_t, Entry> entries_;
};

}  // namespace dauth::daemon

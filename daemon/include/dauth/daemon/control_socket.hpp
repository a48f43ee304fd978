// The control socket (docs/control-protocol.md): AF_UNIX stream, one JSON object per line in each direction.
//
//   request:  {"verb": "status", "args": {...}}           args optional
//   reply:    {"ok": true, "result": {...}}
//             {"ok": false, "error": "<what, where, which value, what is allowed>", "code": "<Errc word>"}
//
// Replies are uniform (docs/conventions.md §3): every line gets one reply, and every failure, including an empty or
// malformed line, an unknown verb, a refused peer or an oversized line, is an {"ok": false} reply that dauthctl
// prints unchanged; each failure is also logged once with the client's uid and pid (SO_PEERCRED). The socket file is created
// 0600 (or 0660 with the configured group); each connection's peer is also checked with SO_PEERCRED (root, the
// daemon's own user, or a member of the control group). A line longer than kMaxLineBytes gets a "limit" reply and
// the connection is closed. At most max_clients connections are served at once.
//
// File descriptors (SCM_RIGHTS) travel with a request line: key bytes never go through JSON (a std::string or
// nlohmann value keeps unwiped copies), so dauthctl passes the open key file or a pipe holding the key, and the
// request names it by index ("key_fd": 0). Descriptors are received close-on-exec and belong to the request whose
// line carried them; each is closed when that request's handler returns, on every path. A verb accepts at most the
// number it registered (default none): a request with more is refused and its descriptors closed. A connection
// with more than kMaxFdsPerRequest descriptors pending (or a truncated set) gets a "limit" reply and is closed.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dauth/daemon/event_loop.hpp"
#include "dauth/error.hpp"
#include "dauth/unique_fd.hpp"

namespace dauth::daemon {

struct ControlPeer {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

struct ControlRequest {
  std::string verb;
  nlohmann::json args;  // always an object
  ControlPeer peer;
  // The descriptors that came with this line, in the order sent; "args" refers to them by index. At most the
  // verb's max_fds. Closed after the handler returns.
  std::vector<UniqueFd> fds;
};

// A verb's answer: the "result" object, or the Error that becomes {"ok": false, ...}.
using VerbHandler = std::function<Result<nlohmann::json>(const ControlRequest&)>;

struct ControlSocketOptions {
  std::filesystem::path path;
  std::string group;  // empty: 0600
  int max_clients = 8;
};

class ControlServer {
 public:
  // Longest request line accepted, newline excluded. Requests are small; a bound stops a client from growing
  // the daemon's memory without limit.
  static constexpr std::size_t kMaxLineBytes = 64 * 1024;
  // Most descriptors one request (and one connection, before its line is complete) may carry.
  static constexpr std::size_t kMaxFdsPerRequest = 4;

  // Binds and listens. An existing socket file nobody answers on is replaced; one a live process answers on is
  // an error (Errc::exists), as is any other file at path.
  static Result<std::unique_ptr<ControlServer>> open(EventLoop& loop, const ControlSocketOptions& options);
  // Closes every connection and the listening socket, and removes the socket file.
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // A verb stays registered while its VerbRegistration lives (docs/conventions.md §16: the removal sits next to the
  // add).
  class VerbRegistration {
   public:
    VerbRegistration() = default;
    ~VerbRegistration() { reset(); }
    VerbRegistration(VerbRegistration&& other) noexcept;
    VerbRegistration& operator=(VerbRegistration&& other) noexcept;
    VerbRegistration(const VerbRegistration&) = delete;
    VerbRegistration& operator=(const VerbRegistration&) = delete;
    void reset() noexcept;

   private:
    friend class ControlServer;
    VerbRegistration(ControlServer* server, std::string verb) : server_(server), verb_(std::move(verb)) {}
    ControlServer* server_ = nullptr;
    std::string verb_;
  };
  // Errc::exists if the verb is already registered. max_fds: how many descriptors a request may carry (at most
  // kMaxFdsPerRequest); a request with more is refused before the handler runs.
  Result<VerbRegistration> add_verb(std::string verb, VerbHandler handler, std::size_t max_fds = 0);

  // Stops accepting connections (shutdown); live connections are served until they close.
  void stop_accepting() noexcept;

  std::vector<std::string> verbs() const;
  std::size_t client_count() const noexcept { return clients_.size(); }
  std::uint64_t requests_served() const noexcept { return requests_; }
  std::uint64_t requests_failed() const noexcept { return failed_; }
  const std::filesystem::path& path() const noexcept { return options_.path; }

  // The reply line (without newline) for a handler outcome; exposed for tests and for the documentation.
  static std::string reply_line(const Result<nlohmann::json>& outcome);

 private:
  struct Client;
  ControlServer(EventLoop& loop, ControlSocketOptions options, UniqueFd fd, gid_t group);
  void on_accept();
  void on_client(std::uint64_t id, std::uint32_t events);
  void handle_line(Client& client, const std::string& line, std::vector<UniqueFd> fds);
  // recvmsg() with room for kMaxFdsPerRequest descriptors; false when the connection must close (limit reply
  // queued). n is read()'s result.
  bool receive(Client& client, char* buffer, std::size_t size, ssize_t& n);
  // A failure is counted and logged once (log_failure), with the client's uid and pid.
  void queue_reply(Client& client, const Result<nlohmann::json>& outcome, bool connection_refused = false);
  void log_failure(const ControlPeer& peer, const Error& error, bool connection_refused);
  // Writes what it can; false when the client was closed.
  bool flush(std::uint64_t id);
  void close_client(std::uint64_t id);
  bool peer_allowed(const ControlPeer& peer) const;

  EventLoop& loop_;
  ControlSocketOptions options_;
  UniqueFd listen_fd_;
  gid_t group_;
  bool has_group_;
  EventLoop::Registration listen_watch_;
  struct Verb {
    VerbHandler handler;
    std::size_t max_fds = 0;
  };
  std::map<std::string, Verb> verbs_;
  std::map<std::uint64_t, std::unique_ptr<Client>> clients_;
  std::uint64_t next_client_ = 1;
  std::uint64_t requests_ = 0;
  std::uint64_t failed_ = 0;
};

}  // namespace dauth::daemon

#include "dauth/daemon/control_socket.hpp"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <utility>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/daemon/log.hpp"

namespace dauth::daemon {

namespace {

Error socket_error(Errc code, const std::filesystem::path& path, const std::string& what) {
  return make_error(code, "control socket " + path.string() + ": " + what);
}

Result<sockaddr_un> socket_address(const std::filesystem::path& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  const std::string text = path.string();
  if (text.size() >= sizeof address.sun_path) {
    return socket_error(Errc::invalid_argument, path,
                        "path is " + std::to_string(text.size()) + " bytes; must be at most " +
                            std::to_string(sizeof address.sun_path - 1) + " (sockaddr_un)");
  }
  std::memcpy(address.sun_path, text.c_str(), text.size() + 1);
  return address;
}

// True if some process accepts connections on the socket file.
bool someone_listens(const sockaddr_un& address) {
  const UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  return fd.valid() && ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0;
}

}  // namespace

struct ControlServer::Client {
  UniqueFd fd;
  ControlPeer peer;
  EventLoop::Registration watch;
  std::string input;
  std::string output;
  bool close_after_flush = false;
  // Bytes of the stream already taken out of input: with it, a descriptor's stream offset says which line carried it.
  std::uint64_t consumed = 0;
  // Descriptors received and not yet handed to a request, each with the stream offset of the first byte that came
  // with it (the kernel delivers SCM_RIGHTS with the first byte of the sendmsg() that sent them).
  std::deque<std::pair<std::uint64_t, UniqueFd>> fds;

  ~Client() {
    watch.reset();  // out of the epoll set before the descriptor closes
  }
};

ControlServer::ControlServer(EventLoop& loop, ControlSocketOptions options, UniqueFd fd, gid_t group)
    : loop_(loop), options_(std::move(options)), listen_fd_(std::move(fd)), group_(group),
      has_group_(!options_.group.empty()) {}

Result<std::unique_ptr<ControlServer>> ControlServer::open(EventLoop& loop, const ControlSocketOptions& options) {
  auto address = socket_address(options.path);
  if (!address) return address.error();

  gid_t group = 0;
  if (!options.group.empty()) {
    ::group entry{};
    ::group* found = nullptr;
    std::vector<char> buffer(16384);
    if (::getgrnam_r(options.group.c_str(), &entry, buffer.data(), buffer.size(), &found) != 0 || !found) {
      return socket_error(Errc::not_found, options.path, "group " + crypto::quote_for_error(options.group) +
                                                             " does not exist");
    }
    group = found->gr_gid;
  }

  struct stat st {};
  if (::lstat(options.path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return socket_error(Errc::exists, options.path, "exists and is not a socket; refusing to replace it");
    }
    if (someone_listens(*address)) {
      return socket_error(Errc::exists, options.path, "another process (a running dauthd?) answers on it");
    }
    ::unlink(options.path.c_str());  // stale socket of a process that died
  }

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return socket_error(Errc::io, options.path, std::string("socket: ") + std::strerror(errno));
  // The file is created with the umask's mode: 0600 from the start, never briefly wider.
  const mode_t previous = ::umask(0177);
  const int bound = ::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address.value()), sizeof(sockaddr_un));
  const int bind_errno = errno;
  ::umask(previous);
  if (bound != 0) {
    return socket_error(bind_errno == EACCES ? Errc::permission : Errc::io, options.path,
                        std::string("bind: ") + std::strerror(bind_errno));
  }
  if (!options.group.empty()) {
    if (::chown(options.path.c_str(), static_cast<uid_t>(-1), group) != 0 || ::chmod(options.path.c_str(), 0660) != 0) {
      const int err = errno;
      ::unlink(options.path.c_str());
      return socket_error(Errc::permission, options.path, "cannot give it to group " + options.group + ": " +
                                                              std::strerror(err));
    }
  }
  if (::listen(fd.get(), 16) != 0) {
    const int err = errno;
    ::unlink(options.path.c_str());
    return socket_error(Errc::io, options.path, std::string("listen: ") + std::strerror(err));
  }

  const int listen_fd = fd.get();
  std::unique_ptr<ControlServer> server(new ControlServer(loop, options, std::move(fd), group));
  ControlServer* self = server.get();
  auto watch = loop.watch(listen_fd, EPOLLIN, [self](std::uint32_t) { self->on_accept(); });
  if (!watch) return watch.error();  // the destructor closes fd and removes the file
  server->listen_watch_ = std::move(watch).value();
  return server;
}

ControlServer::~ControlServer() {
  clients_.clear();
  listen_watch_.reset();
  if (listen_fd_.valid()) {
    listen_fd_.reset();
    ::unlink(options_.path.c_str());
  }
}

void ControlServer::stop_accepting() noexcept {
  listen_watch_.reset();
  if (listen_fd_.valid()) {
    listen_fd_.reset();
    ::unlink(options_.path.c_str());
  }
}

ControlServer::VerbRegistration::VerbRegistration(VerbRegistration&& other) noexcept
    : server_(other.server_), verb_(std::move(other.verb_)) {
  other.server_ = nullptr;
}

ControlServer::VerbRegistration& ControlServer::VerbRegistration::operator=(VerbRegistration&& other) noexcept {
  if (this != &other) {
    reset();
    server_ = other.server_;
    verb_ = std::move(other.verb_);
    other.server_ = nullptr;
  }
  return *this;
}

void ControlServer::VerbRegistration::reset() noexcept {
  if (server_) server_->verbs_.erase(verb_);
  server_ = nullptr;
}

Result<ControlServer::VerbRegistration> ControlServer::add_verb(std::string verb, VerbHandler handler,
                                                               std::size_t max_fds) {
  if (verbs_.count(verb)) return make_error(Errc::exists, "control verb '" + verb + "' registered twice");
  verbs_.emplace(verb, Verb{std::move(handler), std::min(max_fds, kMaxFdsPerRequest)});
  return VerbRegistration(this, std::move(verb));
}

std::vector<std::string> ControlServer::verbs() const {
  std::vector<std::string> names;
  for (const auto& [name, handler] : verbs_) names.push_back(name);
  return names;
}

bool ControlServer::peer_allowed(const ControlPeer& peer) const {
  if (peer.uid == 0 || peer.uid == ::geteuid()) return true;
  if (!has_group_) return false;
  if (peer.gid == group_) return true;
  // Supplementary groups are not in SO_PEERCRED: look the user's memberships up.
  passwd entry{};
  passwd* found = nullptr;
  std::vector<char> buffer(16384);
  if (::getpwuid_r(peer.uid, &entry, buffer.data(), buffer.size(), &found) != 0 || !found) return false;
  int count = 64;
  std::vector<gid_t> groups(static_cast<std::size_t>(count));
  if (::getgrouplist(found->pw_name, found->pw_gid, groups.data(), &count) < 0) {
    groups.resize(static_cast<std::size_t>(count));
    if (::getgrouplist(found->pw_name, found->pw_gid, groups.data(), &count) < 0) return false;
  }
  groups.resize(static_cast<std::size_t>(count));
  return std::find(groups.begin(), groups.end(), group_) != groups.end();
}

void ControlServer::on_accept() {
  for (;;) {
    const int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
        log::warning(std::string("control socket: accept: ") + std::strerror(errno));
      }
      return;
    }
    auto client = std::make_unique<Client>();
    client->fd.reset(fd);
    ucred credentials{};
    socklen_t length = sizeof credentials;
    const bool have_credentials = ::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0;
    client->peer = {credentials.pid, credentials.uid, credentials.gid};
    const std::uint64_t id = next_client_++;

    Result<nlohmann::json> refusal = nlohmann::json::object();
    if (!have_credentials) {
      refusal = make_error(Errc::internal, std::string("control socket: SO_PEERCRED: ") + std::strerror(errno));
    } else if (!peer_allowed(client->peer)) {
      refusal = make_error(Errc::permission, "control socket: uid " + std::to_string(client->peer.uid) +
                                                 " is not root, dauthd's user" +
                                                 (has_group_ ? ", or a member of group " + options_.group : "") +
                                                 "; permission refused");
    } else if (clients_.size() >= static_cast<std::size_t>(options_.max_clients)) {
      refusal = make_error(Errc::limit, "control socket: " + std::to_string(clients_.size()) +
                                            " connections already open; daemon.max_control_clients = " +
                                            std::to_string(options_.max_clients));
    }
    auto watch = loop_.watch(fd, EPOLLIN, [this, id](std::uint32_t events) { on_client(id, events); });
    if (!watch) {
      log::warning(watch.error().message);
      continue;  // the Client destructor closes fd
    }
    client->watch = std::move(watch).value();
    Client& stored = *clients_.emplace(id, std::move(client)).first->second;
    if (!refusal) {
      queue_reply(stored, refusal, /*connection_refused=*/true);
      stored.close_after_flush = true;
      flush(id);
    }
  }
}

void ControlServer::on_client(std::uint64_t id, std::uint32_t events) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return;
  Client& client = *it->second;

  if (events & EPOLLOUT) {
    if (!flush(id)) return;
  }
  if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)) || client.close_after_flush) return;

  char buffer[4096];
  bool peer_closed = false;
  for (;;) {
    ssize_t n = 0;
    if (!receive(client, buffer, sizeof buffer, n)) break;
    if (n > 0) {
      client.input.append(buffer, static_cast<std::size_t>(n));
      // Stop reading at the bound: whatever follows is not going to be parsed.
      if (client.input.size() > kMaxLineBytes && client.input.find('\n') == std::string::npos) break;
      continue;
    }
    if (n == 0) peer_closed = true;
    if (n < 0 && errno == EINTR) continue;
    break;
  }

  std::size_t start = 0;
  for (;;) {
    const auto newline = client.input.find('\n', start);
    if (newline == std::string::npos) break;
    if (newline - start > kMaxLineBytes) break;  // handled as oversized below
    // The descriptors sent with any byte of this line belong to its request (those of an empty line are closed).
    const std::uint64_t line_end = client.consumed + newline;
    std::vector<UniqueFd> fds;
    while (!client.fds.empty() && client.fds.front().first <= line_end) {
      fds.push_back(std::move(client.fds.front().second));
      client.fds.pop_front();
    }
    std::string line = client.input.substr(start, newline - start);
    start = newline + 1;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    handle_line(client, line, std::move(fds));  // an empty line too: every line gets its reply
  }
  client.input.erase(0, start);
  client.consumed += start;
  const auto pending_newline = client.input.find('\n');
  const std::size_t pending_line = pending_newline == std::string::npos ? client.input.size() : pending_newline;
  if (pending_line > kMaxLineBytes) {
    queue_reply(client, make_error(Errc::limit, "request line longer than " + std::to_string(kMaxLineBytes) +
                                                    " bytes; closing the connection"));
    client.input.clear();
    client.close_after_flush = true;
  }
  if (peer_closed) client.close_after_flush = true;
  flush(id);
}

bool ControlServer::receive(Client& client, char* buffer, std::size_t size, ssize_t& n) {
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerRequest)];
  iovec part{buffer, size};
  msghdr message{};
  message.msg_iov = &part;
  message.msg_iovlen = 1;
  message.msg_control = control;
  message.msg_controllen = sizeof control;
  // Close-on-exec from the start: no window in which a descriptor could leak into a child process.
  n = ::recvmsg(client.fd.get(), &message, MSG_CMSG_CLOEXEC);
  if (n <= 0) return true;  // errno is the caller's to read
  const std::uint64_t offset = client.consumed + client.input.size();
  for (cmsghdr* c = CMSG_FIRSTHDR(&message); c != nullptr; c = CMSG_NXTHDR(&message, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd = -1;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      client.fds.emplace_back(offset, UniqueFd(fd));  // owned (and closed) from here on
    }
  }
  // MSG_CTRUNC: more were sent than fit; the kernel closed the rest. Either way this client sends more than any
  // verb takes.
  if ((message.msg_flags & MSG_CTRUNC) != 0 || client.fds.size() > kMaxFdsPerRequest) {
    client.fds.clear();
    queue_reply(client, make_error(Errc::limit, "more than " + std::to_string(kMaxFdsPerRequest) +
                                                    " file descriptors sent with one request; closing the connection"));
    client.input.clear();
    client.close_after_flush = true;
    return false;
  }
  return true;
}

void ControlServer::handle_line(Client& client, const std::string& line, std::vector<UniqueFd> fds) {
  ++requests_;
  if (line.empty()) {
    queue_reply(client, make_error(Errc::parse, "empty request line: expected one JSON object per line, such as "
                                                "{\"verb\": \"status\", \"args\": {}}"));
    return;
  }
  const auto request = nlohmann::json::parse(line, nullptr, false);
  if (request.is_discarded() || !request.is_object()) {
    queue_reply(client, make_error(Errc::parse, "request is not a JSON object on one line: expected "
                                                "{\"verb\": \"status\", \"args\": {}}"));
    return;
  }
  const auto verb = request.find("verb");
  if (verb == request.end() || !verb->is_string()) {
    queue_reply(client, make_error(Errc::invalid_argument, "request has no \"verb\" string"));
    return;
  }
  ControlRequest parsed;
  parsed.verb = verb->get<std::string>();
  parsed.peer = client.peer;
  parsed.args = nlohmann::json::object();
  if (const auto args = request.find("args"); args != request.end()) {
    if (!args->is_object()) {
      queue_reply(client, make_error(Errc::invalid_argument, parsed.verb + ": \"args\" must be an object"));
      return;
    }
    parsed.args = *args;
  }
  const auto handler = verbs_.find(parsed.verb);
  if (handler == verbs_.end()) {
    std::string known;
    for (const auto& [name, h] : verbs_) known += (known.empty() ? "" : ", ") + name;
    queue_reply(client, make_error(Errc::invalid_argument, "unknown verb " + crypto::quote_for_error(parsed.verb) +
                                                               "; known: " + known));
    return;
  }
  if (fds.size() > handler->second.max_fds) {
    queue_reply(client, make_error(Errc::invalid_argument,
                                   parsed.verb + ": " + std::to_string(fds.size()) +
                                       " file descriptor(s) sent with the request, closed unread; this verb takes " +
                                       (handler->second.max_fds == 0 ? std::string("none")
                                                                     : "at most " + std::to_string(handler->second.max_fds))));
    return;
  }
  parsed.fds = std::move(fds);
  log::debug("control: uid " + std::to_string(client.peer.uid) + " pid " + std::to_string(client.peer.pid) +
             ": " + parsed.verb + (parsed.fds.empty() ? "" : " with " + std::to_string(parsed.fds.size()) + " fd(s)"));
  // Copy the handler: a verb may unregister verbs (including itself) while it runs.
  const VerbHandler run = handler->second.handler;
  Result<nlohmann::json> outcome = nlohmann::json::object();
  try {
    outcome = run(parsed);
  } catch (const std::exception& e) {
    outcome = make_error(Errc::internal, parsed.verb + ": " + e.what());
  }
  queue_reply(client, outcome);
}

std::string ControlServer::reply_line(const Result<nlohmann::json>& outcome) {
  nlohmann::json reply;
  if (outcome) {
    reply = {{"ok", true}, {"result", outcome.value()}};
  } else {
    reply = {{"ok", false}, {"error", outcome.error().message}, {"code", to_string(outcome.error().code)}};
  }
  // Invalid UTF-8 in a message (a quoted client value) is replaced, never a reason to throw.
  return reply.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void ControlServer::queue_reply(Client& client, const Result<nlohmann::json>& outcome, bool connection_refused) {
  if (!outcome) {
    ++failed_;
    log_failure(client.peer, outcome.error(), connection_refused);
  }
  client.output += reply_line(outcome);
  client.output += '\n';
}

// Each failure reply once, with the client: a refused connection (permission, client limit) at warning, since it
// is someone the configuration does not let in or something holding every slot; a failed request at notice, since
// its client got the reason in the reply. A client can cause these in a loop: the log's rate limit per uid
// (log::write_limited) bounds them and counts the rest.
void ControlServer::log_failure(const ControlPeer& peer, const Error& error, bool connection_refused) {
  const std::string line = std::string("control: ") + (connection_refused ? "connection" : "request") + " of uid " +
                           std::to_string(peer.uid) + " pid " + std::to_string(peer.pid) + " refused (" +
                           std::string(to_string(error.code)) + "): " + error.message;
  log::write_limited(connection_refused ? log::Level::warning : log::Level::notice,
                     connection_refused ? "control connection" : "control request", "uid " + std::to_string(peer.uid),
                     line);
}

bool ControlServer::flush(std::uint64_t id) {
  auto it = clients_.find(id);
  if (it == clients_.end()) return false;
  Client& client = *it->second;
  while (!client.output.empty()) {
    const ssize_t n = ::send(client.fd.get(), client.output.data(), client.output.size(), MSG_NOSIGNAL);
    if (n > 0) {
      client.output.erase(0, static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      // Wait for room; stop reading meanwhile so a client that never reads cannot queue unbounded replies.
      (void)client.watch.set_events(EPOLLOUT);
      return true;
    }
    close_client(id);  // EPIPE and friends: the client went away
    return false;
  }
  if (client.close_after_flush) {
    ::shutdown(client.fd.get(), SHUT_WR);
    // Discard what the client already sent (the rest of an oversized line): closing with unread data makes the
    // kernel reset the connection, and the client could lose the reply that says why.
    char discard[4096];
    for (int rounds = 0; rounds < 256 && ::read(client.fd.get(), discard, sizeof discard) > 0; ++rounds) {
    }
    close_client(id);
    return false;
  }
  (void)client.watch.set_events(EPOLLIN);
  return true;
}

void ControlServer::close_client(std::uint64_t id) { clients_.erase(id); }

}  // namespace dauth::daemon

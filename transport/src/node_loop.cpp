// Node's loop: its libcoap contexts and their fds in one epoll, one round (process_ready), the housekeeping after
// it (handshake timeouts, requested closes, due requests, dead client sessions), timers, watches and post().
#include <coap3/coap.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <string>
#include <utility>

#include "dauth/transport/transport.hpp"
#include "node_impl.hpp"
#include "tls_backend.hpp"

namespace dauth::transport {

namespace {
// One round of a libcoap context without coap_io_process: that function walks all of the context's sessions
// before it reads (coap_io_prepare_epoll) and coap_io_do_epoll walks them all again after, so with thousands of
// live sessions each round costs two walks. coap_io_do_epoll alone reads what is ready, then prepares (sends due
// retransmissions, frees expired sessions, re-arms libcoap's timerfd): one walk per round, same work otherwise.
// (coap_io_process's other steps: the cache, unused here, and async responses, which the prepare also sends.)
// A context with nothing ready (no datagram, its timerfd not due) is not prepared at all unless `prepare` asks:
// libcoap arms its timerfd itself for what it schedules (retransmissions, notifications, async answers), so a quiet
// context has nothing to do; only what we did to it outside its rounds (a new client session's handshake timer,
// a session we disconnected) needs one prepare.
void run_libcoap(coap_context_t* context, bool prepare) {
  std::array<epoll_event, 16> events{};
  int count = 0;
  do {
    count = epoll_wait(coap_context_get_coap_fd(context), events.data(), static_cast<int>(events.size()), 0);
    if (count < 0) count = 0;  // EINTR: the fd stays readable if data is waiting
    if (count == 0 && !prepare) return;
    prepare = false;
    coap_io_do_epoll(context, events.data(), static_cast<size_t>(count));
  } while (count == static_cast<int>(events.size()));
}
}  // namespace

// ---- Node::Impl: contexts, loop ------------------------------------------------------------------------------

ContextPtr Node::Impl::new_context(ContextRole role, std::string& error) {
  ContextPtr context(coap_new_context(nullptr));
  if (!context) {
    error = "coap_new_context failed";
    return nullptr;
  }
  coap_set_app_data(context.get(), this);
  // Bodies over one datagram arrive by Block1/Block2 (RFC 7959), reassembled by libcoap, so that the 4 KiB limit
  // (PROTOCOL.md §2) is checked on the whole body.
  coap_context_set_block_mode(context.get(), COAP_BLOCK_USE_LIBCOAP | COAP_BLOCK_SINGLE_BODY);
  // Unregistered critical options get 4.02 Bad Option in requests and an RST for responses (PROTOCOL.md §6). libcoap
  // 4.3.1's known-option filter has only two slots for numbers above 255 (COAP_OPT_FILTER_LONG = 2; a third
  // registration is silently lost), so each context registers the two it receives: a server context gets requests
  // (FR 279, RQI 283), a client context gets responses (RQI 283, RSC 307).
  if (role == ContextRole::server) {
    coap_register_option(context.get(), kOptionOneM2mFrom);
    coap_register_option(context.get(), kOptionOneM2mRequestId);
  } else {
    coap_register_option(context.get(), kOptionOneM2mRequestId);
    coap_register_option(context.get(), kOptionOneM2mResponseStatus);
  }
  coap_register_event_handler(context.get(), on_event);
  coap_register_response_handler(context.get(), on_response);
  coap_register_nack_handler(context.get(), on_nack);
  // Explicit limits instead of libcoap's defaults (docs/transport.md §2).
  coap_context_set_session_timeout(context.get(), static_cast<unsigned>(config.limits.idle_timeout.count()));
  coap_context_set_max_idle_sessions(context.get(), static_cast<unsigned>(config.limits.max_sessions));
  coap_context_set_max_handshake_sessions(context.get(), static_cast<unsigned>(config.limits.max_handshakes));
  return context;
}

Result<void> Node::Impl::add_context_to_loop(coap_context_t* context) {
  const int fd = coap_context_get_coap_fd(context);
  if (fd < 0) return make_error(Errc::unsupported, "libcoap was built without epoll support");
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = fd;
  if (epoll_ctl(epoll.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    return make_error(Errc::io, std::string("epoll_ctl(ADD) of libcoap's fd failed: ") + std::strerror(errno));
  }
  return ok_result();
}

void Node::Impl::housekeeping() {
  // A completion handler may call close_client_sessions(), which lands here again: one pass at a time.
  if (in_housekeeping) return;
  in_housekeeping = true;
  struct Reset {
    bool& flag;
    ~Reset() { flag = false; }
  } reset{in_housekeeping};
  const auto now = Clock::now();
  restart_stalled_handshakes(now);
  // Handshakes: bounded by Limits::max_handshakes (server) and the client sessions being set up, whatever the
  // number of established sessions. A copy, since mark_established and the timeouts below change the set.
  std::vector<coap_session_t*> to_disconnect;
  const std::vector<coap_session_t*> unfinished(handshaking.begin(), handshaking.end());
  for (coap_session_t* raw : unfinished) {
    SessionImpl& state = *sessions.at(raw);
    if (state.established || state.dead || state.timed_out) {
      handshaking.erase(raw);
      continue;
    }
    if (coap_session_get_state(raw) == COAP_SESSION_STATE_ESTABLISHED) {
      mark_established(state);
      continue;
    }
    if (now - state.started > config.limits.handshake_timeout) {
      state.timed_out = true;
      handshaking.erase(raw);
      if (state.client) {
        // libcoap sends no alert for a wrong PSK: the client only ever sees silence (docs/transport.md §3).
        std::string reason = "DTLS handshake with " + state.remote + " did not complete within " +
                             std::to_string(config.limits.handshake_timeout.count()) + " ms";
        if (state.identity.kind == PeerKind::psk) {
          reason += " and the server sent no alert: most likely a wrong PSK for identity '" +
                    state.offered_identity + "' (libcoap answers a bad Finished with silence)";
        }
        state.refusal = reason;
        report_handshake_failure(state, FailureKind::handshake_timeout, reason);
        kill_client_session(state, make_error(Errc::timeout, reason));
      } else {
        to_disconnect.push_back(raw);
      }
    }
  }
  for (coap_session_t* raw : to_disconnect) {
    // Raises DTLS_CLOSED (reported in on_event); libcoap frees the session on its next sweep.
    coap_session_disconnected(raw, COAP_NACK_TLS_FAILED);
    server_sweep_wanted = true;
  }
  const auto closing = std::move(close_requests);
  close_requests.clear();
  for (coap_session_t* raw : closing) {
    auto found = sessions.find(raw);
    if (found == sessions.end()) continue;  // libcoap freed it meanwhile
    SessionImpl& state = *found->second;
    if (state.client || !state.close_requested) continue;
    state.close_requested = false;
    if (coap_session_get_state(raw) == COAP_SESSION_STATE_NONE) continue;
    // Sends close_notify (gnutls_bye / SSL_shutdown in coap_dtls_free_session) and sets the state to NONE; libcoap
    // frees the session at its next sweep (SERVER_SESSION_DEL). The response went out in coap_io_process already.
    coap_session_disconnected(raw, COAP_NACK_NOT_DELIVERABLE);
    server_sweep_wanted = true;
  }
  if (now >= next_deadline) end_due_requests(now);
  run_completions();
  // Release dead client sessions only now, outside libcoap's callbacks, and never while user callbacks of this
  // round still hold Session pointers (a handler may have called close_client_sessions()).
  if (running_completions) return;
  if (client_session_died) {
    client_session_died = false;
    for (auto it = client_cache.begin(); it != client_cache.end();) {
      auto found = sessions.find(it->second);
      if (found == sessions.end() || found->second->dead) {
        graveyard.push_back(it->second);
        it = client_cache.erase(it);
      } else {
        ++it;
      }
    }
  }
  while (!graveyard.empty()) {
    coap_session_t* raw = graveyard.back();
    graveyard.pop_back();
    fail_pending_of(raw, make_error(Errc::io, "client session closed"));
    run_completions();
    forget_session(raw);
    coap_session_set_app_data(raw, nullptr);
    release_client_session(raw);
    client_contexts_touched = true;
  }
  counters.live_client_sessions = client_cache.size();
}

void Node::Impl::end_due_requests(Clock::time_point now) {
  // Every deadline still ahead lowers next_deadline again (here, or in expect_by from the requests sent anew).
  next_deadline = Clock::time_point::max();
  for (auto it = observations.begin(); it != observations.end();) {
    auto observation = it->second;
    if (!observation->first_answer_deadline) {
      ++it;
    } else if (now <= *observation->first_answer_deadline) {
      expect_by(*observation->first_answer_deadline);
      ++it;
    } else {
      auto found = sessions.find(it->first.first);
      if (found != sessions.end()) {
        end_if_silent(*found->second, observation->packets_in_at_send, observation->records_at_send);
      }
      it = observations.erase(it);
      notify(observation,
             make_error(Errc::timeout, "no answer to the subscription within " +
                                           std::to_string(config.limits.request_timeout.count()) + " ms"),
             found != sessions.end() ? found->second.get() : nullptr, /*final=*/true);
    }
  }
  end_silent_sessions(now);
  for (auto it = pending.begin(); it != pending.end();) {
    if (now > it->second.deadline) {
      auto found = sessions.find(it->first.first);
      if (found != sessions.end()) {
        end_if_silent(*found->second, it->second.packets_in_at_send, it->second.records_at_send);
      }
      const SessionImpl* state = found != sessions.end() ? found->second.get() : nullptr;
      complete(std::move(it->second),
               make_error(Errc::timeout, "no response within " +
                                             std::to_string(config.limits.request_timeout.count()) + " ms"),
               state);
      it = pending.erase(it);
    } else {
      expect_by(it->second.deadline);
      ++it;
    }
  }
}

void Node::Impl::run_posted() {
  if (posted.empty()) return;
  eventfd_t signalled = 0;
  const int cleared = eventfd_read(post_signal.get(), &signalled);  // non-blocking: resets the counter to 0
  (void)cleared;  // EAGAIN only if already 0: nothing to clear
  auto batch = std::move(posted);
  posted.clear();
  for (auto& work : batch) work();
}

void Node::Impl::run_due_timers() {
  if (timers.empty()) return;
  const auto now = Clock::now();
  std::vector<std::function<void()>> due;
  while (!timers.empty() && timers.begin()->first <= now) {
    due.push_back(std::move(timers.begin()->second));
    timers.erase(timers.begin());
  }
  for (auto& work : due) work();
}

void Node::Impl::run_watches() {
  const std::uint64_t generation = watches_generation;
  for (auto it = watches.begin(); it != watches.end(); ++it) {
    it->second();
    if (watches_generation != generation) break;  // a handler added or removed a watch: the rest run next round
  }
}

void Node::Impl::run_completions() {
  if (running_completions) return;
  running_completions = true;
  while (!completions.empty()) {
    auto batch = std::move(completions);
    completions.clear();
    for (auto& call : batch) call();
  }
  running_completions = false;
}

// ---- Node: the loop ------------------------------------------------------------------------------------------

void Node::post_after(std::chrono::milliseconds delay, std::function<void()> work) {
  if (!work) return;
  impl_->timers.emplace(Clock::now() + delay, std::move(work));
}

void Node::post(std::function<void()> work) {
  if (!work) return;
  impl_->posted.push_back(std::move(work));
  const int signalled = eventfd_write(impl_->post_signal.get(), 1);  // cannot block: far from counter overflow
  (void)signalled;
}

Result<void> Node::add_watch(int fd, std::function<void()> each_round) {
  if (fd < 0 || !each_round) return make_error(Errc::invalid_argument, "add_watch: needs a descriptor and a handler");
  if (impl_->watches.count(fd) != 0) {
    return make_error(Errc::exists, "add_watch: descriptor " + std::to_string(fd) + " is watched already");
  }
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.fd = fd;
  if (epoll_ctl(impl_->epoll.get(), EPOLL_CTL_ADD, fd, &event) != 0) {
    return make_error(Errc::io, std::string("epoll_ctl(ADD) of a watched descriptor: ") + std::strerror(errno));
  }
  impl_->watches.emplace(fd, std::move(each_round));
  ++impl_->watches_generation;
  return ok_result();
}

void Node::remove_watch(int fd) {
  if (impl_->watches.erase(fd) == 0) return;
  ++impl_->watches_generation;
  (void)epoll_ctl(impl_->epoll.get(), EPOLL_CTL_DEL, fd, nullptr);
}

int Node::fd() const noexcept { return impl_->epoll.get(); }

void Node::process_ready() {
  auto run = [this](coap_context_t* context, bool prepare) {
    if (context == nullptr) return;
    impl_->in_libcoap = true;
    run_libcoap(context, prepare);
    impl_->in_libcoap = false;
  };
  // libcoap 4.3.1 walks every session of a context each time it prepares one (coap_io_prepare_io), so a quiet
  // server context is not run at all: that walk is the cost that grows with live sessions (docs/transport.md §8).
  run(impl_->server_context.get(), std::exchange(impl_->server_sweep_wanted, false));
  // Between the first ClientHello (libcoap made the TLS object and answered HelloVerifyRequest) and the one with
  // the cookie, which a later round reads: the moment to hook certificate selection (docs/transport.md §3).
  impl_->select_certificates_by_name();
  const bool clients_touched = std::exchange(impl_->client_contexts_touched, false);
  run(impl_->client_context.get(), clients_touched);
  for (auto& [key, entry] : impl_->client_pki_contexts) run(entry->context.get(), clients_touched);
  // libcoap and GnuTLS copied the key the PSK callback returned; do not keep ours beyond this round.
  impl_->psk_in_flight = SecretBuffer();
  impl_->run_completions();
  impl_->run_watches();
  impl_->run_posted();
  impl_->run_due_timers();
  impl_->housekeeping();
}

std::chrono::milliseconds Node::next_timeout() {
  // libcoap arms a timerfd inside its own epoll fd (coap_update_epoll_timer), so its retransmissions and session
  // expiry wake fd() by themselves. We add our own deadlines: request timeouts and handshake timeouts. With none
  // pending we still look once a second, a cheap bound in case a libcoap timer is not armed.
  const auto now = Clock::now();
  auto next = std::min(now + std::chrono::seconds(1), impl_->next_deadline);
  if (!impl_->timers.empty()) next = std::min(next, impl_->timers.begin()->first);
  for (coap_session_t* raw : impl_->handshaking) {
    const auto& state = impl_->sessions.at(raw);
    if (!state->established && !state->timed_out) {
      next = std::min(next, state->started + impl_->config.limits.handshake_timeout);
    }
  }
  if (!impl_->completions.empty() || !impl_->posted.empty() || impl_->server_sweep_wanted ||
      impl_->client_contexts_touched || next <= now) {
    return std::chrono::milliseconds(0);
  }
  // +1 ms: epoll_wait rounds down, and waking just before a deadline would spin once more.
  return std::chrono::duration_cast<std::chrono::milliseconds>(next - now) + std::chrono::milliseconds(1);
}

bool Node::run_until(const std::function<bool()>& done, std::chrono::milliseconds max) {
  const auto end = Clock::now() + max;
  while (!done()) {
    const auto now = Clock::now();
    if (now >= end) break;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - now);
    epoll_event event{};
    const int wait = static_cast<int>(std::min(left, next_timeout()).count());
    (void)epoll_wait(fd(), &event, 1, wait);
    process_ready();
  }
  return done();
}

}  // namespace dauth::transport

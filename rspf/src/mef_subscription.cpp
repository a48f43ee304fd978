// A kept-alive observation of one MEF resource (mef_subscription.hpp).
#include "dauth/rspf/mef_subscription.hpp"

#include <utility>

namespace dauth::rspf {

struct MefSubscription::State : std::enable_shared_from_this<MefSubscription::State> {
  transport::Node& node;
  std::string what;
  MefContact contact;
  transport::Request request;
  JitterSource jitter;
  std::chrono::milliseconds refresh = kSubscriptionRefresh;
  Backoff backoff;
  LogSink log;
  OnNotification on_notification;
  transport::Observation observation;
  bool live = false;
  bool scheduled = false;        // a subscribe() is waiting in the Node's timers (retry or refresh)
  std::uint64_t generation = 0;  // a scheduled subscribe() from an older generation does nothing (retry_now)

  State(transport::Node& n, std::string w, MefContact c, transport::Request r, JitterSource jitter_source, LogSink l,
        OnNotification on)
      : node(n),
        what(std::move(w)),
        contact(std::move(c)),
        request(std::move(r)),
        jitter(std::move(jitter_source)),
        backoff(jitter),
        log(std::move(l)),
        on_notification(std::move(on)) {}

  void schedule(std::chrono::milliseconds delay) {
    if (scheduled) return;
    scheduled = true;
    const std::uint64_t mine = ++generation;
    std::weak_ptr<State> weak = weak_from_this();
    node.post_after(delay, [weak, mine] {
      auto self = weak.lock();
      if (self && self->generation == mine) self->subscribe();
    });
  }

  void lost(const std::string& reason) {
    live = false;
    const auto delay = backoff.next();
    log(LogKind::failed, what, what + " lost: " + reason + "; subscribing again in " + std::to_string(delay.count()) + " ms");
    schedule(delay);
  }

  void subscribe() {
    scheduled = false;
    auto credentials = contact.credentials
                           ? contact.credentials()
                           : Result<transport::ClientCredentials>(make_error(Errc::not_found, "no credentials"));
    if (!credentials.ok()) return lost("cannot authenticate: " + credentials.error().message);
    log(LogKind::progress, what, what + " subscribing as " + credentials->psk_identity);
    observation.cancel();
    live = false;
    std::weak_ptr<State> weak = weak_from_this();
    observation = node.observe(contact.address, *credentials, request,
                               [weak](Result<transport::Response> notification, const transport::Session*) {
                                 if (auto self = weak.lock()) self->on_answer(std::move(notification));
                               });
  }

  void on_answer(Result<transport::Response> notification) {
    if (!notification.ok()) {
      if (notification.error().code == Errc::unauthenticated && contact.refused) contact.refused();
      return lost(notification.error().to_string());
    }
    if (notification->code != 205) return lost(error_from_response(what, *notification).to_string());
    on_notification(*notification);
    if (!notification->observe) return lost("the MEF answered without Observe");
    const bool first = !live;
    live = true;
    backoff.reset();
    // An MEF that crashed sends no close_notify and no more notifications: the subscription would look live for
    // ever. Subscribing again now and then asks it (a silent MEF fails the new subscription, which ends the dead
    // session in transport and starts over with backoff), and bounds how late a revocation can arrive.
    if (first) schedule_refresh();
  }

  // A newer schedule() or start() makes this one stale (generation), as does losing the subscription meanwhile.
  void schedule_refresh() {
    const std::uint64_t mine = ++generation;
    std::weak_ptr<State> weak = weak_from_this();
    node.post_after(with_jitter(refresh, jitter), [weak, mine] {
      auto self = weak.lock();
      if (self && self->generation == mine && self->live) {
        self->log(LogKind::progress, self->what, self->what + " refreshing the subscription");
        self->subscribe();
      }
    });
  }
};

MefSubscription::MefSubscription(transport::Node& node, std::string what, MefContact contact,
                                 transport::Request request, JitterSource jitter, LogSink log,
                                 OnNotification on_notification)
    : state_(std::make_shared<State>(node, std::move(what), std::move(contact), std::move(request),
                                     jitter ? std::move(jitter) : random_jitter(),
                                     log ? std::move(log) : stderr_log_sink(), std::move(on_notification))) {
  state_->request.method = transport::Method::get;
}

MefSubscription::~MefSubscription() { state_->observation.cancel(); }

void MefSubscription::start(std::chrono::milliseconds delay) {
  state_->observation.cancel();
  state_->live = false;
  state_->schedule(delay);
}

void MefSubscription::retry_now() {
  if (state_->live || !state_->scheduled) return;
  state_->scheduled = false;  // the pending timer is now stale (older generation)
  state_->schedule(std::chrono::milliseconds(0));
}

bool MefSubscription::live() const { return state_->live; }

void MefSubscription::set_refresh_interval(std::chrono::milliseconds interval) { state_->refresh = interval; }

}  // namespace dauth::rspf

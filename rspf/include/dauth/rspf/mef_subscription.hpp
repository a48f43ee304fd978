// A kept-alive observation (RFC 7641) of one resource at an MEF, shared by TargetKeys (the /fetchCredentials feed)
// and RevocationWatch (/mef/revoked): subscribes with the contact's credentials, hands every 2.05 notification to
// its owner, and subscribes again with Backoff (1 s doubling to 5 min, ± 10 %, schedule.hpp) through
// Node::post_after whenever the subscription is lost (session closed, MEF gone, refusal, no Observe in the answer,
// credentials not ready yet); a notification resets the backoff. A live subscription is renewed every
// kSubscriptionRefresh (60 s ± 10 %, schedule.hpp): an MEF that crashed sends neither close_notify nor notifications,
// and only a new subscription finds out (transport ends a session whose peer stays silent past request_timeout).
//
// Loop thread only. The Node must outlive the MefSubscription; destroying it cancels the observation and drops its
// pending retry (callbacks hold a weak reference).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "dauth/error.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/rspf/schedule.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::rspf {

// How to reach one MEF and authenticate to it (e.g. from Enrolee::mef_credentials()).
struct MefContact {
  transport::Peer address;
  std::function<Result<transport::ClientCredentials>()> credentials;
  // Optional: called when the MEF refuses those credentials in the handshake (e.g. a KeID it revoked), so that
  // their owner can find out and enrol again (Enrolee::confirm_enrolment); the subscription retries as usual.
  std::function<void()> refused = nullptr;
};

class MefSubscription {
 public:
  // Called for every 2.05 answer (first answer and notifications), before the live state is updated.
  using OnNotification = std::function<void(const transport::Response& notification)>;

  // `what` names the subscription in log lines ("target CAE-valve feed mef=mef.example.net"). request is sent as
  // GET with Observe 0 at each (re)subscription. Nothing is sent before start().
  MefSubscription(transport::Node& node, std::string what, MefContact contact, transport::Request request,
                  JitterSource jitter, LogSink log, OnNotification on_notification);
  ~MefSubscription();
  MefSubscription(const MefSubscription&) = delete;
  MefSubscription& operator=(const MefSubscription&) = delete;

  // Subscribes after `delay` (0: in the next process_ready()); ignored while a (re)subscription is already
  // scheduled. A live subscription is cancelled first.
  void start(std::chrono::milliseconds delay = std::chrono::milliseconds(0));
  // A subscription waiting for its backoff delay is attempted in the next round instead (e.g. credentials that
  // were missing have just become available). Does nothing while live.
  void retry_now();
  bool live() const;  // a notification arrived on the current subscription
  // How often a live subscription is renewed (default kSubscriptionRefresh), ± 10 %.
  void set_refresh_interval(std::chrono::milliseconds interval);

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace dauth::rspf

// What the three network roles (Mef, Enrolee, TargetKeys) share: the clock they read, where their log lines go,
// the PSK-lookup slot that breaks the Node <-> role construction cycle, and the CoAP answers they build.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "dauth/error.hpp"
#include "dauth/rspf/messages.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::rspf {

// Unix seconds. Injected so that tests can move time (expiry) without sleeping.
using UnixClock = std::function<std::int64_t()>;
UnixClock system_unix_clock();

// What kind of event a role logs. The role says what happened; the daemon alone decides the syslog priority of
// each kind and rate-limits lines of one kind and subject (dauthd(8), LOGGING).
enum class LogKind : std::uint8_t {
  progress,  // routine: state transitions, keys stored, subscriptions (re)made
  audit,     // a decision of the MEF kept for accountability: enrolled, issued, revoked
  refused,   // this role refused a peer's request or credential (a misconfigured peer, or an attack)
  failed,    // something this role needs failed: an enrolment, a key retrieval, a subscription
  revoked,   // a credential was found revoked (ours or a peer's)
  expiring,  // a credential of ours is near its expiry and its renewal failed
};
std::string_view to_string(LogKind kind) noexcept;

// One line per event, never key material (docs/conventions.md §9): KeIDs, PSK identities and fingerprints only.
// subject names what the event is about (an AE-ID, KeID or peer address), so that a flood about one subject cannot
// hide the lines about others. The default writes "rspf: <line>" to stderr; the daemon routes it to its logger.
using LogSink = std::function<void(LogKind kind, const std::string& subject, const std::string& line)>;
LogSink stderr_log_sink();

// Node::create() takes the PSK lookup, but the role that answers it (Mef, TargetKeys) needs the Node: the Node is
// created with slot.lookup(), the role is bound afterwards with slot.bind(). Until then (or after unbind())
// every identity is refused with Errc::not_found. Copies of lookup() share the slot.
class PskLookupSlot {
 public:
  PskLookupSlot();
  transport::PskLookup lookup() const;
  void bind(transport::PskLookup target);
  void unbind();

 private:
  std::shared_ptr<transport::PskLookup> target_;
};

// The CoAP answer for a refusal: code and oneM2M-RSC from coap_code_for(), body ErrorBody{word, message}.
transport::Response refusal_response(const Error& error, ContentFormat format = ContentFormat::cbor);
// The same with an explicit CoAP code (4.06, 4.15 ...), for refusals that no Errc maps to.
transport::Response refusal_response(int code, const Error& error, ContentFormat format = ContentFormat::cbor);

// Reads an ErrorBody answer for an error message: "MEF answered 4.03: denied: <detail>".
Error error_from_response(std::string_view what, const transport::Response& response);

// "4.03" from 403.
std::string coap_code_text(int code);

}  // namespace dauth::rspf

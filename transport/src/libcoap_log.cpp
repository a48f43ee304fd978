// libcoap's own log lines: captured through its log handler, never printed, so that a failure report can quote the
// backend's reason; DAUTH_TRANSPORT_DEBUG echoes them (PDUs without payload). And libcoap's one-time start-up.
#include <coap3/coap.h>

#include <cstdlib>
#include <deque>
#include <iostream>
#include <optional>
#include <string>
#include <string_view>

#include "node_impl.hpp"

namespace dauth::transport::detail {

// ---- libcoap's own log lines: kept (never printed) so that a failure report can quote the backend's reason ----

std::deque<std::string>& libcoap_warnings() {
  static std::deque<std::string> lines;
  return lines;
}

namespace {

// DAUTH_TRANSPORT_DEBUG=1 echoes libcoap's debug log to stderr (never on in production: it prints addresses and
// identities). Never keys: libcoap logs every PDU with its payload (coap_show_pdu), and payloads carry keys (a
// usage-constrained key, an enrolment answer), so its PDU lines are echoed without their payload.
bool libcoap_debug_enabled() {
  static const bool enabled = std::getenv("DAUTH_TRANSPORT_DEBUG") != nullptr;
  return enabled;
}

// A line of coap_show_pdu: "v:1 t:CON c:GET i:… {token} [ options ] :: payload", then for binary payloads a hex
// and a character dump, each "<<…>>". Returns what may be shown of it: the header and options, never the payload.
std::optional<std::string> pdu_line_without_payload(std::string_view line) {
  if (line.rfind("<<", 0) == 0) return std::string();  // a dump of the payload: nothing of it
  if (line.rfind("v:", 0) != 0) return std::nullopt;   // not a PDU line
  const auto payload = line.find(" :: ");
  if (payload == std::string_view::npos) return std::string(line);
  return std::string(line.substr(0, payload)) + " :: (payload not shown)\n";
}

void capture_libcoap_log(coap_log_t level, const char* message) {
  if (message != nullptr && libcoap_debug_enabled()) {
    const auto pdu = pdu_line_without_payload(message);
    if (!pdu) {
      std::cerr << "libcoap: " << message;
    } else if (!pdu->empty()) {
      std::cerr << "libcoap: " << *pdu;
    }
  }
  if (level > LOG_WARNING || message == nullptr) return;
  std::string line(message);
  while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
  const auto start = line.find_first_not_of(" *");
  line.erase(0, start == std::string::npos ? line.size() : start);
  auto& lines = libcoap_warnings();
  lines.push_back(std::move(line));
  if (lines.size() > 64) lines.pop_front();
}

}  // namespace

// The newest backend warning that names this peer address, if any.
std::string libcoap_reason_for(const std::string& remote) {
  const auto& lines = libcoap_warnings();
  for (auto it = lines.rbegin(); it != lines.rend(); ++it) {
    if (it->find(remote) != std::string::npos) return *it;
  }
  return {};
}

void start_libcoap_once() {
  static const bool started = [] {
    coap_startup();
    coap_set_log_handler(capture_libcoap_log);
    // PDU lines through the handler above, not straight to stderr (libcoap's default): it keeps their payloads out.
    coap_set_show_pdu_output(0);
    coap_set_log_level(libcoap_debug_enabled() ? LOG_DEBUG : LOG_WARNING);
    coap_dtls_set_log_level(LOG_WARNING);
    return true;
  }();
  (void)started;
}

}  // namespace dauth::transport::detail

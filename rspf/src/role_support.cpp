#include "dauth/rspf/role_support.hpp"

#include <chrono>
#include <iostream>

#include "dauth/rspf/mef_policy.hpp"

namespace dauth::rspf {

UnixClock system_unix_clock() {
  return [] {
    return static_cast<std::int64_t>(
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
            .count());
  };
}

// A switch without default: -Wswitch (an error here) names any kind left without a name.
std::string_view to_string(LogKind kind) noexcept {
  switch (kind) {
    case LogKind::progress: return "progress";
    case LogKind::audit: return "audit";
    case LogKind::refused: return "refused";
    case LogKind::failed: return "failed";
    case LogKind::revoked: return "revoked";
    case LogKind::expiring: return "expiring";
  }
  return "?";
}

LogSink stderr_log_sink() {
  return [](LogKind, const std::string&, const std::string& line) { std::cerr << "rspf: " << line << '\n'; };
}

PskLookupSlot::PskLookupSlot() : target_(std::make_shared<transport::PskLookup>()) {}

transport::PskLookup PskLookupSlot::lookup() const {
  std::shared_ptr<transport::PskLookup> target = target_;
  return [target](const transport::PskRequest& request) -> Result<transport::PskGrant> {
    if (!*target) {
      return make_error(Errc::not_found, "PSK identity '" + std::string(request.identity) +
                                             "': no role answers PSK lookups on this node yet");
    }
    return (*target)(request);
  };
}

void PskLookupSlot::bind(transport::PskLookup target) { *target_ = std::move(target); }
void PskLookupSlot::unbind() { *target_ = nullptr; }

transport::Response refusal_response(int code, const Error& error, ContentFormat format) {
  transport::Response response;
  response.code = code;
  response.content_format = static_cast<std::uint16_t>(format);
  response.payload = encode(ErrorBody{std::string(to_string(error.code)), error.message}, format);
  return response;
}

transport::Response refusal_response(const Error& error, ContentFormat format) {
  const CoapRefusal refusal = coap_code_for(error.code);
  transport::Response response = refusal_response(static_cast<int>(refusal.code), error, format);
  if (refusal.onem2m_rsc != 0) response.response_status = refusal.onem2m_rsc;
  return response;
}

std::string coap_code_text(int code) {
  std::string detail = std::to_string(code % 100);
  if (detail.size() < 2) detail.insert(0, "0");
  return std::to_string(code / 100) + "." + detail;
}

namespace {

// A peer's words, fit for a log line and a terminal: control characters (C0, DEL and UTF-8-encoded C1, which can
// drive a terminal) become '?', and at most kMaxShown bytes are kept. The peer chooses this text.
std::string printable_detail(const std::string& text) {
  constexpr std::size_t kMaxShown = 200;
  std::string out;
  std::size_t i = 0;
  for (; i < text.size() && out.size() < kMaxShown; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    const bool c1 = c == 0xc2 && i + 1 < text.size() && static_cast<unsigned char>(text[i + 1]) >= 0x80 &&
                    static_cast<unsigned char>(text[i + 1]) <= 0x9f;
    if (c1) ++i;
    out.push_back(c < 0x20 || c == 0x7f || c1 ? '?' : static_cast<char>(c));
  }
  if (i < text.size()) out += "...";
  return out;
}

}  // namespace

Error error_from_response(std::string_view what, const transport::Response& response) {
  std::string message = std::string(what) + " answered " + coap_code_text(response.code);
  Errc code = response.code == 404 ? Errc::not_found : response.code >= 500 ? Errc::internal : Errc::denied;
  auto format = content_format_from(response.content_format.value_or(static_cast<std::uint16_t>(ContentFormat::cbor)));
  if (format.ok()) {
    auto body = decode_error_body(ByteView(response.payload), *format);
    if (body.ok()) message += ": " + printable_detail(body->error) + ": " + printable_detail(body->detail);
  }
  return make_error(code, message);
}

}  // namespace dauth::rspf

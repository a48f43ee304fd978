// libFuzzer target: every ESPrim reader (rspf/esprim.hpp) on arbitrary text: Receiver::inspect, the m2m:seci body,
// the inner primitives, rand objects and plain refusal bodies. Hostile input must give a refusal or an Error, never
// a crash, hang or out-of-bounds read; what parses must write back to text that parses to the same thing.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <variant>

#include "dauth/rspf/esprim.hpp"

namespace esprim = dauth::rspf::esprim;

namespace {

void check_inspected(const esprim::Checked<esprim::Inspected>& checked) {
  if (const auto* inspected = std::get_if<esprim::Inspected>(&checked)) {
    const esprim::ReceivedHeader& header = inspected->header;
    if (header.seq > esprim::kMaxSeq || header.kid.empty() || header.ori.empty() || header.rri.empty()) {
      __builtin_trap();
    }
    if (header.originator_rand && header.originator_rand->id != header.ori) __builtin_trap();
    if (!inspected->object) __builtin_trap();
  } else if (std::get<esprim::Refusal>(checked).rsc != esprim::Rsc::unsupported_option) {
    __builtin_trap();  // without a key, malformed is the only thing inspect can say
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  static esprim::Receiver receiver;

  check_inspected(receiver.inspect(text));

  auto info = esprim::parse_security_info(text);
  if (info.ok()) {
    auto again = esprim::parse_security_info(esprim::to_json_text(*info));
    if (!again.ok() || esprim::to_json_text(*again) != esprim::to_json_text(*info)) __builtin_trap();
    if (info->type == 5) check_inspected(receiver.inspect(info->object));
  }

  auto rand = esprim::parse_rand_object(text);
  if (rand.ok()) {
    const std::string canonical = esprim::canonical_text(*rand);
    auto again = esprim::parse_rand_object(canonical);
    if (!again.ok() || esprim::canonical_text(*again) != canonical) __builtin_trap();
  }

  auto request = esprim::parse_inner_request(text);
  if (request.ok()) {
    const std::string written = esprim::to_json_text(*request);
    auto again = esprim::parse_inner_request(written);
    if (!again.ok() || esprim::to_json_text(*again) != written || again->content != request->content) {
      __builtin_trap();
    }
  }

  auto response = esprim::parse_inner_response(text);
  if (response.ok()) {
    const std::string written = esprim::to_json_text(*response);
    auto again = esprim::parse_inner_response(written);
    if (!again.ok() || esprim::to_json_text(*again) != written || again->content != response->content) {
      __builtin_trap();
    }
  }

  auto refusal = esprim::parse_refusal_body(text);
  if (refusal) {
    auto again = esprim::parse_refusal_body(esprim::refusal_body(*refusal));
    if (!again || again->rsc != refusal->rsc || again->reason != refusal->reason) __builtin_trap();
  }
  return 0;
}

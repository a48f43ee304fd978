// libFuzzer target: every RSPF message decoder (rspf/messages.hpp) on arbitrary bytes, in both encodings. The
// decoders must refuse bad input with an Error, never crash, hang or read out of bounds.
#include <cstddef>
#include <cstdint>

#include "dauth/rspf/messages.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using dauth::rspf::ContentFormat;
  const dauth::ByteView payload(data, size);
  for (auto format : {ContentFormat::cbor, ContentFormat::json}) {
    (void)dauth::rspf::decode_enrolment_request(payload, format);
    (void)dauth::rspf::decode_enrolment_response(payload, format);
    (void)dauth::rspf::decode_error_body(payload, format);
    (void)dauth::rspf::decode_credential_feed(payload, format);
  }
  auto credentials = dauth::rspf::decode_fetch_credentials_response(payload);
  if (credentials.ok()) {
    // What decodes must re-encode to something that decodes to the same values.
    const auto again = dauth::rspf::decode_fetch_credentials_response(dauth::rspf::encode(*credentials).view());
    if (!again.ok() || !again->credential.equals(credentials->credential) ||
        again->enrolee_id != credentials->enrolee_id || again->lifetime_s != credentials->lifetime_s) {
      __builtin_trap();
    }
  }
  return 0;
}

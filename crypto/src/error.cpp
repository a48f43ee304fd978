#include "dauth/error.hpp"

#include <array>

namespace dauth {

namespace {
constexpr std::array<std::string_view, kErrcCount> kErrcNames = {
    "invalid_argument", "parse",  "crypto",      "io",    "corrupt", "permission", "not_found", "exists",
    "expired",          "unauthenticated", "denied", "unsupported", "limit", "timeout", "internal",
};
static_assert(kErrcNames.size() == static_cast<std::size_t>(Errc::internal) + 1, "one name per Errc");
}  // namespace

std::string_view to_string(Errc code) noexcept {
  const auto index = static_cast<std::size_t>(code);
  return index < kErrcNames.size() ? kErrcNames[index] : std::string_view("unknown");
}

std::string Error::to_string() const {
  std::string text(dauth::to_string(code));
  text += ": ";
  text += message;
  return text;
}

}  // namespace dauth

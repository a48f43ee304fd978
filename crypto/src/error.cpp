#include "dauth/error.hpp"

namespace dauth {

namespace {
// kErrcCount is the number of codes: every code below it has a name (-Wswitch makes every enumerator a case),
// and the value kErrcCount has none, so a code added at the end without raising the count fails here.
constexpr bool every_code_named() {
  for (std::size_t i = 0; i < kErrcCount; ++i) {
    if (to_string(static_cast<Errc>(i)) == "unknown") return false;
  }
  return to_string(static_cast<Errc>(kErrcCount)) == "unknown";
}
static_assert(every_code_named(), "kErrcCount must be the number of Errc codes");
}  // namespace

std::string Error::to_string() const {
  std::string text(dauth::to_string(code));
  text += ": ";
  text += message;
  return text;
}

}  // namespace dauth

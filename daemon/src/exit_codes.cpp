#include "dauth/daemon/exit_codes.hpp"

namespace dauth::daemon {

std::string_view to_string(ExitCode code) noexcept {
  switch (code) {
    case ExitCode::ok: return "ok";
    case ExitCode::failed: return "operation failed";
    case ExitCode::usage: return "usage or configuration error";
    case ExitCode::unreachable: return "daemon unreachable";
    case ExitCode::refused: return "authentication or permission refused";
  }
  return "unknown exit code";
}

ExitCode exit_code_for(Errc code) noexcept {
  switch (code) {
    case Errc::permission:
    case Errc::unauthenticated:
    case Errc::denied: return ExitCode::refused;
    case Errc::invalid_argument:
    case Errc::parse: return ExitCode::usage;
    default: return ExitCode::failed;
  }
}

}  // namespace dauth::daemon

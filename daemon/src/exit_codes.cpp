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

// No default: -Wswitch (an error here) makes a new Errc choose its exit code.
ExitCode exit_code_for(Errc code, ErrorStage stage) noexcept {
  const bool start_up = stage == ErrorStage::start_up;
  switch (code) {
    // Syntax and range: always the caller's to fix.
    case Errc::invalid_argument:
    case Errc::parse: return ExitCode::usage;
    // Refusals: at start-up a file mode, owner or credential the operator must fix.
    case Errc::permission:
    case Errc::unauthenticated:
    case Errc::denied: return start_up ? ExitCode::usage : ExitCode::refused;
    // A missing, corrupt, expired or unusable credential: at start-up the operator's to fix; in an operation,
    // that operation failed.
    case Errc::crypto:
    case Errc::corrupt:
    case Errc::not_found:
    case Errc::expired:
    case Errc::unsupported:
    case Errc::timeout: return start_up ? ExitCode::usage : ExitCode::failed;
    // The system or dauth itself: a run-time failure either way.
    case Errc::io:
    case Errc::exists:
    case Errc::limit:
    case Errc::internal: return ExitCode::failed;
  }
  return ExitCode::failed;
}

}  // namespace dauth::daemon

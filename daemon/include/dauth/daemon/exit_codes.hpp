// Process exit codes shared by dauthd and dauthctl (docs/conventions.md §4); documented in dauthd(8) and dauthctl(1).
// The values are a contract for scripts: never renumber.
#pragma once

#include <string_view>

#include "dauth/error.hpp"

namespace dauth::daemon {

enum class ExitCode : int {
  ok = 0,           // success
  failed = 1,       // the operation failed (the daemon said why)
  usage = 2,        // bad command line or configuration
  unreachable = 3,  // the daemon's control socket could not be reached
  refused = 4,      // authentication or permission refused
};

std::string_view to_string(ExitCode code) noexcept;
inline int as_int(ExitCode code) noexcept { return static_cast<int>(code); }

// The exit code a CLI uses for an error the daemon reported with this Errc word.
ExitCode exit_code_for(Errc code) noexcept;

}  // namespace dauth::daemon

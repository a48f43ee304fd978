// The one Errc -> exit code map (daemon/include/dauth/daemon/exit_codes.hpp) for dauthd's start-up and dauthctl's
// replies, against the codes dauthd(8) and dauthctl(1) document: 0 ok, 1 failed, 2 usage or configuration,
// 3 unreachable, 4 refused.
#include <catch2/catch.hpp>

#include "dauth/daemon/exit_codes.hpp"

using dauth::Errc;
using dauth::daemon::ErrorStage;
using dauth::daemon::exit_code_for;
using dauth::daemon::ExitCode;

TEST_CASE("every Errc has one exit code at start-up and one in an operation", "[exit]") {
  struct Row {
    Errc code;
    ExitCode start_up;
    ExitCode operation;
  };
  const Row rows[] = {
      {Errc::invalid_argument, ExitCode::usage, ExitCode::usage},
      {Errc::parse, ExitCode::usage, ExitCode::usage},
      {Errc::crypto, ExitCode::usage, ExitCode::failed},
      {Errc::io, ExitCode::failed, ExitCode::failed},
      {Errc::corrupt, ExitCode::usage, ExitCode::failed},
      {Errc::permission, ExitCode::usage, ExitCode::refused},
      {Errc::not_found, ExitCode::usage, ExitCode::failed},
      {Errc::exists, ExitCode::failed, ExitCode::failed},
      {Errc::expired, ExitCode::usage, ExitCode::failed},
      {Errc::unauthenticated, ExitCode::usage, ExitCode::refused},
      {Errc::denied, ExitCode::usage, ExitCode::refused},
      {Errc::unsupported, ExitCode::usage, ExitCode::failed},
      {Errc::limit, ExitCode::failed, ExitCode::failed},
      {Errc::timeout, ExitCode::usage, ExitCode::failed},
      {Errc::internal, ExitCode::failed, ExitCode::failed},
  };
  REQUIRE(std::size(rows) == dauth::kErrcCount);
  for (const Row& row : rows) {
    INFO(dauth::to_string(row.code));
    CHECK(exit_code_for(row.code, ErrorStage::start_up) == row.start_up);
    CHECK(exit_code_for(row.code, ErrorStage::operation) == row.operation);
  }
}

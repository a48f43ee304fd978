// Catch2 main for every suite. SIGPIPE is ignored so that a child process that exits before reading its stdin
// (run_command) makes write() fail with EPIPE instead of killing the test executable without a report.
#define CATCH_CONFIG_RUNNER
#include <csignal>

#include <catch2/catch.hpp>

int main(int argc, char* argv[]) {
  std::signal(SIGPIPE, SIG_IGN);
  return Catch::Session().run(argc, argv);
}

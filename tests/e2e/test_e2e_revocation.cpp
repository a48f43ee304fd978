// End to end: a certificate revoked at the MEF (dauthctl revoke <serial>) is refused by the peer gateway in new
// handshakes and its live X.509 peer session ends (PROTOCOL.md §5; rspf/revocation_watch.hpp).
#include <signal.h>

#include <catch2/catch.hpp>
#include <regex>
#include <thread>

#include "e2e_support.hpp"

using namespace dauth::test;

namespace {

// The serial the MEF's audit line gave the AE-ID certificate issued to ae_id over EST (the newest one).
std::string issued_serial(const Deployment& d, const std::string& ae_id) {
  const std::string log = d.run_log("mef");
  const std::regex audit("issued certificate serial ([0-9A-F]+) to " + ae_id + " ");
  std::string serial;
  for (auto it = std::sregex_iterator(log.begin(), log.end(), audit); it != std::sregex_iterator(); ++it) {
    serial = (*it)[1];
  }
  return serial;
}

}  // namespace

TEST_CASE("certificate revocation: the peer refuses a revoked AE-ID certificate and ends its live session",
          "[e2e]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  Deployment d;
  start_with_certificate_peer_sessions(d);
  auto lists_applied = [&](const std::string& node) {
    return d.ctl_json(node, {"stats"}).value("revocation_lists_applied_total", 0);
  };
  for (int i = 0; i < 100 && (lists_applied("a") == 0 || lists_applied("b") == 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  REQUIRE(lists_applied("b") > 0);

  const auto marker = run_command({"openssl", "rand", "-hex", "8"}).output.substr(0, 16);
  REQUIRE(d.direct("put", "example_data", marker).exit_code == 0);
  const auto before = d.proxied("CAE-meter", "get", "example_data");
  INFO(before.output);
  REQUIRE(before.output.find(marker) != std::string::npos);
  REQUIRE(d.ctl_json("b", {"stats"}).value("peer_server_sessions", 0) >= 1);

  const std::string serial = issued_serial(d, "CAE-meter");
  INFO("meter's certificate serial: " << serial);
  REQUIRE_FALSE(serial.empty());
  const auto applied = lists_applied("b");
  const auto revoked = d.ctl("mef", {"revoke", serial});
  INFO(revoked.output);
  REQUIRE(revoked.exit_code == 0);
  for (int i = 0; i < 100 && lists_applied("b") == applied; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(d.ctl_json("b", {"stats"}).value("revoked_certificates", 0) == 1);
  // The live session ended (B closed it), and a new handshake with the revoked certificate is refused.
  bool closed = false;
  for (int i = 0; i < 100 && !closed; ++i) {
    closed = d.ctl_json("b", {"stats"}).value("peer_server_sessions", 1) == 0;
    if (!closed) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  CHECK(closed);
  const auto after = d.proxied("CAE-meter", "get", "example_data");
  INFO(after.output);
  CHECK(after.output.find(marker) == std::string::npos);
  CHECK(d.wait_for_log("b", "is revoked by MEF", 10));

  // B restarts while the MEF is down: the list it stored applies at once (before: memory only, so B knew no
  // revoked serial until the MEF answered again), and the revoked certificate stays refused.
  d.stop("mef", SIGTERM);
  d.stop("b", SIGTERM);
  d.start("b");
  CHECK(d.ctl_json("b", {"stats"}).value("revoked_certificates", 0) == 1);
  CHECK(d.wait_for_log("b", "loaded stored list version", 10));
  const auto after_restart = d.proxied("CAE-meter", "get", "example_data");
  INFO(after_restart.output);
  CHECK(after_restart.output.find(marker) == std::string::npos);
}

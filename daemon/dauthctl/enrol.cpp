// dauthctl enrol <ae>: run the RSPF for a local AE now (Enrolee role); enrol --status <ae> only reads its state.
// The enrolment is asynchronous inside dauthd (the loop never blocks): "enrol" starts an attempt and returns its
// number; dauthctl then asks "enrol.status" until an attempt from that one on has succeeded, or --wait seconds have
// passed. A failed attempt is reported and not the end: dauthd tries again by itself with backoff (1 s, 2 s, 4 s
// ... ± 10 %), which is what lets an enrolment through a lossy or briefly unreachable path finish within the wait.
#include <chrono>
#include <iostream>
#include <thread>

#include "client.hpp"
#include "dauth/daemon/exit_codes.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

// enrol --status: what enrol.status says, read-only (no attempt starts, no KeID is minted).
void print_enrolment_status(const nlohmann::json& s, std::ostream& out) {
  const std::int64_t now = s.value("now", std::int64_t{0});
  out << s.value("ae_id", "?") << ": " << s.value("state", "?");
  if (s["keId"].is_string()) out << ", KeID " << s["keId"].get<std::string>();
  if (s.value("expiry", std::int64_t{0}) != 0) out << ", expires " << when(now, s.value("expiry", std::int64_t{0}));
  out << "\n";
  out << "  attempts: " << s.value("attempts_started", 0) << " started, " << s.value("attempts_done", 0) << " done\n";
  out << "  latest enrolment: " << when(now, s.value("last_enrolled_at", std::int64_t{0})) << "\n";
  if (s["last_error"].is_string()) {
    out << "  latest failure: " << when(now, s.value("last_error_at", std::int64_t{0})) << ": "
        << s["last_error"].get<std::string>() << "\n";
  }
  if (s.value("next_attempt_at", std::int64_t{0}) != 0) {
    out << "  next attempt: " << when(now, s.value("next_attempt_at", std::int64_t{0})) << "\n";
  }
}

}  // namespace

CLI::App* add_enrol(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("enrol", "enrol a local AE with its MEF now (Enrolee role)");
  static std::string ae_id;
  static int wait_seconds = 60;
  sub->add_option("ae", ae_id, "AE-ID of a configured local AE ([[enrolee.ae]] id)")->required();
  sub->add_option("--wait", wait_seconds, "seconds to wait for the outcome (0: start only)")->check(CLI::Range(0, 3600));
  static bool status_only = false;
  sub->add_flag("--status", status_only,
                "only show the AE's enrolment state, latest outcome and next attempt; start nothing")
      ->excludes("--wait");
  sub->callback([&context] {
    using dauth::daemon::ExitCode;
    if (status_only) {
      context.exit_code = call(context, "enrol.status", {{"ae_id", ae_id}}, print_enrolment_status);
      return;
    }
    std::uint64_t attempt = 0;
    int rc = call_raw(context, "enrol", {{"ae_id", ae_id}},
                      [&](const nlohmann::json& r) { attempt = r.value("attempt", std::uint64_t{0}); });
    if (rc != 0) {
      context.exit_code = rc;
      return;
    }
    if (wait_seconds == 0) {
      std::cout << (context.json ? nlohmann::json{{"ae_id", ae_id}, {"attempt", attempt}, {"state", "enrolling"}}.dump()
                                 : "enrolment of " + ae_id + " started (attempt " + std::to_string(attempt) + ")")
                << "\n";
      context.exit_code = 0;
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(wait_seconds);
    nlohmann::json status;
    std::uint64_t reported = attempt > 0 ? attempt - 1 : 0;  // the last failed attempt told to the operator
    for (;;) {
      rc = call_raw(context, "enrol.status", {{"ae_id", ae_id}}, [&](const nlohmann::json& r) { status = r; });
      if (rc != 0) {
        context.exit_code = rc;
        return;
      }
      const auto done = status.value("attempts_done", std::uint64_t{0});
      const bool settled = done >= attempt && status.value("state", "") != "enrolling";
      if (settled && status.value("state", "") == "enrolled" && status["keId"].is_string()) break;
      if (settled && done > reported && status["last_error"].is_string()) {
        reported = done;
        std::cerr << "dauthctl: enrol " << ae_id << ": attempt " << done << " failed: "
                  << status["last_error"].get<std::string>() << "; dauthd tries again in "
                  << status.value("next_attempt_delay_ms", std::int64_t{0}) << " ms\n";
      }
      if (std::chrono::steady_clock::now() > deadline) {
        if (context.json) {
          std::cout << status.dump() << "\n";
        } else {
          std::cerr << "dauthctl: enrol " << ae_id << ": not enrolled after " << wait_seconds << " s ("
                    << (settled ? "last attempt failed" : "an attempt is still running")
                    << "; dauthd goes on trying: see dauthctl status and the log)\n";
        }
        context.exit_code = dauth::daemon::as_int(ExitCode::failed);
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (context.json) {
      std::cout << status.dump() << "\n";
    } else {
      std::cout << "enrolled " << ae_id << ": KeID " << status.value("keId", "?") << ", expires "
                << status.value("expiry", 0LL) << "\n";
    }
    context.exit_code = 0;
  });
  return sub;
}

}  // namespace dauthctl

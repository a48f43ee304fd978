// dauthctl show: one view of dauthd's state for people, like `wg show`: per local AE, peer and (MEF) enrolee its
// credential and expiry, live sessions, the latest handshake, request and failure with its reason, in relative
// times. dump.cpp prints the same "show" reply for scripts; --json prints it as it is. Plain `dauthctl` is show.
#include <string>

#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

using Json = nlohmann::json;
// ---- show: for people ----
std::int64_t time_of(const Json& row, const char* field) { return row.value(field, std::int64_t{0}); }
std::string text_of(const Json& row, const char* field) { return row.value(field, std::string()); }

void print_ae(const Json& ae, std::int64_t now, std::ostream& out) {
  out << "local AE: " << text_of(ae, "ae_id") << "\n";
  out << "  credential: " << text_of(ae, "credential_kind") << " " << text_of(ae, "credential") << "\n";
  const std::string ke_id = text_of(ae, "ke_id");
  out << "  enrolment: " << text_of(ae, "state");
  if (!ke_id.empty()) {
    out << ", KeID " << ke_id << ", expires " << when(now, time_of(ae, "expires_at"));
  }
  out << "\n";
  if (time_of(ae, "next_attempt_at") != 0) {
    out << "  next attempt: " << when(now, time_of(ae, "next_attempt_at")) << "\n";
  }
  out << "  latest enrolment: " << when(now, time_of(ae, "last_enrolled_at")) << "\n";
  out << "  latest request: " << when(now, time_of(ae, "last_request_at")) << "\n";
  if (time_of(ae, "last_failure_at") != 0) {
    out << "  latest failure: " << when(now, time_of(ae, "last_failure_at")) << ": " << text_of(ae, "last_failure")
        << "\n";
  }
  out << "  sessions: " << ae.value("sessions", 0) << " live\n";
}

void print_peer(const Json& peer, std::int64_t now, std::ostream& out) {
  out << "peer: " << text_of(peer, "ae_id") << "\n";
  const std::string address = text_of(peer, "address");
  const std::string endpoint =
      address.empty() ? "(not configured: it reached us)" : address + " (" + text_of(peer, "credential") + ")";
  out << "  endpoint: " << endpoint << "\n";
  out << "  sessions: " << peer.value("sessions", 0) << " live\n";
  out << "  latest handshake: " << when(now, time_of(peer, "last_handshake_at")) << "\n";
  out << "  latest request: " << when(now, time_of(peer, "last_request_at")) << "\n";
  if (time_of(peer, "last_success_at") != 0) {
    out << "  latest success: " << when(now, time_of(peer, "last_success_at")) << "\n";
  }
  if (time_of(peer, "last_failure_at") != 0) {
    out << "  latest failure: " << when(now, time_of(peer, "last_failure_at")) << ": "
        << text_of(peer, "last_failure") << "\n";
  }
  if (!address.empty()) {
    out << "  requests: " << peer.value("requests", 0) << " sent, " << peer.value("failures", 0) << " failed\n";
  }
}

void print_enrolee(const Json& enrolee, std::int64_t now, std::ostream& out) {
  out << "enrolee: " << text_of(enrolee, "id") << "\n";
  out << "  AE-ID: " << text_of(enrolee, "enrolee_id") << " (" << text_of(enrolee, "kind") << ")\n";
  const auto enrolments = enrolee.value("enrolments", 0);
  out << "  enrolments: " << enrolments << " valid";
  if (enrolments > 0) out << ", the last expires " << when(now, time_of(enrolee, "expires_at"));
  out << "\n";
  out << "  latest enrolment: " << when(now, time_of(enrolee, "last_enrolled_at"));
  if (!text_of(enrolee, "last_ke_id").empty()) out << " (KeID " << text_of(enrolee, "last_ke_id") << ")";
  out << "\n";
  out << "  latest seen: " << when(now, time_of(enrolee, "last_seen_at")) << "\n";
  if (time_of(enrolee, "last_failure_at") != 0) {
    out << "  latest failure: " << when(now, time_of(enrolee, "last_failure_at")) << ": "
        << text_of(enrolee, "last_failure") << "\n";
  }
}

void print_show(const Json& reply, std::ostream& out) {
  const std::int64_t now = reply.value("now", std::int64_t{0});
  const Json daemon = reply.value("daemon", Json::object());
  out << "dauthd " << text_of(daemon, "version") << " (pid " << daemon.value("pid", 0) << "): "
      << text_of(daemon, "state") << " for " << format_duration(daemon.value("uptime_seconds", 0LL)) << "\n";
  std::string roles;
  for (const char* role : {"enrolee", "mef", "peer"}) {
    if (daemon.contains("roles") && daemon["roles"].value(role, false)) {
      roles += (roles.empty() ? "" : ", ") + std::string(role);
    }
  }
  out << "  roles: " << (roles.empty() ? "none" : roles) << "\n";
  if (daemon.contains("ports") && daemon["ports"].is_object() && !daemon["ports"].empty()) {
    std::string ports;
    for (const auto& [name, port] : daemon["ports"].items()) {
      ports += (ports.empty() ? "" : ", ") + name + " " + port.dump();
    }
    out << "  listening: " << ports << "\n";
  }
  std::string pending;
  for (const auto& key : daemon.value("restart_pending", Json::array())) {
    pending += (pending.empty() ? "" : ", ") + key.get<std::string>();
  }
  if (!pending.empty()) out << "  restart pending: " << pending << "\n";
  const Json& last = daemon.contains("last_reload") ? daemon["last_reload"] : Json();
  if (last.is_object()) {
    out << "  latest reload: " << when(now, last.value("at", std::int64_t{0}))
        << (last.value("ok", false) ? ": ok" : ": refused: " + last.value("error", std::string())) << "\n";
  }
  for (const auto& ae : reply.value("local_aes", Json::array())) {
    out << "\n";
    print_ae(ae, now, out);
  }
  for (const auto& peer : reply.value("peers", Json::array())) {
    out << "\n";
    print_peer(peer, now, out);
  }
  if (reply.contains("enrolees") && reply["enrolees"].is_array()) {
    for (const auto& enrolee : reply["enrolees"]) {
      out << "\n";
      print_enrolee(enrolee, now, out);
    }
  }
}

}  // namespace

int run_show(Context& context) { return call(context, "show", Json::object(), print_show); }

CLI::App* add_show(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand(
      "show", "show local AEs, peers and (MEF) enrolees: credentials, expiry, sessions, latest handshake, request "
              "and failure");
  sub->callback([&context] { context.exit_code = run_show(context); });
  return sub;
}

}  // namespace dauthctl

// dauthctl status: the daemon's state, configuration and roles. Also what plain `dauthctl` runs.
#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

void print_status(const nlohmann::json& s, std::ostream& out) {
  out << "dauthd " << s.value("version", "?") << ", pid " << s.value("pid", 0) << ", " << s.value("state", "?")
      << " for " << format_duration(s.value("uptime_seconds", 0LL)) << "\n";
  out << "config:    " << s.value("config_file", "?") << " (loaded "
      << local_time(s.value("config_loaded_at", std::int64_t{0})) << ")\n";
  std::string roles;
  for (const char* role : {"enrolee", "mef", "peer"}) {
    if (!s["roles"].value(role, false)) continue;
    roles += (roles.empty() ? "" : ", ") + std::string(role);
    if (!s["roles_available"].value(role, false)) roles += " (configured, not in this build)";
  }
  out << "roles:     " << (roles.empty() ? "none" : roles) << "\n";
  out << "control:   " << s.value("control_socket", "?") << "\n";
  out << "keys:      " << s.value("keys_loaded", 0) << " loaded\n";
  const auto watchdog = s.value("watchdog_usec", 0ULL);
  out << "watchdog:  " << (watchdog ? std::to_string(watchdog / 1000000ULL) + " s" : std::string("off")) << "\n";
  out << "reloads:   " << s.value("reloads", 0) << " (" << s.value("reload_failures", 0) << " refused)";
  const auto& last = s["last_reload"];
  if (last.is_object()) {
    out << "; last at " << local_time(last.value("at", std::int64_t{0}))
        << (last.value("ok", false) ? ": ok" : ": refused: " + last.value("error", std::string()));
  }
  out << "\n";
  std::string pending;
  for (const auto& name : s.value("restart_pending", nlohmann::json::array())) {
    pending += (pending.empty() ? "" : ", ") + name.get<std::string>();
  }
  if (!pending.empty()) out << "restart pending: " << pending << "\n";
}

}  // namespace

int run_status(Context& context) { return call(context, "status", nlohmann::json::object(), print_status); }

CLI::App* add_status(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("status", "show the daemon's state, configuration file and roles");
  sub->callback([&context] { context.exit_code = run_status(context); });
  return sub;
}

}  // namespace dauthctl

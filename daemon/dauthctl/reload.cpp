// dauthctl reload: like SIGHUP (systemctl reload dauthd), but the outcome comes back: on success the keys applied
// and those that need a restart (from the status), the daemon's reason (file:line: key = value: rule) on failure,
// with the running configuration kept.
#include <iostream>

#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

CLI::App* add_reload(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("reload", "re-read the configuration file and report the outcome");
  sub->callback([&context] {
    context.exit_code = call(context, "reload", nlohmann::json::object(), [](const nlohmann::json& r, std::ostream& out) {
      out << "configuration reloaded (" << r.value("reloads", 0) << " reload(s) since start)\n";
      // What it did, as the daemon logged it: the keys applied, and those that keep their running value.
      std::string applied;
      for (const auto& name : r["last_reload"].value("applied", nlohmann::json::array())) {
        applied += (applied.empty() ? "" : ", ") + name.get<std::string>();
      }
      out << "applied: " << (applied.empty() ? "no changed key" : applied) << "\n";
      for (const auto& name : r.value("restart_pending", nlohmann::json::array())) {
        out << "needs a restart: " << name.get<std::string>() << "\n";
      }
    });
  });
  return sub;
}

}  // namespace dauthctl

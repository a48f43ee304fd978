// dauthctl reload: like SIGHUP (systemctl reload dauthd), but the outcome comes back: the status on success, the
// daemon's reason (file:line: key = value: rule) on failure, with the running configuration kept.
#include <iostream>

#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

CLI::App* add_reload(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("reload", "re-read the configuration file and report the outcome");
  sub->callback([&context] {
    context.exit_code = call(context, "reload", nlohmann::json::object(), [](const nlohmann::json& r, std::ostream& out) {
      out << "configuration reloaded (" << r.value("reloads", 0) << " reload(s) since start)\n";
    });
  });
  return sub;
}

}  // namespace dauthctl

// dauthctl sessions: live peer sessions (Peer role).
#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

CLI::App* add_sessions(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("sessions", "list live peer sessions (Peer role)");
  sub->callback([&context] {
    context.exit_code = call(context, "sessions", nlohmann::json::object(),
                             [](const nlohmann::json& r, std::ostream& out) {
                               print_rows(r.value("sessions", nlohmann::json::array()), out, "no sessions");
                             });
  });
  return sub;
}

}  // namespace dauthctl

// dauthctl peers: known remote AEs, their addresses and policy (Peer role).
#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

CLI::App* add_peers(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("peers", "list remote AEs, their addresses and access policy (Peer role)");
  sub->callback([&context] {
    context.exit_code = call(context, "peers", nlohmann::json::object(),
                             [](const nlohmann::json& r, std::ostream& out) {
                               print_rows(r.value("peers", nlohmann::json::array()), out, "no peers");
                             });
  });
  return sub;
}

}  // namespace dauthctl

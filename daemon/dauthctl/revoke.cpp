// dauthctl revoke <id>: revoke a KeID or a certificate serial (MEF role, PROTOCOL.md §5).
#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

CLI::App* add_revoke(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("revoke", "revoke a KeID or a certificate serial (MEF role)");
  static std::string id;
  sub->add_option("id", id, "KeID (<32 hex>@<MEF-FQDN>) or certificate serial (hex)")->required();
  sub->callback([&context] {
    context.exit_code = call(context, "revoke", {{"id", id}}, [](const nlohmann::json& r, std::ostream& out) {
      out << "revoked " << r.value("id", id) << "\n";
    });
  });
  return sub;
}

}  // namespace dauthctl

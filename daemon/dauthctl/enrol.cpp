// dauthctl enrol <ae>: run the RSPF for a local AE now (Enrolee role).
#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

CLI::App* add_enrol(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("enrol", "enrol a local AE with its MEF now (Enrolee role)");
  static std::string ae_id;
  sub->add_option("ae", ae_id, "AE-ID of a configured local AE ([[enrolee.ae]] id)")->required();
  sub->callback([&context] {
    context.exit_code = call(context, "enrol", {{"ae_id", ae_id}}, [](const nlohmann::json& r, std::ostream& out) {
      out << "enrolled " << r.value("enroleeId", ae_id) << ": KeID " << r.value("keId", "?") << ", expires "
          << r.value("expiry", 0LL) << "\n";
    });
  });
  return sub;
}

}  // namespace dauthctl

// dauthctl stats [--prometheus]: the daemon's counters. Human, --json and Prometheus text all print the same
// fields of the one "stats" reply.
#include <iostream>

#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

// Prometheus text exposition format 0.0.4: "_total" names are counters, everything else a gauge.
void print_prometheus(const nlohmann::json& stats, std::ostream& out) {
  for (const auto& [key, value] : stats.items()) {
    if (!value.is_number()) continue;
    const std::string name = "dauth_" + key;
    const bool counter = key.size() > 6 && key.compare(key.size() - 6, 6, "_total") == 0;
    out << "# TYPE " << name << (counter ? " counter" : " gauge") << "\n" << name << " " << value.dump() << "\n";
  }
}

void print_human(const nlohmann::json& stats, std::ostream& out) {
  for (const auto& [key, value] : stats.items()) out << key << ": " << value.dump() << "\n";
}

}  // namespace

CLI::App* add_stats(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("stats", "print the daemon's counters");
  static bool prometheus = false;
  sub->add_flag("--prometheus", prometheus, "Prometheus text exposition format");
  sub->callback([&context] {
    context.exit_code = call_raw(context, "stats", nlohmann::json::object(), [&](const nlohmann::json& r) {
      if (prometheus) {
        print_prometheus(r, std::cout);
      } else if (context.json) {
        std::cout << r.dump(2) << "\n";
      } else {
        print_human(r, std::cout);
      }
    });
  });
  return sub;
}

}  // namespace dauthctl

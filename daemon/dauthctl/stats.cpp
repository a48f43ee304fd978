// dauthctl stats [--prometheus]: the daemon's metrics (docs/metrics.md). Human, --json and Prometheus text all print
// the one "stats" reply; its "metrics" families carry each metric's type, help text and labels (metrics.hpp).
#include <iostream>

#include "client.hpp"
#include "metrics.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

// One line per sample: name{label="value",...}: value, without the dauth_ prefix.
void print_human(const nlohmann::json& stats, std::ostream& out) {
  for (const auto& family : stats.value("metrics", nlohmann::json::array())) {
    const std::string name = family.value("name", "");
    const std::string short_name = name.rfind("dauth_", 0) == 0 ? name.substr(6) : name;
    for (const auto& sample : family.value("samples", nlohmann::json::array())) {
      out << short_name;
      const auto labels = sample.value("labels", nlohmann::json::object());
      if (!labels.empty()) {
        out << "{";
        bool first = true;
        for (const auto& [key, value] : labels.items()) {
          out << (first ? "" : ",") << key << "=" << value.dump();
          first = false;
        }
        out << "}";
      }
      out << ": " << sample.value("value", nlohmann::json(0)).dump() << "\n";
    }
  }
}

}  // namespace

CLI::App* add_stats(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("stats", "print the daemon's metrics (docs/metrics.md)");
  static bool prometheus = false;
  sub->add_flag("--prometheus", prometheus, "Prometheus text exposition format (# HELP, # TYPE, labels)");
  sub->callback([&context] {
    bool written = true;
    context.exit_code = call_raw(context, "stats", nlohmann::json::object(), [&](const nlohmann::json& r) {
      if (prometheus) {
        written = dauth::daemon::write_prometheus(r, std::cout);
        if (!written) std::cerr << "dauthctl: the stats reply has no \"metrics\": dauthd is older than this dauthctl\n";
      } else if (context.json) {
        std::cout << r.dump(2) << "\n";
      } else {
        print_human(r, std::cout);
      }
    });
    if (!written) context.exit_code = 1;
  });
  return sub;
}

}  // namespace dauthctl

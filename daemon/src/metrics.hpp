// dauthd's metrics (docs/metrics.md): one catalogue says each metric's name, type, help text and labels; the
// `stats` reply, dauthctl's Prometheus text and docs/metrics.md are made from it (a test compares the docs with it).
//
// Label values are configured entities only (node names, local AE-IDs, configured peer AE-IDs, the kinds of an
// enum), never an address or identity a stranger chose: the number of series is bounded by the configuration.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace dauth::daemon {

enum class MetricType { counter, gauge };
std::string_view to_string(MetricType type) noexcept;

struct MetricInfo {
  std::string_view name;  // with the "dauth_" prefix; counters end in "_total", durations in "_seconds"
  MetricType type;
  std::string_view help;
  std::vector<std::string_view> labels;  // in the order the samples name them
};

// Every metric dauthd can report, in the order of docs/metrics.md.
const std::vector<MetricInfo>& metric_catalogue();

using MetricLabels = std::map<std::string, std::string>;

// The samples of one `stats` reply. add() throws std::logic_error for a name not in the catalogue or labels other
// than its own: a metric cannot be reported without being described (the control socket turns the exception into
// an "internal" reply, and the metrics tests see it).
class MetricSet {
 public:
  void add(std::string_view name, const MetricLabels& labels, const nlohmann::json& value);
  void add(std::string_view name, const nlohmann::json& value) { add(name, {}, value); }

  // The `stats` reply: {"metrics": [{"name", "type", "help", "samples": [{"labels", "value"}]}], ...} with the
  // families that have samples, in catalogue order; plus, for scripts written before labels existed, each sample
  // without labels as "<name without dauth_>" and each sample labelled only by node as "<node>_<name without
  // dauth_>" (the keys earlier versions had).
  nlohmann::json to_json() const;

 private:
  struct Sample {
    MetricLabels labels;
    nlohmann::json value;
  };
  std::map<std::string_view, std::vector<Sample>> samples_;
};

// Prometheus text exposition format 0.0.4 of a `stats` reply's "metrics": # HELP and # TYPE for every family,
// label values escaped. Errors: the reply has no "metrics" array (a dauthd older than this dauthctl).
bool write_prometheus(const nlohmann::json& stats_reply, std::ostream& out);

}  // namespace dauth::daemon

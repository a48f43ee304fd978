// The control verbs live in one table (daemon/src/verbs/verbs.hpp); dauthctl has one file per verb, and
// docs/control-protocol.md and dauthctl(1) list them. These checks fail when a verb is added in one place only.
#include <catch2/catch.hpp>
#include <filesystem>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>

#include "metrics.hpp"
#include "support.hpp"
#include "verbs/verbs.hpp"

namespace {

using Names = std::set<std::string>;

std::string source(const std::string& relative) { return dauth::test::read_text_file(DAUTH_SOURCE_DIR "/" + relative); }

// docs/control-protocol.md "## Verbs": | `verb` | args | result | needs |, needs as the table's VerbRole.
std::map<std::string, std::string> protocol_verbs() {
  std::map<std::string, std::string> verbs;
  std::istringstream in(source("docs/control-protocol.md"));
  std::string line;
  bool in_section = false;
  const std::regex row(R"(^\| `([a-z.]+)` \|.*\| ([^|]+) \|\s*$)");
  const std::map<std::string, std::string> roles = {{"–", "none"},           {"any role", "any"},
                                                    {"Enrolee role", "enrolee"}, {"MEF role", "mef"},
                                                    {"Peer role", "peer"}};
  std::smatch m;
  while (std::getline(in, line)) {
    if (line.rfind("## ", 0) == 0) in_section = line == "## Verbs";
    if (!in_section || !std::regex_match(line, m, row)) continue;
    const auto role = roles.find(m[2]);
    verbs[m[1]] = role == roles.end() ? "unknown needs: " + std::string(m[2]) : role->second;
  }
  return verbs;
}

// dauthctl(1) "VERBS": the first word of each .TP item (".B status", ".BI \"credentials add ...", ".BR stats ...").
// Items documented as local ("Local: no daemon needed") are returned in `local`.
Names man_verbs(Names& local) {
  Names verbs;
  std::istringstream in(source("docs/dauthctl.1"));
  std::string line;
  std::string previous;
  std::string current;
  bool in_section = false;
  const std::regex item(R"(^\.B[IR]? "?([a-z]+))");
  std::smatch m;
  while (std::getline(in, line)) {
    if (line.rfind(".SH ", 0) == 0) in_section = line == ".SH VERBS";
    if (in_section && previous == ".TP" && std::regex_search(line, m, item)) {
      current = m[1];
      verbs.insert(current);
    }
    if (in_section && !current.empty() && line.find("Local: no daemon needed") != std::string::npos) {
      local.insert(current);
    }
    previous = line;
  }
  return verbs;
}

// dauthctl's verbs as the real binary lists them (CLI11's "Subcommands:" block of --help).
Names dauthctl_verbs() {
  const auto help = dauth::test::run_command({DAUTHCTL_PATH, "--help"});
  REQUIRE(help.exit_code == 0);
  Names verbs;
  std::istringstream in(help.output);
  std::string line;
  bool in_block = false;
  const std::regex entry(R"(^\s+([a-z]+)\s)");
  std::smatch m;
  while (std::getline(in, line)) {
    if (line.rfind("Subcommands:", 0) == 0) {
      in_block = true;
      continue;
    }
    if (in_block && std::regex_search(line, m, entry)) verbs.insert(m[1]);
  }
  return verbs;
}

// The requests each dauthctl verb file sends: call(context, "verb", ...) and call_raw(context, "verb", ...).
std::map<std::string, Names> dauthctl_requests(const Names& verbs) {
  std::map<std::string, Names> sent;
  const std::regex call(R"re(call(?:_raw)?\(\s*context,\s*"([a-z.]+)")re");
  for (const auto& verb : verbs) {
    const std::string text = source("daemon/dauthctl/" + verb + ".cpp");
    for (std::sregex_iterator it(text.begin(), text.end(), call), end; it != end; ++it) sent[verb].insert((*it)[1]);
  }
  return sent;
}

// docs/control-protocol.md "## Verbs": each verb's args column, as the set of its quoted names ("kpm_id", ...).
std::map<std::string, Names> protocol_verb_args() {
  std::map<std::string, Names> args;
  std::istringstream in(source("docs/control-protocol.md"));
  std::string line;
  bool in_section = false;
  const std::regex row(R"(^\| `([a-z.]+)` \| ([^|]*) \|)");
  const std::regex quoted(R"re("([a-z_]+)")re");
  std::smatch m;
  while (std::getline(in, line)) {
    if (line.rfind("## ", 0) == 0) in_section = line == "## Verbs";
    if (!in_section || !std::regex_search(line, m, row)) continue;
    const std::string column = m[2];
    Names& names = args[m[1]];
    for (std::sregex_iterator it(column.begin(), column.end(), quoted), end; it != end; ++it) names.insert((*it)[1]);
  }
  return args;
}

// The catalogue's row as docs/metrics.md writes it: | `name` | type | label, label (or –) | help |
std::string metric_row(const dauth::daemon::MetricInfo& metric) {
  std::string labels;
  for (const auto label : metric.labels) labels += (labels.empty() ? "" : ", ") + std::string(label);
  return "| `" + std::string(metric.name) + "` | " + std::string(dauth::daemon::to_string(metric.type)) + " | " +
         (labels.empty() ? "–" : labels) + " | " + std::string(metric.help) + " |";
}

}  // namespace

TEST_CASE("each verb's declared args are the ones docs/control-protocol.md lists", "[control][docs]") {
  const auto documented = protocol_verb_args();
  for (const auto& verb : dauth::daemon::control_verbs()) {
    INFO(verb.name);
    const Names declared(verb.args.begin(), verb.args.end());
    const auto it = documented.find(verb.name);
    REQUIRE(it != documented.end());
    CHECK(declared == it->second);
  }
}

TEST_CASE("docs/metrics.md lists every metric of the catalogue with its type, labels and help", "[control][docs]") {
  // The table is the catalogue, row for row: the expected text is printed when they differ, ready to paste.
  std::string expected = "| metric | type | labels | help |\n|---|---|---|---|\n";
  std::set<std::string> names;
  for (const auto& metric : dauth::daemon::metric_catalogue()) {
    CHECK(names.insert(std::string(metric.name)).second);  // each once
    INFO(metric.name);
    CHECK(metric.name.rfind("dauth_", 0) == 0);
    // Prometheus naming: counters, and only counters, end in _total.
    const bool total = metric.name.size() > 6 && metric.name.substr(metric.name.size() - 6) == "_total";
    CHECK(total == (metric.type == dauth::daemon::MetricType::counter));
    expected += metric_row(metric) + "\n";
  }
  CHECK(names.size() >= 40);
  const std::string doc = source("docs/metrics.md");
  const auto table = doc.find("| metric | type | labels | help |");
  REQUIRE(table != std::string::npos);
  CHECK(doc.substr(table) == expected);
}

TEST_CASE("the daemon verb table and docs/control-protocol.md list the same verbs and roles", "[control][docs]") {
  const auto documented = protocol_verbs();
  std::map<std::string, std::string> table;
  for (const auto& verb : dauth::daemon::control_verbs()) {
    INFO(verb.name);
    CHECK(table.emplace(verb.name, std::string(dauth::daemon::to_string(verb.role))).second);  // each once
    // One file per verb group on the daemon side too, named like dauthctl's.
    const std::string name = verb.name;
    CHECK(std::filesystem::exists(DAUTH_SOURCE_DIR "/daemon/src/verbs/" + name.substr(0, name.find('.')) + ".cpp"));
  }
  CHECK(table.size() >= 14);
  CHECK(table == documented);
}

TEST_CASE("dauthctl verbs and its man page and the daemon verb table agree", "[control][docs]") {
  const Names cli = dauthctl_verbs();
  Names local;
  const Names man = man_verbs(local);
  CHECK(cli.size() >= 10);
  CHECK(cli == man);

  // Every daemon verb is sent by the dauthctl verb of its group ("enrolees.add" by enrolees.cpp), every request
  // dauthctl sends is in the table, and only the verbs documented as local send none.
  Names table;
  for (const auto& verb : dauth::daemon::control_verbs()) table.insert(verb.name);
  const auto sent = dauthctl_requests(cli);
  Names all_sent;
  for (const auto& verb : cli) {
    INFO("dauthctl " << verb);
    const auto it = sent.find(verb);
    if (it == sent.end()) {
      CHECK(local.count(verb) == 1);
      continue;
    }
    CHECK(local.count(verb) == 0);
    for (const auto& request : it->second) {
      INFO("sends " << request);
      CHECK(table.count(request) == 1);
      // dump prints show's reply for scripts: one daemon verb, two renderings (dauthctl(1) DUMP FORMAT).
      const std::string group = request.substr(0, request.find('.'));
      CHECK((group == verb || (verb == "dump" && group == "show")));
      all_sent.insert(request);
    }
  }
  CHECK(all_sent == table);
}

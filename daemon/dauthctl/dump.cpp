// dauthctl dump: what show shows, as stable tab-separated fields for scripts, like `wg show all dump`: one line per
// object, its kind first; times in unix seconds (0 = never), "(none)" for no value. The field lists below are
// dauthctl(1)'s "DUMP FORMAT" (a test checks both against a real dauthd); new fields are only ever appended.
#include <iostream>
#include <string>
#include <vector>

#include "client.hpp"
#include "verbs.hpp"

namespace dauthctl {

namespace {

using Json = nlohmann::json;

struct DumpLine {
  const char* kind;   // the first field
  const char* array;  // where the rows are in the reply ("" = the daemon object)
  std::vector<const char*> fields;
};

const std::vector<DumpLine>& dump_lines() {
  static const std::vector<DumpLine> lines = {
      {"daemon", "", {"version", "pid", "state", "uptime_seconds", "config_file"}},
      {"ae",
       "local_aes",
       {"ae_id", "credential_kind", "credential", "state", "ke_id", "expires_at", "next_attempt_at",
        "last_enrolled_at", "last_request_at", "last_failure_at", "last_failure", "attempts", "sessions"}},
      {"peer",
       "peers",
       {"ae_id", "address", "credential", "sessions", "last_handshake_at", "last_request_at", "last_success_at",
        "last_failure_at", "last_failure", "requests", "failures"}},
      {"enrolee",
       "enrolees",
       {"id", "enrolee_id", "kind", "enrolments", "expires_at", "last_ke_id", "last_seen_at", "last_enrolled_at",
        "last_failure_at", "last_failure", "failures"}},
  };
  return lines;
}

// One field: numbers as they are (times in unix seconds, 0 = never), empty text as "(none)" (as wg dump does), and
// no tab or line break inside a field, whatever the daemon reports.
std::string dump_field(const Json& value) {
  if (value.is_null()) return "(none)";
  if (!value.is_string()) return value.dump();
  std::string text = value.get<std::string>();
  if (text.empty()) return "(none)";
  for (char& c : text) {
    if (c == '\t' || c == '\n' || c == '\r') c = ' ';
  }
  return text;
}

void print_dump(const Json& reply, std::ostream& out) {
  for (const auto& line : dump_lines()) {
    const Json* rows = nullptr;
    Json daemon_rows;
    if (*line.array == '\0') {
      daemon_rows = Json::array({reply.value("daemon", Json::object())});
      rows = &daemon_rows;
    } else if (reply.contains(line.array) && reply[line.array].is_array()) {
      rows = &reply[line.array];
    }
    if (rows == nullptr) continue;
    for (const auto& row : *rows) {
      out << line.kind;
      for (const char* field : line.fields) out << '\t' << dump_field(row.value(field, Json()));
      out << '\n';
    }
  }
}

}  // namespace

CLI::App* add_dump(CLI::App& parent, Context& context) {
  CLI::App* sub = parent.add_subcommand("dump", "print what show shows as tab-separated fields for scripts "
                                                "(dauthctl(1) DUMP FORMAT)");
  sub->callback([&context] {
    context.exit_code = call_raw(context, "show", Json::object(), [&](const Json& reply) {
      if (context.json) {
        std::cout << reply.dump() << "\n";
      } else {
        print_dump(reply, std::cout);
      }
    });
  });
  return sub;
}

}  // namespace dauthctl

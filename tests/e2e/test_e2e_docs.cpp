// End to end: what the documents tell an operator to do, done. The stock-client commands the documentation shows (README.md, docs/interop.md, docs/PROTOCOL.md,
// docs/dauthd.8) are read from those files and run, as written, against the demo deployment with the stock
// coap-client-gnutls and coap-client-openssl (libcoap3-bin); only the port of gateway A's local endpoint is the
// deployment's. A document whose example stops working, or that drifts from the others, fails here. And the backup
// and restore of a gateway as dauthd(8) describes it.
#include <signal.h>

#include <catch2/catch.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "e2e_support.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

// The documents that show the example, and how to read a command line out of each.
struct Document {
  const char* path;
  bool roff;  // a man page: commands sit in .nf blocks with '-' written as "\-"
};
const Document kDocuments[] = {
    {"README.md", false}, {"docs/interop.md", false}, {"docs/PROTOCOL.md", false}, {"docs/dauthd.8", true}};

std::string unescape_roff(std::string line) {
  for (const std::string from : {"\\-", "\\(aq"}) {
    const std::string to = from == "\\-" ? "-" : "'";
    for (auto at = line.find(from); at != std::string::npos; at = line.find(from, at + to.size())) {
      line.replace(at, from.size(), to);
    }
  }
  return line;
}

// Every line of a document that is a stock-client command through the local endpoint: it starts (after the code
// block's indent) with "coap-client-" and sends to a proxy with -P.
std::vector<std::string> documented_commands(const Document& document) {
  std::istringstream in(read_text_file(std::filesystem::path(DAUTH_SOURCE_DIR) / document.path));
  std::vector<std::string> commands;
  const std::regex command(R"(^\s*(coap-client-[a-z]+ .*-P coap://.*)$)");
  std::smatch m;
  for (std::string line; std::getline(in, line);) {
    if (document.roff) line = unescape_roff(line);
    if (std::regex_match(line, m, command)) commands.push_back(m[1]);
  }
  return commands;
}

std::vector<std::string> split_words(const std::string& command) {
  std::istringstream in(command);
  std::vector<std::string> words;
  for (std::string word; in >> word;) words.push_back(word);
  return words;
}

// Runs a documented command as written, except: the program is `program` (the same flavour name with another TLS
// library), the local endpoint's documented port is the deployment's, and -B bounds the wait.
CommandResult run_documented(const Deployment& d, const std::string& command, const std::string& program) {
  auto argv = split_words(command);
  argv.at(0) = program;
  for (auto& word : argv) {
    word = std::regex_replace(word, std::regex("^coap://127\\.0\\.0\\.1:5683$"),
                              "coap://127.0.0.1:" + std::to_string(d.ports().at("A_LOCAL")));
  }
  argv.insert(argv.begin() + 1, {"-B", "20"});
  return run_command(argv);
}

// coap-server's /time answers like "Dec 07 02:08:28": only the valve server behind gateway B says that.
bool answered_by_valve(const CommandResult& result) {
  return result.exit_code == 0 && std::regex_search(result.output, std::regex(R"([A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d)")) &&
         result.output.find("4.0") == std::string::npos;
}

}  // namespace

TEST_CASE("the documented stock-client commands reach the valve as written and the old example gets 4.03",
          "[e2e][docs]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  for (const char* program : {"coap-client-gnutls", "coap-client-openssl"}) {
    if (!have_program(program)) {
      WARN(std::string(program) + " missing (libcoap3-bin); skipped");
      return;
    }
  }
  // Each document shows the oneM2M-FR form, the same in all of them.
  std::set<std::string> commands;
  std::string with_originator;
  for (const auto& document : kDocuments) {
    INFO(document.path);
    const auto found = documented_commands(document);
    std::string named;
    for (const auto& command : found) {
      commands.insert(command);
      if (command.find("-O 279,") != std::string::npos) named = command;
    }
    REQUIRE_FALSE(named.empty());
    if (with_originator.empty()) with_originator = named;
    CHECK(named == with_originator);
  }
  // docs/interop.md also shows the local_source form, with the configuration line it needs.
  const std::string interop = read_text_file(std::filesystem::path(DAUTH_SOURCE_DIR) / "docs/interop.md");
  std::smatch source_line;
  REQUIRE(std::regex_search(interop, source_line, std::regex(R"(\n\s*(local_source = "127\.[0-9.]+")\n)")));
  std::string with_source;
  for (const auto& command : commands) {
    if (command.find(" -a 127.") != std::string::npos && command.find("-O 279") == std::string::npos) {
      with_source = command;
    }
  }
  REQUIRE_FALSE(with_source.empty());

  Deployment d;
  start_all(d);
  const auto run_all = [&](const std::string& command) {
    for (const char* program : {"coap-client-gnutls", "coap-client-openssl"}) {
      const auto result = run_documented(d, command, program);
      INFO(program << ": " << command << "\n" << result.output);
      CHECK(answered_by_valve(result));
    }
  };
  run_all(with_originator);

  // The example these documents showed before (PROTOCOL.md §6): no oneM2M-FR, sent from 127.0.0.1, which is no
  // AE's local_source. dauthd cannot tell which local AE asks and refuses.
  const auto old_example =
      run_documented(d, "coap-client -P coap://127.0.0.1:5683 coap://CAE-valve/temp", "coap-client-gnutls");
  INFO(old_example.output);
  CHECK_FALSE(answered_by_valve(old_example));
  CHECK(old_example.output.find("4.03") != std::string::npos);
  CHECK(old_example.output.find("no oneM2M-FR") != std::string::npos);

  // The local_source form, with the documented line in meter's [[enrolee.ae]] (a restart: an AE with a
  // local_source is bound to it, so the oneM2M-FR form above, sent from 127.0.0.1, would now be refused).
  d.stop("a", SIGTERM);
  d.insert_config_line("a", "id = \"CAE-meter\"", source_line[1]);
  d.start("a");
  REQUIRE(d.wait_enrolled("a", "CAE-meter"));
  run_all(with_source);
  // Every command the documents show was run.
  CHECK(commands == std::set<std::string>{with_originator, with_source});
}

TEST_CASE("backup and restore as dauthd(8) says: a gateway restored from a copy taken while stopped keeps its enrolment",
          "[e2e][docs]") {
  DAUTH_E2E_SKIP_WITHOUT_STOCK_TOOLS();
  if (!have_program("tar")) {
    WARN("tar missing; skipped");
    return;
  }
  Deployment d;
  start_all(d);
  const auto enrolled = d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}});
  const std::string ke_id = enrolled.value("keId", "");
  REQUIRE_FALSE(ke_id.empty());

  // Gateway A's configuration (file, key files, master key) and its state directory, taken with dauthd stopped,
  // then the originals gone: the new machine has only the backup.
  d.stop("a", SIGTERM);
  const auto backup = (d.dir() / "gateway-a.tar.gz").string();
  const auto taken = run_command({"tar", "--numeric-owner", "-cpzf", backup, "-C", d.dir().string(), "gateway-a.toml",
                                  "a", "keys"});
  INFO(taken.output);
  REQUIRE(taken.exit_code == 0);
  for (const char* part : {"gateway-a.toml", "a"}) std::filesystem::remove_all(d.dir() / part);
  REQUIRE(run_command({"tar", "-xpzf", backup, "-C", d.dir().string()}).exit_code == 0);

  d.start("a");
  REQUIRE(d.wait_enrolled("a", "CAE-meter"));
  const auto restored = d.verb("a", "enrol.status", {{"ae_id", "CAE-meter"}});
  CHECK(restored.value("keId", "") == ke_id);            // the enrolment from the store, not a new one
  CHECK(restored.value("attempts_started", -1) == 0);
  const auto answer = d.proxied("CAE-meter", "get", "time");
  INFO(answer.output);
  CHECK(answered_by_valve(answer));

  // The store opens only with the master key it was sealed with.
  d.stop("a", SIGTERM);
  write_file(d.dir() / "a" / "master.key", run_command({"openssl", "rand", "-hex", "32"}).output, 0600);
  const auto refused = run_command({"timeout", "30", DAUTHD_PATH, "--config", (d.dir() / "gateway-a.toml").string()});
  INFO(refused.output);
  CHECK(refused.exit_code == 2);
  CHECK(refused.output.find("wrong master key or tampered file") != std::string::npos);
}

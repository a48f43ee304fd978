// The shipped unit (systemd/dauthd.service): systemd itself parses and verifies it, its sandbox scores at most
// 2.0 in `systemd-analyze security` (issue: exposure <= 2.0). That installing points ExecStart at the installed
// binary is checked on a real installation: tests/package/check-install-tree.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <regex>
#include <string>

#include "dauth/daemon/config.hpp"
#include "support.hpp"

namespace {

const std::filesystem::path kSource = DAUTH_SOURCE_DIR;
const std::filesystem::path kUnit = kSource / "systemd" / "dauthd.service";

}  // namespace

TEST_CASE("the unit is Type=notify with watchdog, reload, state/runtime/config directories and sealed credentials",
          "[systemd]") {
  const std::string unit = dauth::test::read_text_file(kUnit);
  for (const char* line : {"Type=notify", "WatchdogSec=", "ExecReload=", "StateDirectory=dauth", "RuntimeDirectory=dauth",
                           "ConfigurationDirectory=dauth", "LoadCredentialEncrypted=master-key:dauth-master-key",
                           "LoadCredentialEncrypted=master-key-next:dauth-master-key-next", "User=dauth",
                           "NoNewPrivileges=yes"}) {
    INFO(line);
    CHECK(unit.find(std::string("\n") + line) != std::string::npos);
  }
}

TEST_CASE("systemd-analyze verifies the unit and rates its exposure at most 2.0", "[systemd]") {
  REQUIRE(dauth::test::have_program("systemd-analyze"));  // scripts/install-deps installs systemd
  dauth::test::TempDir dir;
  // verify checks that ExecStart's binary exists: point it at the one just built, as `cmake --install` does.
  std::string unit = dauth::test::read_text_file(kUnit);
  unit = std::regex_replace(unit, std::regex("/usr/sbin/dauthd"), DAUTHD_PATH);
  const auto copy = dir.path() / "dauthd.service";
  dauth::test::write_file(copy, unit, 0644);

  const auto verify = dauth::test::run_command({"systemd-analyze", "verify", "--man=no", copy.string()});
  INFO(verify.output);
  CHECK(verify.exit_code == 0);
  CHECK(verify.output.find("dauthd.service") == std::string::npos);  // no warning names the unit

  const auto security = dauth::test::run_command(
      {"systemd-analyze", "security", "--offline=true", "--threshold=20", copy.string()});
  INFO(security.output);
  CHECK(security.exit_code == 0);
  std::smatch level;
  REQUIRE(std::regex_search(security.output, level, std::regex("Overall exposure level for dauthd.service: ([0-9.]+)")));
  CHECK(std::stod(level[1].str()) <= 2.0);
}

TEST_CASE("the unit passes the master key credentials under the names dauthd reads by default", "[systemd]") {
  // daemon.master_key_credential and daemon.master_key_next_credential (dauthd(8) MASTER KEY): a unit that names
  // them otherwise starts a dauthd without its key, or without the next key a rotation needs.
  const std::string unit = dauth::test::read_text_file(kUnit);
  int found = 0;
  for (const auto& spec : dauth::daemon::config_schema()) {
    if (spec.name != "master_key_credential" && spec.name != "master_key_next_credential") continue;
    std::string name(spec.default_value);
    name = name.substr(1, name.size() - 2);  // the TOML text of a string: "\"master-key\""
    INFO(spec.name << " = " << name);
    CHECK(unit.find("\nLoadCredentialEncrypted=" + name + ":dauth-" + name + "\n") != std::string::npos);
    ++found;
  }
  CHECK(found == 2);
}

// dauthd --check-config beyond the file and its keys: what starting needs from this host (state directory, readable
// files, free ports), checked as the user the service runs as (dauthd(8): --check-config, -u).
#pragma once

#include <string>
#include <vector>

#include "dauth/daemon/config.hpp"

namespace dauth::daemon {

// Becomes user `name` for good: its supplementary groups, gid and uid (initgroups, setresgid, setresuid), so that
// every check after it sees the files and ports as that user will. Errc::not_found for an unknown user,
// Errc::permission when this process may not change user (not root).
Result<void> become_user(const std::string& name);

// daemon.state_directory exists, is a directory, has the key store's mode, and this process may create files in
// it (faccessat with the effective ids). Errors name the file position of the key. Also run at start.
Result<void> check_state_directory(const Config& config);

struct DeploymentCheck {
  std::vector<std::string> errors;  // each "file:line:column: key = value: what is wrong"
  std::vector<std::string> notes;   // what cannot be checked here, and why
};

// As this process's user: the state directory; every certificate and key file the configuration names readable
// (key files with a mode rule are load_secrets()'s); each UDP port the roles bind free, by the probe transport binds
// with (transport::check_udp_port_free). A port held by a running dauthd of this configuration (its control socket
// answers status with that port) is a note: it is free again when that dauthd stops. With
// master_key_source = "credential" and no $CREDENTIALS_DIRECTORY, a note that systemd provides the key.
DeploymentCheck check_deployment(const Config& config);

}  // namespace dauth::daemon

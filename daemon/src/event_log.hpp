// The syslog priority of every kind of event the roles and the transport report, in one place, and their way into
// the journal through the rate limit (log::write_limited). The table an operator reads is in dauthd(8),
// LOGGING.
#pragma once

#include <string>

#include "dauth/daemon/log.hpp"
#include "dauth/rspf/role_support.hpp"
#include "dauth/transport/transport.hpp"

namespace dauth::daemon {

// progress: info; audit: notice; refused, failed, revoked, expiring: warning.
log::Level priority_of(rspf::LogKind kind);
// A role's line: progress and audit lines are never suppressed (audit lines are the MEF's record), the others go
// through the rate limit per kind and subject.
void log_role_event(rspf::LogKind kind, const std::string& subject, const std::string& line);

// A transport failure on the node named node_name ("mef", "peer", "enrolee"): refused handshakes and limits are
// warnings; on the client-only "enrolee" node a refused handshake is a notice (the Enrolee's own line says what it
// means, at warning); timeouts and refused or failed requests are notices.
log::Level priority_of(const std::string& node_name, transport::FailureKind kind);
// Rate-limited per node, kind and subject: the identity offered, else the peer's address without its port (a flood
// from one host comes from many ports).
void log_transport_failure(const std::string& node_name, const transport::Failure& failure);

}  // namespace dauth::daemon

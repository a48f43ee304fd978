#include "event_log.hpp"

namespace dauth::daemon {

// Switches without default: -Wswitch (an error here) names any kind left without a priority.
log::Level priority_of(rspf::LogKind kind) {
  switch (kind) {
    case rspf::LogKind::progress: return log::Level::info;
    // Normal but significant (syslog's notice): decisions an operator may have to account for, not failures.
    case rspf::LogKind::audit: return log::Level::notice;
    case rspf::LogKind::refused:
    case rspf::LogKind::failed:
    case rspf::LogKind::revoked:
    case rspf::LogKind::expiring: return log::Level::warning;
  }
  return log::Level::warning;
}

void log_role_event(rspf::LogKind kind, const std::string& subject, const std::string& line) {
  const log::Level level = priority_of(kind);
  if (kind == rspf::LogKind::progress || kind == rspf::LogKind::audit) return log::write(level, "rspf: " + line);
  log::write_limited(level, std::string(rspf::to_string(kind)), subject, "rspf: " + line);
}

log::Level priority_of(const std::string& node_name, transport::FailureKind kind) {
  switch (kind) {
    case transport::FailureKind::handshake_failed:
      return node_name == "enrolee" ? log::Level::notice : log::Level::warning;
    case transport::FailureKind::limit: return log::Level::warning;
    // A stalled handshake begun again is reported as a timeout too; a real one shows in the role's line.
    case transport::FailureKind::handshake_timeout:
    case transport::FailureKind::request_rejected:
    case transport::FailureKind::request_failed: return log::Level::notice;
  }
  return log::Level::warning;
}

namespace {
std::string host_of(const std::string& address) {
  if (!address.empty() && address.front() == '[') return address.substr(0, address.find(']') + 1);
  const auto colon = address.rfind(':');
  return colon == std::string::npos || address.find(':') != colon ? address : address.substr(0, colon);
}
}  // namespace

void log_transport_failure(const std::string& node_name, const transport::Failure& failure) {
  const std::string subject = failure.identity_offered.empty() ? host_of(failure.peer_address)
                                                               : failure.identity_offered;
  log::write_limited(priority_of(node_name, failure.kind),
                     node_name + " " + std::string(transport::to_string(failure.kind)), subject,
                     node_name + " " + transport::format_failure(failure));
}

}  // namespace dauth::daemon

#include "metrics.hpp"

#include <algorithm>
#include <stdexcept>

namespace dauth::daemon {

std::string_view to_string(MetricType type) noexcept {
  return type == MetricType::counter ? "counter" : "gauge";
}

const std::vector<MetricInfo>& metric_catalogue() {
  using T = MetricType;
  static const std::vector<MetricInfo> catalogue = {
      // the daemon
      {"dauth_build_info", T::gauge, "Always 1; the version label names the running dauthd.", {"version"}},
      {"dauth_uptime_seconds", T::gauge, "Seconds since dauthd started.", {}},
      {"dauth_keys_loaded", T::gauge, "Keys read from files at start or the last reload (master key and Kpm files).",
       {}},
      {"dauth_reloads_total", T::counter, "Configuration reloads applied (SIGHUP or dauthctl reload).", {}},
      {"dauth_reload_failures_total", T::counter, "Reloads refused; the running configuration was kept.", {}},
      {"dauth_control_requests_total", T::counter, "Request lines received on the control socket.", {}},
      {"dauth_control_requests_failed_total", T::counter,
       "Failure replies on the control socket (refused connections and requests, failed verbs); each is logged.",
       {}},
      {"dauth_control_clients", T::gauge, "Control socket connections open now.", {}},
      {"dauth_sd_notify_sent_total", T::counter, "Messages sent to systemd (sd_notify).", {}},
      {"dauth_sd_notify_failures_total", T::counter, "Messages to systemd that could not be sent.", {}},
      // the DTLS nodes: mef, enrolee, peer
      {"dauth_handshakes_completed_total", T::counter, "DTLS handshakes completed, per node.", {"node"}},
      {"dauth_handshakes_failed_total", T::counter, "DTLS handshakes refused, aborted or timed out, per node.",
       {"node"}},
      {"dauth_handshakes_restarted_total", T::counter,
       "Client handshakes begun again after they stalled on lost datagrams, per node.", {"node"}},
      {"dauth_requests_served_total", T::counter, "CoAP requests answered by the node's handlers.", {"node"}},
      {"dauth_requests_rejected_total", T::counter, "CoAP requests refused before any handler ran.", {"node"}},
      {"dauth_client_requests_failed_total", T::counter, "Requests the node sent that got no response.", {"node"}},
      {"dauth_server_sessions", T::gauge, "Live DTLS server sessions of the node.", {"node"}},
      {"dauth_client_sessions", T::gauge, "Live DTLS client sessions of the node.", {"node"}},
      {"dauth_transport_failures_total", T::counter,
       "Transport failures per node and kind (handshake_failed, handshake_timeout, request_rejected, "
       "request_failed, limit); the log has each one's peer and reason.",
       {"node", "kind"}},
      // the Enrolee role: local AEs
      {"dauth_enrolments_started_total", T::counter, "Enrolment attempts started, all local AEs.", {}},
      {"dauth_enrolments_succeeded_total", T::counter, "Enrolment attempts that succeeded, all local AEs.", {}},
      {"dauth_enrolments_failed_total", T::counter, "Enrolment attempts that failed, all local AEs.", {}},
      {"dauth_enrolment_attempts_total", T::counter, "Enrolment attempts started, per local AE.", {"ae"}},
      {"dauth_enrolment_failures_total", T::counter, "Enrolment attempts that failed, per local AE.", {"ae"}},
      {"dauth_enrolment_state", T::gauge,
       "1 for the local AE's enrolment state (idle, enrolling, enrolled, failed), 0 for the others.",
       {"ae", "state"}},
      {"dauth_credential_expires_in_seconds", T::gauge,
       "Seconds until a credential expires (negative: expired). kind enrolment_key and certificate: a local AE's "
       "(owner = AE-ID); mef_certificate and mef_issuing_ca: the MEF's (owner = MEF FQDN).",
       {"kind", "owner"}},
      // gateway A: the local-AE proxy path
      {"dauth_proxy_requests_total", T::counter, "Requests from local AEs.", {}},
      {"dauth_proxy_forwarded_total", T::counter, "Local AE requests forwarded to a peer and answered.", {}},
      {"dauth_proxy_rejected_total", T::counter, "Local AE requests refused before forwarding.", {}},
      {"dauth_proxy_retries_total", T::counter, "Forwarded requests sent again (first use, timeout).", {}},
      {"dauth_proxy_failed_total", T::counter, "Forwarded requests that failed.", {}},
      {"dauth_proxy_peer_requests_total", T::counter, "Requests forwarded to a configured peer (attempts).",
       {"peer"}},
      {"dauth_proxy_peer_failures_total", T::counter, "Requests to a configured peer that failed (attempts).",
       {"peer"}},
      {"dauth_proxy_peer_retries_total", T::counter, "Requests to a configured peer sent again.", {"peer"}},
      {"dauth_proxy_peer_in_flight", T::gauge, "Requests to a configured peer not answered yet.", {"peer"}},
      // gateway B: the peer endpoint
      {"dauth_peer_requests_total", T::counter, "Requests from peers for local AEs.", {}},
      {"dauth_peer_rejected_total", T::counter, "Peer requests refused before the policy check.", {}},
      {"dauth_peer_impersonation_total", T::counter,
       "Peer requests whose originator was not the authenticated AE.", {}},
      {"dauth_peer_denied_total", T::counter, "Peer requests refused by peer.policy.", {}},
      {"dauth_peer_delivered_total", T::counter, "Peer requests delivered to a local AE and answered.", {}},
      {"dauth_peer_delivery_failed_total", T::counter, "Peer requests the local AE did not answer.", {}},
      // ESPrim (PROTOCOL.md §7): gateway A protects, gateway B opens
      {"dauth_esprim_sent_total", T::counter, "ESPrim objects sent for local AEs (gateway A), resends included.", {}},
      {"dauth_esprim_answered_total", T::counter, "ESPrim-protected requests whose protected answer verified.", {}},
      {"dauth_esprim_failed_total", T::counter,
       "ESPrim-protected requests that failed (refused, unsupported by the peer, no path); each is logged.", {}},
      {"dauth_esprim_answers_rejected_total", T::counter,
       "Protected answers that failed verification (altered on the way, or not from the peer).", {}},
      {"dauth_esprim_rand_requests_total", T::counter, "Receiver rand objects asked for (securityInfo type 3).", {}},
      {"dauth_esprim_requests_total", T::counter, "ESPrim messages received for local AEs (gateway B).", {}},
      {"dauth_esprim_accepted_total", T::counter, "ESPrim objects that passed every check and the policy.", {}},
      {"dauth_esprim_refused_total", T::counter,
       "ESPrim objects refused with an ESPrim code (4111-4116, 5210, 5211, replay); each is logged.", {}},
      {"dauth_esprim_impersonation_total", T::counter,
       "ESPrim objects whose inner originator was not the AE bound to the key (4116).", {}},
      {"dauth_esprim_rand_objects_handed_total", T::counter, "Receiver rand objects handed out (securityInfo type 4).",
       {}},
      {"dauth_esprim_sessions", T::gauge, "ESPrim originator sessions (each with a replay window) held now.", {}},
      {"dauth_esprim_rand_objects", T::gauge, "Receiver rand objects live now.", {}},
      // any peer endpoint: the relay path (docs/relay.md)
      {"dauth_relay_forwarded_total", T::counter,
       "Outer ESPrim messages relayed to the next hop and answered (the answer passed back unchanged).", {}},
      {"dauth_relay_refused_total", T::counter,
       "Relay requests refused (relay off, destination not allowed, not POST /esprim, limit) and hop-session "
       "requests that were no outer ESPrim message.", {}},
      {"dauth_relay_failed_total", T::counter, "Relayed messages the next hop did not answer.", {}},
      {"dauth_key_fetches_succeeded_total", T::counter, "Session keys fetched from an MEF.", {}},
      {"dauth_key_fetches_failed_total", T::counter, "Session key fetches that failed.", {}},
      {"dauth_key_fetches_pending", T::gauge, "Session key fetches in progress.", {}},
      {"dauth_revocation_lists_applied_total", T::counter, "Certificate revocation lists applied.", {}},
      {"dauth_revoked_certificates", T::gauge, "Certificates revoked by the MEFs' lists.", {}},
      // the MEF
      {"dauth_mef_enrolment_keys", T::gauge,
       "Enrolment keys (KeIDs) in the key store by state (valid, expired, revoked).", {"state"}},
      {"dauth_mef_issued_certificates", T::gauge,
       "AE-ID certificates the MEF issued over EST by state (valid, expired, revoked).", {"state"}},
      // the key store
      {"dauth_keystore_records", T::gauge, "Records in the key store.", {}},
      {"dauth_keystore_fdatasync_total", T::counter, "Journal fdatasyncs of the key store.", {}},
      {"dauth_keystore_durable_entries_total", T::counter,
       "Journal entries made durable (more than the fdatasyncs when writes shared one).", {}},
      {"dauth_keystore_fdatasync_seconds_total", T::counter, "Seconds spent waiting in journal fdatasyncs.", {}},
  };
  return catalogue;
}

namespace {

constexpr std::string_view kPrefix = "dauth_";

const MetricInfo& find_metric(std::string_view name) {
  const auto& catalogue = metric_catalogue();
  const auto it = std::find_if(catalogue.begin(), catalogue.end(), [&](const MetricInfo& m) { return m.name == name; });
  if (it == catalogue.end()) throw std::logic_error("metric " + std::string(name) + " is not in the catalogue");
  return *it;
}

// Label values and HELP text: backslash and newline escaped, and the double quote in label values.
std::string escaped(std::string_view text, bool quote) {
  std::string out;
  for (const char c : text) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && quote) {
      out += "\\\"";
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

void MetricSet::add(std::string_view name, const MetricLabels& labels, const nlohmann::json& value) {
  const MetricInfo& info = find_metric(name);
  const bool same_labels = labels.size() == info.labels.size() &&
                           std::all_of(info.labels.begin(), info.labels.end(),
                                       [&](std::string_view l) { return labels.count(std::string(l)) == 1; });
  if (!same_labels) throw std::logic_error("metric " + std::string(name) + ": labels differ from the catalogue's");
  if (!value.is_number()) throw std::logic_error("metric " + std::string(name) + ": value is not a number");
  samples_[info.name].push_back({labels, value});
}

nlohmann::json MetricSet::to_json() const {
  nlohmann::json out = nlohmann::json::object();
  nlohmann::json families = nlohmann::json::array();
  for (const MetricInfo& info : metric_catalogue()) {
    const auto it = samples_.find(info.name);
    if (it == samples_.end()) continue;
    nlohmann::json samples = nlohmann::json::array();
    const std::string short_name(info.name.substr(kPrefix.size()));
    for (const Sample& s : it->second) {
      samples.push_back({{"labels", s.labels}, {"value", s.value}});
      if (s.labels.empty()) out[short_name] = s.value;
      if (s.labels.size() == 1 && s.labels.count("node")) out[s.labels.at("node") + "_" + short_name] = s.value;
    }
    families.push_back({{"name", info.name},
                        {"type", to_string(info.type)},
                        {"help", info.help},
                        {"samples", std::move(samples)}});
  }
  out["metrics"] = std::move(families);
  return out;
}

bool write_prometheus(const nlohmann::json& stats_reply, std::ostream& out) {
  const auto families = stats_reply.find("metrics");
  if (families == stats_reply.end() || !families->is_array()) return false;
  for (const auto& family : *families) {
    const std::string name = family.value("name", "");
    out << "# HELP " << name << " " << escaped(family.value("help", ""), false) << "\n";
    out << "# TYPE " << name << " " << family.value("type", "untyped") << "\n";
    for (const auto& sample : family.value("samples", nlohmann::json::array())) {
      out << name;
      const auto labels = sample.value("labels", nlohmann::json::object());
      if (!labels.empty()) {
        out << "{";
        bool first = true;
        for (const auto& [key, value] : labels.items()) {
          out << (first ? "" : ",") << key << "=\"" << escaped(value.get<std::string>(), true) << "\"";
          first = false;
        }
        out << "}";
      }
      out << " " << sample.value("value", nlohmann::json(0)).dump() << "\n";
    }
  }
  return true;
}

}  // namespace dauth::daemon

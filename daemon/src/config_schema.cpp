// The configuration table (docs/conventions.md §6). docs/dauthd.toml.5 and docs/dauthd.toml.example list exactly these
// keys; tests/daemon/test_config.cpp checks that they agree.
#include "dauth/daemon/config.hpp"

#include <map>
#include <utility>

#include "dauth/rspf/credential_rules.hpp"

namespace dauth::daemon {

namespace {
constexpr std::int64_t kDay = 86400;
constexpr std::int64_t kYear = 365 * kDay;
// Paths: Linux PATH_MAX; the control socket is further limited by sockaddr_un (checked when it is bound).
constexpr std::int64_t kPathMax = 4095;
}  // namespace

const std::vector<SectionSpec>& config_sections() {
  static const std::vector<SectionSpec> sections = {
      {"daemon", false, false, "process settings: state, control socket, master key, logging"},
      {"enrolee", false, true, "Enrolee role: local AEs enrol with their MEF (PROTOCOL.md §3)"},
      {"enrolee.ae", true, false,
       "one local AE and its bootstrap credential: kpm_id + kpm_file, certificate_file + private_key_file, or raw_key"},
      {"mef", false, true, "MEF role: enrolment and key retrieval for enrolees (PROTOCOL.md §3–5)"},
      {"mef.enrolee", true, false,
       "one row of the MEF's enrolee table: a pre-provisioned key (kpm_id), a device certificate (certificate_ae_id) or a "
       "raw public key (rpk)"},
      {"peer", false, true, "Peer role: AE-to-AE sessions over DTLS and the access policy (PROTOCOL.md §4)"},
      {"peer.address", true, false, "static address of a remote AE's dauthd"},
      {"peer.rpk", true, false,
       "a remote AE's raw public key (RFC 7250), pinned: a session proving it authenticates that AE-ID"},
      {"peer.policy", true, false, "access rule: which remote AE may reach which local AEs with which methods"},
      {"peer.hop", true, false,
       "a next hop (CoAP forward proxy or relaying dauthd) that outer ESPrim messages may travel through, reached over "
       "DTLS with a pre-shared key (docs/relay.md)"},
      {"peer.hop_client", true, false,
       "a hop identity the peer endpoint accepts (a proxy or relay forwarding outer ESPrim messages to us); its "
       "sessions authenticate no AE and may carry only outer ESPrim messages"},
      {"relay", false, false,
       "relay: forward outer ESPrim messages (POST /esprim in a coaps:// Proxy-Uri) to allowed destinations through "
       "their [[peer.hop]] (docs/relay.md); needs [peer]"},
  };
  return sections;
}

const std::vector<KeySpec>& config_schema() {
  using T = ValueType;
  using C = ValueCheck;
  // section, name, type, check, min, max, default, required, key_file, unit, doc
  static const std::vector<KeySpec> schema = {
      // [daemon]
      {"daemon", "state_directory", T::path, C::none, 1, kPathMax, "\"/var/lib/dauth\"", false, false, "",
       "directory of the sealed key store (systemd StateDirectory=)"},
      {"daemon", "control_socket", T::path, C::none, 1, kPathMax, "\"/run/dauth/control\"", false, false, "",
       "path of the control socket used by dauthctl"},
      {"daemon", "control_group", T::string, C::group_name, 0, 32, "\"\"", false, false, "",
       "group allowed to use the control socket (mode 0660); empty: only root and dauthd's user (0600)"},
      {"daemon", "master_key_source", T::string, C::master_key_source, 1, 16, "\"credential\"", false, false, "",
       "where the key-store master key comes from: credential (systemd LoadCredentialEncrypted= or LoadCredential=) "
       "or file"},
      {"daemon", "master_key_credential", T::string, C::credential_name, 0, 255, "\"master-key\"", false, true,
       "", "name of the systemd credential holding the master key (64 hex characters)"},
      {"daemon", "master_key_file", T::path, C::none, 1, kPathMax, "", false, true, "",
       "file holding the master key (64 hex characters, mode 0600) when master_key_source = \"file\""},
      {"daemon", "master_key_next_credential", T::string, C::credential_name, 0, 255, "\"master-key-next\"", false,
       true, "",
       "name of the systemd credential holding the next master key of a rotation (dauthd(8) MASTER KEY ROTATION); "
       "when systemd passes none, there is no next key"},
      {"daemon", "master_key_next_file", T::path, C::none, 1, kPathMax, "", false, true, "",
       "file holding the next master key of a rotation when master_key_source = \"file\"; no file, no next key"},
      {"daemon", "pkcs11_module", T::path, C::none, 1, kPathMax, "", false, false, "",
       "PKCS#11 module of the token holding keys given as pkcs11: URIs; absent: the modules p11-kit registers"},
      {"daemon", "pkcs11_pin_credential", T::string, C::credential_name, 1, 255, "\"pkcs11-pin\"", false, true, "",
       "name of the systemd credential holding the token's user PIN (used when a key is a pkcs11: URI)"},
      {"daemon", "pkcs11_pin_file", T::path, C::none, 1, kPathMax, "", false, true, "",
       "file holding the token's user PIN (mode 0600), instead of the credential (runs outside systemd)"},
      {"daemon", "log_level", T::string, C::log_level, 1, 16, "\"info\"", false, false, "",
       "least important messages logged: error, warning, notice, info or debug"},
      {"daemon", "max_control_clients", T::integer, C::none, 1, 64, "8", false, false, "connections",
       "control socket connections served at once; more are refused"},
      {"daemon", "shutdown_timeout", T::integer, C::none, 0, 300, "5", false, false, "seconds",
       "how long SIGTERM waits for requests in flight and running enrolments (the drain, dauthd(8)) before exiting"},

      // [enrolee]
      {"enrolee", "mef_address", T::string, C::remote_address, 1, 260, "", true, false, "",
       "host:port of the MEF's mef.listen (coaps; port 5685 unless that MEF sets another)"},
      {"enrolee", "mef_fqdn", T::string, C::fqdn, 1, 253, "", true, false, "",
       "MEF-FQDN: names the MEF in KpmIDs and KeIDs and is checked against its certificate"},
      {"enrolee", "mef_trust_anchor", T::path, C::none, 1, kPathMax, "", false, false, "",
       "PEM CA certificate(s) that sign the MEF's FQDN certificate (certificate RSPF)"},
      {"enrolee", "local_listen", T::string, C::loopback_address, 1, 64, "\"127.0.0.1:5683\"", false, false, "",
       "loopback address where local AEs send plain CoAP requests (PROTOCOL.md §6)"},
      {"enrolee", "mef_raw_keys", T::string_list, C::public_key_id, 0, 16, "[]", false, false, "",
       "ids of the MEF's raw public keys (mef.raw_key) that AEs bootstrapping with raw_key accept"},

      // [[enrolee.ae]]
      {"enrolee.ae", "id", T::string, C::ae_id, 1, 128, "", true, false, "", "the local AE's AE-ID"},
      {"enrolee.ae", "endpoint", T::string, C::loopback_address, 1, 64, "", false, false, "",
       "loopback address where this AE serves requests; omit if it only sends"},
      {"enrolee.ae", "local_source", T::string, C::loopback_ip, 1, 64, "", false, false, "",
       "loopback IP address (no port: source ports are ephemeral) whose requests are this AE's without oneM2M-FR"},
      {"enrolee.ae", "kpm_id", T::string, C::kpm_id, 1, 318, "", false, false, "",
       "KpmID of the pre-provisioned key: <relative>@<MEF-FQDN>"},
      {"enrolee.ae", "kpm_file", T::path, C::none, 1, kPathMax, "", false, true, "",
       "file holding Kpm (16–64 bytes as hex, mode 0600)"},
      {"enrolee.ae", "certificate_file", T::path, C::none, 1, kPathMax, "", false, false, "",
       "PEM device or AE-ID certificate for the certificate RSPF (instead of kpm_id/kpm_file)"},
      {"enrolee.ae", "private_key_file", T::path, C::private_key, 1, kPathMax, "", false, false, "",
       "PEM private key of certificate_file (mode 0600), or its pkcs11: URI in a token"},
      {"enrolee.ae", "certificate_enrolment", T::boolean, C::none, 0, 0, "false", false, false, "",
       "ask the MEF for an AE-ID certificate (EST) during enrolment"},
      {"enrolee.ae", "raw_key", T::string, C::raw_key_source, 1, 1024, "", false, false, "",
       "\"generate\": this AE's own P-256 raw public key, made on first use and sealed in the key store, or the "
       "pkcs11: URI of one in a token; presented to peers with credential = \"rpk\", and its bootstrap credential "
       "when it has no kpm_id or certificate_file"},
      {"enrolee.ae", "certificate_key", T::string, C::none, 8, 1024, "", false, false, "",
       "pkcs11: URI (RFC 7512) of the EST certificate's key in a token, generated there on first use; omit: sealed in "
       "the store"},

      // [mef]
      {"mef", "fqdn", T::string, C::fqdn, 1, 253, "", true, false, "", "this MEF's MEF-FQDN"},
      {"mef", "listen", T::string, C::listen_address, 1, 64, "\"0.0.0.0:5685\"", false, false, "",
       "address the MEF accepts DTLS on: port 5685, since peer.listen takes the coaps port 5684 on the same host"},
      {"mef", "certificate_file", T::path, C::none, 1, kPathMax, "", false, false, "",
       "PEM certificate chain of the MEF (dNSName = mef.fqdn): serves the certificate RSPF next to PSK"},
      {"mef", "private_key_file", T::path, C::private_key, 1, kPathMax, "", false, false, "",
       "PEM private key of certificate_file (mode 0600), or its pkcs11: URI in a token"},
      {"mef", "issuing_ca_certificate", T::path, C::none, 1, kPathMax, "", false, false, "",
       "PEM CA certificate that signs AE-ID certificates (EST enrolment)"},
      {"mef", "issuing_ca_key", T::path, C::private_key, 1, kPathMax, "", false, false, "",
       "PEM private key of issuing_ca_certificate (mode 0600), or its pkcs11: URI in a token"},
      {"mef", "device_ca", T::path, C::none, 1, kPathMax, "", false, false, "",
       "PEM CA certificate(s) that sign the device certificates of certificate_ae_id enrolees"},
      {"mef", "enrolment_lifetime", T::integer, C::none, 60, kYear, "2592000", false, false, "seconds",
       "Enrolment Expiry of a new Ke, from enrolment"},
      {"mef", "session_key_lifetime", T::integer, C::none, 60, kYear, "86400", false, false, "seconds",
       "lifetime of a usage-constrained key handed to an Enrolment Target"},
      {"mef", "certificate_lifetime", T::integer, C::none, 3600, 3 * kYear, "31536000", false, false, "seconds",
       "validity of an issued AE-ID certificate"},
      {"mef", "raw_key", T::string, C::raw_key_source, 1, 1024, "", false, false, "",
       "\"generate\": the MEF's own P-256 raw public key for rpk enrolees, made on first use and sealed in the key "
       "store, or the pkcs11: URI of one in a token"},

      // [[mef.enrolee]]
      {"mef.enrolee", "kpm_id", T::string, C::kpm_id, 1, 318, "", false, false, "",
       "KpmID the enrolee presents: <relative>@<mef.fqdn> (pre-provisioned key RSPF)"},
      {"mef.enrolee", "kpm_file", T::path, C::none, 1, kPathMax, "", false, true, "",
       "file holding the enrolee's Kpm (16–64 bytes as hex, mode 0600)"},
      {"mef.enrolee", "certificate_ae_id", T::string, C::ae_id, 1, 128, "", false, false, "",
       "AE-ID in the subjectAltName URI of the enrolee's device certificate (certificate RSPF; instead of kpm_id)"},
      {"mef.enrolee", "rpk", T::string, C::public_key_id, 1, 128, "", false, false, "",
       "id of the enrolee's raw public key (RPK-bootstrapped RSPF; instead of kpm_id or certificate_ae_id)"},
      {"mef.enrolee", "enrolee_id", T::string, C::ae_id, 1, 128, "", true, false, "",
       "AE-ID assigned to the enrolee"},
      {"mef.enrolee", "targets", T::string_list, C::ae_id, 0, static_cast<std::int64_t>(rspf::kMaxEnroleeTargets), "[]", false, false, "",
       "AE-IDs the enrolee may talk to (Enrolment Targets)"},
      {"mef.enrolee", "lifetime", T::integer, C::none, 0, rspf::kMaxEnroleeLifetimeS, "0", false, false, "seconds",
       "Enrolment Expiry for this enrolee; 0: mef.enrolment_lifetime"},
      {"mef.enrolee", "certificate_enrolment", T::boolean, C::none, 0, 0, "false", false, false, "",
       "offer EST certificate enrolment to this enrolee"},

      // [peer]
      {"peer", "listen", T::string, C::listen_address, 1, 64, "\"0.0.0.0:5684\"", false, false, "",
       "address peer sessions are accepted on (coaps)"},
      {"peer", "trust_anchors", T::path_list, C::none, 0, 64, "[]", false, false, "",
       "PEM CA certificates (MEF CAs) that sign peers' AE-ID certificates"},
      // docs/transport.md §2: libcoap's own idle default is 300 s; we set it explicitly because it bounds how long
      // libcoap's unwiped copies of session PSKs live (docs/conventions.md §11).
      {"peer", "idle_timeout", T::integer, C::none, 1, kDay, "300", false, false, "seconds",
       "idle time after which a peer session is closed"},
      {"peer", "max_sessions", T::integer, C::none, 1, 65535, "1024", false, false, "sessions",
       "incoming peer sessions held at once"},
      // docs/transport.md §2: the GnuTLS client side select()s per session; glibc aborts near 1024 descriptors.
      {"peer", "max_outgoing_sessions", T::integer, C::none, 1, 900, "256", false, false, "sessions",
       "outgoing peer sessions held at once (GnuTLS limit: below 1000)"},
      {"peer", "max_handshakes", T::integer, C::none, 1, 1000, "100", false, false, "handshakes",
       "DTLS handshakes in progress at once (libcoap default 100)"},
      {"peer", "handshake_timeout", T::integer, C::none, 1, 300, "30", false, false, "seconds",
       "time a DTLS handshake may take"},
      // RFC 7252 §4.7 allows NSTART > 1 where the path is known: both ends of a peer session are dauthds (and still
      // back off on loss), and local AEs are on loopback. 16: bench_proxy, docs/transport.md §7.
      {"peer", "nstart", T::integer, C::none, 1, 32, "16", false, false, "requests",
       "requests (and separate responses) in flight at once on one DTLS session between dauthds (CoAP NSTART)"},
      {"peer", "local_nstart", T::integer, C::none, 1, 32, "16", false, false, "requests",
       "the same for the plain CoAP sessions with local AEs on loopback"},
      {"peer", "legacy_onem2m_options", T::boolean, C::none, 0, 0, "false", false, false, "",
       "also accept the pre-2022 oneM2M CoAP option numbers (FR 256, RQI 257, RSC 265)"},
      {"peer", "raw_key", T::string, C::raw_key_source, 1, 1024, "", false, false, "",
       "\"generate\": the P-256 raw public key the peer endpoint presents to raw-key clients (RFC 7250), made on "
       "first use and sealed in the key store, or the pkcs11: URI of one in a token; dauthctl rpk show prints its id"},
      {"peer", "esprim", T::string, C::esprim_accept, 1, 16, "\"accept\"", false, false, "",
       "accept: answer ESPrim-protected requests (end-to-end protected primitives, PROTOCOL.md §7) for the local AEs "
       "served here; off: refuse them as unsupported"},
      {"peer", "esprim_rand_lifetime", T::integer, C::none, 60, kDay, "3600", false, false, "seconds",
       "lifetime of each receiver rand object handed out for ESPrim; a new one is made when half of it has passed"},
      {"peer", "esprim_max_sessions", T::integer, C::none, 16, 1000000, "4096", false, false, "sessions",
       "ESPrim originator sessions (each with its replay window) per receiver rand object; one more retires the "
       "object early"},

      // [[peer.address]]
      {"peer.address", "ae_id", T::string, C::ae_id, 1, 128, "", true, false, "", "the remote AE's AE-ID"},
      {"peer.address", "address", T::string, C::remote_address, 1, 260, "", true, false, "",
       "host:port of the dauthd that serves it"},
      {"peer.address", "credential", T::string, C::peer_credential, 1, 16, "\"psk\"", false, false, "",
       "how a local AE authenticates to it: psk (enrolment key), certificate (the local AE's AE-ID certificate) or "
       "rpk (the local AE's raw_key; the peer's key pinned by [[peer.rpk]])"},
      {"peer.address", "esprim", T::string, C::esprim_use, 1, 16, "\"off\"", false, false, "",
       "required: every request to this AE is ESPrim-protected end to end (PROTOCOL.md §7), and refused when its "
       "dauthd does not support ESPrim; off: protected by the DTLS session only"},
      {"peer.address", "via", T::string, C::none, 1, 64, "", false, false, "",
       "name of a [[peer.hop]]: outer ESPrim messages to this AE travel through that hop (Proxy-Uri) instead of "
       "directly to address"},

      // [[peer.rpk]]
      {"peer.rpk", "key", T::string, C::public_key_id, 1, 128, "", true, false, "",
       "the key's id: ni:///sha-256;... (RFC 6920), or sha256:<hex> / pin-sha256:... as gnutls-cli and certtool print it"},
      {"peer.rpk", "ae_id", T::string, C::ae_id, 1, 128, "", true, false, "",
       "the remote AE-ID a session with this key authenticates (policy and oneM2M-FR are checked against it)"},

      // [[peer.policy]]
      {"peer.policy", "peer", T::string, C::ae_id_or_any, 1, 128, "", true, false, "",
       "authenticated remote AE-ID, or \"*\" for any authenticated peer"},
      {"peer.policy", "local_aes", T::string_list, C::ae_id, 1, 1024, "", true, false, "",
       "local AE-IDs (ids of [[enrolee.ae]]) the peer may reach"},
      {"peer.policy", "methods", T::string_list, C::coap_method, 1, 7, "[\"GET\"]", false, false, "",
       "CoAP methods allowed: GET, POST, PUT, DELETE, FETCH, PATCH, IPATCH"},

      // [[peer.hop]]
      {"peer.hop", "name", T::string, C::none, 1, 64, "", true, false, "",
       "the hop's name, which peer.address.via refers to"},
      {"peer.hop", "address", T::string, C::remote_address, 1, 260, "", true, false, "",
       "host:port of the hop's DTLS endpoint; a host name is also sent as SNI"},
      {"peer.hop", "identity", T::string, C::none, 1, 128, "", true, false, "",
       "the PSK identity we present to the hop"},
      {"peer.hop", "key_file", T::path, C::none, 1, kPathMax, "", false, true, "",
       "file holding the pre-shared key as hex (32 to 64 bytes, mode 0600); or key_credential"},
      {"peer.hop", "key_credential", T::string, C::credential_name, 1, 255, "", false, true, "",
       "name of the systemd credential holding the pre-shared key as hex (32 to 64 bytes); or key_file"},

      // [[peer.hop_client]]
      {"peer.hop_client", "identity", T::string, C::none, 1, 128, "", true, false, "",
       "the PSK identity the hop presents to the peer endpoint"},
      {"peer.hop_client", "key_file", T::path, C::none, 1, kPathMax, "", false, true, "",
       "file holding its pre-shared key as hex (32 to 64 bytes, mode 0600); or key_credential"},
      {"peer.hop_client", "key_credential", T::string, C::credential_name, 1, 255, "", false, true, "",
       "name of the systemd credential holding its pre-shared key as hex (32 to 64 bytes); or key_file"},

      // [relay]
      {"relay", "enable", T::boolean, C::none, 0, 0, "false", false, false, "",
       "forward outer ESPrim messages that name an allowed destination in their Proxy-Uri"},
      {"relay", "allow", T::string_list, C::remote_address, 0, 1024, "[]", false, false, "",
       "destinations (host:port as the Proxy-Uri names them) this relay forwards to; each needs a [[peer.hop]] with "
       "that address"},
  };
  return schema;
}

// How each key takes effect on reload (config.hpp, Reload). Restart: what is bound, opened or built once at start
// (sockets, the key store and its master key, the nodes' credentials and limits, each role's Enrolee or Mef);
// live: what the roles look up per request or per enrolment (policy, peer addresses, key tables, local AEs'
// endpoints and sources), which Daemon::reload and Roles::reload replace.
const std::vector<ReloadRule>& reload_rules() {
  using R = Reload;
  static const std::vector<ReloadRule> rules = {
      {"daemon", "state_directory", R::restart},
      {"daemon", "control_socket", R::restart},
      {"daemon", "control_group", R::restart},
      {"daemon", "master_key_source", R::restart},
      {"daemon", "master_key_credential", R::restart},
      {"daemon", "master_key_file", R::restart},
      {"daemon", "master_key_next_credential", R::restart},
      {"daemon", "master_key_next_file", R::restart},
      // GnuTLS loads the module once per process, and a process stays logged in to the token from its start: a
      // new PIN (Daemon::reload compares it too) or a new place for it takes effect at the restart.
      {"daemon", "pkcs11_module", R::restart},
      {"daemon", "pkcs11_pin_credential", R::restart},
      {"daemon", "pkcs11_pin_file", R::restart},
      {"daemon", "log_level", R::live},
      {"daemon", "max_control_clients", R::restart},
      {"daemon", "shutdown_timeout", R::live},

      {"enrolee", "mef_address", R::restart},
      {"enrolee", "mef_fqdn", R::restart},
      {"enrolee", "mef_trust_anchor", R::restart},
      {"enrolee", "local_listen", R::restart},
      {"enrolee", "mef_raw_keys", R::restart},

      // An AE's Enrolee is built at start for its kind of bootstrap credential (key or certificate), and an AE
      // with an endpoint becomes an Enrolment Target there: switching either needs a restart, a new value not.
      {"enrolee.ae", "id", R::restart},
      {"enrolee.ae", "endpoint", R::live_while_set},
      {"enrolee.ae", "local_source", R::live},
      {"enrolee.ae", "kpm_id", R::live_while_set},
      {"enrolee.ae", "kpm_file", R::live_while_set},
      {"enrolee.ae", "certificate_file", R::live_while_set},
      {"enrolee.ae", "private_key_file", R::live_while_set},
      {"enrolee.ae", "certificate_enrolment", R::restart},
      {"enrolee.ae", "raw_key", R::restart},
      {"enrolee.ae", "certificate_key", R::restart},

      {"mef", "fqdn", R::restart},
      {"mef", "listen", R::restart},
      {"mef", "certificate_file", R::restart},
      {"mef", "private_key_file", R::restart},
      {"mef", "issuing_ca_certificate", R::restart},
      {"mef", "issuing_ca_key", R::restart},
      {"mef", "device_ca", R::restart},
      {"mef", "enrolment_lifetime", R::live},
      {"mef", "session_key_lifetime", R::restart},
      {"mef", "certificate_lifetime", R::restart},
      {"mef", "raw_key", R::restart},

      {"mef.enrolee", "kpm_id", R::live},
      {"mef.enrolee", "kpm_file", R::live},
      {"mef.enrolee", "certificate_ae_id", R::live},
      {"mef.enrolee", "rpk", R::live},
      {"mef.enrolee", "enrolee_id", R::live},
      {"mef.enrolee", "targets", R::live},
      {"mef.enrolee", "lifetime", R::live},
      {"mef.enrolee", "certificate_enrolment", R::live},

      {"peer", "listen", R::restart},
      {"peer", "trust_anchors", R::restart},
      {"peer", "idle_timeout", R::restart},
      {"peer", "max_sessions", R::restart},
      {"peer", "max_outgoing_sessions", R::restart},
      {"peer", "max_handshakes", R::restart},
      {"peer", "handshake_timeout", R::restart},
      {"peer", "nstart", R::restart},
      {"peer", "local_nstart", R::restart},
      {"peer", "legacy_onem2m_options", R::restart},
      {"peer", "raw_key", R::restart},
      {"peer", "esprim", R::restart},
      {"peer", "esprim_rand_lifetime", R::restart},
      {"peer", "esprim_max_sessions", R::restart},

      {"peer.address", "ae_id", R::live},
      {"peer.address", "address", R::live},
      {"peer.address", "credential", R::live},
      {"peer.address", "esprim", R::live},

      // A pin decides from the next handshake; one removed by a reload also closes that key's live sessions.
      {"peer.rpk", "key", R::live},
      {"peer.rpk", "ae_id", R::live},

      {"peer.policy", "peer", R::live},
      {"peer.policy", "local_aes", R::live},
      {"peer.policy", "methods", R::live},

      // Hops and hop clients are looked up per message and per handshake: a reload replaces the tables (keys read
      // again); live sessions keep the key they were made with.
      {"peer.address", "via", R::live},
      {"peer.hop", "name", R::live},
      {"peer.hop", "address", R::live},
      {"peer.hop", "identity", R::live},
      {"peer.hop", "key_file", R::live},
      {"peer.hop", "key_credential", R::live},
      {"peer.hop_client", "identity", R::live},
      {"peer.hop_client", "key_file", R::live},
      {"peer.hop_client", "key_credential", R::live},
      {"relay", "enable", R::live},
      {"relay", "allow", R::live},
  };
  return rules;
}

Reload reload_rule(std::string_view section, std::string_view name) {
  // Indexed once: a reload looks up every key of every row (10,000 [[mef.enrolee]] rows: 70,000 look-ups).
  static const auto index = [] {
    std::map<std::pair<std::string_view, std::string_view>, Reload> by_key;
    for (const auto& rule : reload_rules()) by_key.emplace(std::pair{rule.section, rule.name}, rule.reload);
    return by_key;
  }();
  const auto it = index.find({section, name});
  // Unreachable for schema keys (test_config.cpp); never claim to apply what we do not know.
  return it == index.end() ? Reload::restart : it->second;
}

}  // namespace dauth::daemon

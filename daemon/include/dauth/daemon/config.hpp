// dauthd configuration: one TOML file (default /etc/dauth/dauthd.toml), described by one table (docs/conventions.md
// §6).
//
// config_schema() is that table: one row per key with its type, range, default and one-line doc. The parser
// accepts nothing else: unknown sections and keys are errors, every value is type- and range-checked, and the
// cross-field rules run once at the end. Every error names the place and the value, e.g.
//   dauthd.toml:14:16: peer.idle_timeout = 0: must be 1–86400 seconds
// All errors of a file are reported together, one per line. parse_config()/load_config() never exit and never
// touch the running daemon: the caller parses into a new Config, validates, then swaps (reload keeps the old
// one on failure). Roles are switched on by the presence of their section: [enrolee], [mef], [peer].
//
// The configuration holds no key material, only the paths to it (secrets travel by file, docs/conventions.md §8);
// load_secrets() reads those files, refusing group/world-accessible ones.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <memory>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "dauth/daemon/log.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::daemon {

inline constexpr std::string_view kDefaultConfigPath = "/etc/dauth/dauthd.toml";

enum class ValueType : std::uint8_t { boolean, integer, string, path, string_list, path_list };

// Syntax checks applied to string values beyond their length.
enum class ValueCheck : std::uint8_t {
  none,
  ae_id,              // PROTOCOL.md §1 (crypto::validate_ae_id)
  ae_id_or_any,       // an AE-ID or "*"
  fqdn,               // RFC 1123 host name
  kpm_id,             // "<relative>@<MEF-FQDN>" (PROTOCOL.md §3.1)
  listen_address,     // IP literal and port: "127.0.0.1:5684", "[::1]:5684", "0.0.0.0:5684"
  remote_address,     // host name or IP literal, and port
  loopback_address,   // 127.0.0.0/8 or [::1], and port (local AEs: PROTOCOL.md §6)
  loopback_ip,        // 127.0.0.0/8 or ::1, no port (a local AE's source address: ports are ephemeral)
  log_level,          // error | warning | notice | info | debug
  master_key_source,  // credential | file
  coap_method,        // GET | POST | PUT | DELETE | FETCH | PATCH | IPATCH
  group_name,         // an existing group (control socket access)
  credential_name,    // a systemd credential name: [A-Za-z0-9_.-]{1,255}
  peer_credential,    // psk | certificate | rpk (how gateway A authenticates a local AE to a peer)
  esprim_accept,      // accept | off (peer.esprim)
  esprim_use,         // off | required (peer.address.esprim)
  public_key_id,      // a raw public key's id: ni:///sha-256;... | sha256:<hex> | pin-sha256:... (stored as ni)
  raw_key_source,     // where our own raw key comes from: "generate" (sealed in the key store)
  private_key,        // a path key (absolute path of a PEM key), or the key's pkcs11: URI (RFC 7512) in a token
};

// One row of the configuration table.
struct KeySpec {
  std::string_view section;        // "daemon", or an array of tables such as "enrolee.ae"
  std::string_view name;
  ValueType type;
  ValueCheck check;
  std::int64_t min;                // integers: smallest value; strings: shortest length; lists: fewest items
  std::int64_t max;                // integers: largest value; strings: longest length; lists: most items
  std::string_view default_value;  // TOML text of the default; empty: required (see required) or unset
  bool required;                   // must be given whenever its section is present
  bool key_file;                   // a path to key material: loaded by load_secrets(), printed (hidden)
  std::string_view unit;           // "seconds", shown in range errors
  std::string_view doc;            // one line, used by the man page and the example config
};

struct SectionSpec {
  std::string_view name;  // "daemon", "peer.policy"
  bool array;             // [[name]]: an array of tables inside its parent section
  bool role;              // presence switches a role on
  std::string_view doc;
};

const std::vector<SectionSpec>& config_sections();
const std::vector<KeySpec>& config_schema();

// The table as dauthd.toml(5) shows it (daemon/src/config_doc.cpp; tests/daemon/test_config.cpp checks that the
// man page holds exactly this text). An integer's allowed values for a reader: "1 to 64 connections", durations
// in words where they are whole hours, days or years ("60 seconds to 1 year"); empty for other types.
std::string describe_range(const KeySpec& spec);
// A section's header and doc line: '.SS "[[enrolee.ae]]"' and its doc.
std::string man_page_section(const SectionSpec& section);
// A key's entry: ".TP", ".B name", "(type, range; default ...)" and its doc as a sentence. The man page may follow it
// with more paragraphs of its own.
std::string man_page_entry(const KeySpec& spec);

// How a changed key takes effect on reload (SIGHUP, dauthctl reload). The one place that decides is the table of
// reload_rules() (config_schema.cpp, next to the schema; tests/daemon/test_config.cpp checks that it names every
// schema key exactly once); Daemon::reload and Roles::reload apply what it calls live.
enum class Reload : std::uint8_t {
  live,            // applied by the reload
  restart,         // bound or built once at start: the running value stays until a restart, and reload says so
  live_while_set,  // a new value is applied; setting or removing it needs a restart (an AE's endpoint)
};
struct ReloadRule {
  std::string_view section;
  std::string_view name;
  Reload reload;
};
const std::vector<ReloadRule>& reload_rules();
Reload reload_rule(std::string_view section, std::string_view name);  // Reload::restart for a key not in the table

using ConfigValue = std::variant<bool, std::int64_t, std::string, std::vector<std::string>>;

// One key's effective value and where it came from (line 0: the default).
struct ConfigEntry {
  const KeySpec* spec = nullptr;
  ConfigValue value;
  std::uint32_t line = 0;
  std::uint32_t column = 0;
};

// One table of the file: a section, or one element of an array of tables (index >= 0).
struct ConfigTable {
  std::string section;
  int index = -1;
  std::uint32_t line = 0;
  std::vector<ConfigEntry> entries;  // schema order, defaults filled in; unset optional keys are absent

  const ConfigEntry* find(std::string_view key) const;
  // "peer.idle_timeout", "peer.policy[2].methods"
  std::string key_path(std::string_view key) const;
};

// ----- the typed view the daemon and the roles use -----

struct DaemonSettings {
  std::filesystem::path state_directory;
  std::filesystem::path control_socket;
  std::string control_group;  // empty: socket 0600 for dauthd's user; else 0660 with this group
  std::string master_key_source;
  std::string master_key_credential;
  std::filesystem::path master_key_file;
  std::string master_key_next_credential;   // rotation: the key dauthd also tries at start (dauthd(8))
  std::filesystem::path master_key_next_file;
  std::string pkcs11_module;  // "": p11-kit's registered modules
  std::string pkcs11_pin_credential;
  std::filesystem::path pkcs11_pin_file;
  log::Level log_level = log::Level::info;
  int max_control_clients = 8;
  int shutdown_timeout = 5;
};

struct LocalAe {
  std::string id;
  std::string endpoint;  // where the AE serves requests (loopback), empty if it only sends
  std::string local_source;  // loopback IP its requests come from (no oneM2M-FR needed; PROTOCOL.md §6); "" none
  std::string kpm_id;
  std::filesystem::path kpm_file;
  std::filesystem::path certificate_file;
  std::filesystem::path private_key_file;
  bool certificate_enrolment = false;
  // Its own raw public key (RFC 7250): "generate" or "" (none). Presented on outgoing peer sessions with credential
  // "rpk"; and its bootstrap credential (RPK-bootstrapped RSPF) when it has neither kpm_id nor certificate_file.
  std::string raw_key;
  bool raw_key_bootstrap() const { return !raw_key.empty() && kpm_id.empty() && certificate_file.empty(); }
  std::string certificate_key;  // pkcs11: URI of the EST key in a token; "" = generated in memory, sealed
};

struct EnroleeSettings {
  std::string mef_address;
  std::string mef_fqdn;
  std::filesystem::path mef_trust_anchor;
  std::string local_listen;
  std::set<std::string> mef_raw_keys;  // the MEF's raw key ids (ni form) that RPK-bootstrapped AEs accept
  std::vector<LocalAe> aes;
};

// One enrolee table row: kpm_id + kpm_file (pre-provisioned key), certificate_ae_id (device certificate, the MEF's
// record "cert:<AE-ID>") or rpk (raw public key id, the MEF's record "rpk:<id>").
struct MefEnrolee {
  std::string kpm_id;
  std::filesystem::path kpm_file;
  std::string certificate_ae_id;
  std::string rpk;
  std::string enrolee_id;
  std::vector<std::string> targets;
  std::int64_t lifetime = 0;  // seconds; 0: mef.enrolment_lifetime
  bool certificate_enrolment = false;
};

struct MefSettings {
  std::string fqdn;
  std::string listen;
  std::filesystem::path certificate_file;
  std::filesystem::path private_key_file;
  std::filesystem::path issuing_ca_certificate;
  std::filesystem::path issuing_ca_key;
  std::filesystem::path device_ca;
  std::int64_t enrolment_lifetime = 0;
  std::int64_t session_key_lifetime = 0;
  std::int64_t certificate_lifetime = 0;
  std::string raw_key;  // "generate" or "": the MEF's own raw key, presented to RPK-bootstrapped enrolees
  std::vector<MefEnrolee> enrolees;
};

struct PeerAddress {
  std::string ae_id;
  std::string address;
  std::string credential = "psk";  // "psk" (KeID + usage-constrained key), "certificate" (the AE's X.509) or
                                   // "rpk" (the AE's raw key; the peer's key pinned by [[peer.rpk]])
  std::string via;  // a [[peer.hop]] name: outer ESPrim messages to this AE go through that hop; "" = direct
  bool esprim_required = false;    // esprim = "required": requests to it travel ESPrim-protected (PROTOCOL.md §7)
};

// Where a hop key comes from: a hex key file, or a systemd credential holding the same text (docs/relay.md).
struct HopKeySource {
  std::filesystem::path key_file;  // set, or else
  std::string key_credential;      // $CREDENTIALS_DIRECTORY/<name>
};

// A next hop ([[peer.hop]]): a CoAP forward proxy or a relaying dauthd, reached over DTLS-PSK (docs/relay.md).
struct PeerHop {
  std::string name;
  std::string address;   // "host:port" of the hop
  std::string identity;  // the PSK identity we present to it
  HopKeySource key;
};

// A hop identity the secure endpoint accepts ([[peer.hop_client]]): its sessions carry outer ESPrim messages only.
struct PeerHopClient {
  std::string identity;
  HopKeySource key;
};

// A raw public key pinned to a remote AE-ID ([[peer.rpk]]).
struct PinnedRawKey {
  std::string key;  // ni:///sha-256;...
  std::string ae_id;
};

struct PolicyRule {
  std::string peer;  // AE-ID or "*"
  std::vector<std::string> local_aes;
  std::vector<std::string> methods;
};

struct PeerSettings {
  std::string listen;
  std::vector<std::filesystem::path> trust_anchors;
  std::int64_t idle_timeout = 0;
  std::int64_t max_sessions = 0;
  std::int64_t max_outgoing_sessions = 0;
  std::int64_t max_handshakes = 0;
  std::int64_t handshake_timeout = 0;
  std::int64_t nstart = 0;        // RFC 7252 §4.7, dauthd↔dauthd DTLS sessions
  std::int64_t local_nstart = 0;  // the same, plain CoAP sessions with local AEs (loopback)
  bool legacy_onem2m_options = false;
  std::vector<PeerAddress> addresses;
  std::vector<PolicyRule> policy;
  std::string raw_key;  // "generate" or "": our raw key, presented by the peer endpoint to raw-key clients
  std::vector<PinnedRawKey> pinned_keys;
  bool esprim_accept = true;              // peer.esprim = "accept"
  std::int64_t esprim_rand_lifetime = 0;  // seconds
  std::int64_t esprim_max_sessions = 0;
  std::vector<PeerHop> hops;               // [[peer.hop]]
  std::vector<PeerHopClient> hop_clients;  // [[peer.hop_client]]
};

// [relay]: this dauthd forwards outer ESPrim messages (POST /esprim in a coaps:// Proxy-Uri) to allowed
// destinations, each reached through the [[peer.hop]] with that address (docs/relay.md).
struct RelaySettings {
  bool enable = false;
  std::vector<std::string> allow;  // "host:port" destinations, as the Proxy-Uri names them
};

struct Config {
  std::string source;  // the file name as given, used in messages
  std::vector<ConfigTable> tables;
  DaemonSettings daemon;
  std::optional<EnroleeSettings> enrolee;
  std::optional<MefSettings> mef;
  std::optional<PeerSettings> peer;
  RelaySettings relay;

  // "enrolee,peer" style list of the roles switched on ("none" when there is none).
  std::string roles() const;
  // The effective configuration as TOML, defaults included, in schema order. Key-file entries carry a trailing
  // "# (hidden)" comment; with secrets, also the key size and fingerprint (never the bytes).
  std::string normalised(const class LoadedSecrets* secrets = nullptr) const;
};

// Parses text (named source_name in messages). Errc::parse for TOML syntax, Errc::invalid_argument otherwise.
Result<Config> parse_config(std::string_view text, std::string_view source_name);
// Reads and parses a file; Errc::io when it cannot be read.
Result<Config> load_config(const std::filesystem::path& file);

// ----- what a reload changes (config_reload.cpp) -----

// The values a running daemon keeps until a restart, by config name: each present role section ("mef"), each
// local AE ("enrolee.ae (CAE-meter)"), every key whose rule is restart ("mef.listen", "enrolee.ae.
// certificate_enrolment (CAE-meter)") and, for live_while_set keys, whether they are set. Taken at start; a
// reload compares the new file's with it, so a change reverted before the restart is no longer pending.
using RestartValues = std::map<std::string, std::string>;
RestartValues restart_values(const Config& config);
// The config names whose value differs between the two (in either direction), sorted.
std::vector<std::string> restart_pending(const RestartValues& running, const RestartValues& fresh);
// The keys a reload from `before` to `after` applies: live keys whose value changed, live_while_set keys whose
// value changed while set on both sides, and rows of the live arrays of tables added or removed
// ("peer.policy[2]"). Local AEs are matched by id ("enrolee.ae.local_source (CAE-meter)"), other rows by position.
std::vector<std::string> live_changes(const Config& before, const Config& after);

// ----- key material named by the configuration -----

// SystemdCredential::later (dauthd --check-config outside systemd): with master_key_source = "credential" and no
// $CREDENTIALS_DIRECTORY, the master key is left out (it comes from LoadCredential= when systemd starts the unit)
// instead of refused.
enum class SystemdCredential : std::uint8_t { required, later };

// The master key and every key file of a Config, loaded into guarded memory. Movable, not copyable.
class LoadedSecrets {
 public:
  struct Key {
    std::string origin;  // "enrolee.ae[0].kpm_file" or "daemon.master_key_credential"
    SecretBuffer key;
  };

  const SecretBuffer& master_key() const { return master_key_; }
  // The next master key of a rotation (daemon.master_key_next_credential or _file); empty when there is none.
  const SecretBuffer& next_master_key() const { return next_master_key_; }
  // The token's user PIN (daemon.pkcs11_pin_file, else the credential daemon.pkcs11_pin_credential if systemd
  // passed it), loaded only when a key of the configuration is a pkcs11: URI; nullptr otherwise. Shared: every key
  // loaded from the token keeps it for GnuTLS's re-logins (transport::TokenKey).
  const std::shared_ptr<const SecretBuffer>& pkcs11_pin() const { return pkcs11_pin_; }
  // The key loaded from a key file path (the path as configured), or nullptr.
  const Key* find_file(const std::filesystem::path& path) const;
  // A hop key ([[peer.hop]], [[peer.hop_client]]) as its source names it (file or systemd credential), or nullptr
  // (a credential left out with SystemdCredential::later).
  const Key* find_hop_key(const HopKeySource& source) const;
  std::size_t size() const {
    return files_.size() + (master_key_.empty() ? 0 : 1) + (next_master_key_.empty() ? 0 : 1);
  }

 private:
  friend Result<LoadedSecrets> load_secrets(const Config& config, SystemdCredential credential);
  friend Result<LoadedSecrets> load_master_keys(const Config& config, SystemdCredential credential);
  SecretBuffer master_key_;
  SecretBuffer next_master_key_;
  std::shared_ptr<const SecretBuffer> pkcs11_pin_;
  std::map<std::string, Key> files_;
  std::map<std::string, Key> credentials_;  // hop keys given as key_credential, by credential name
};

// Loads the master key (daemon.master_key_source) and every key file of config. Fails closed (docs/conventions.md §12):
// the first unreadable, group/world-accessible or malformed file is an error naming the key, file and reason.
// With keys in a token (pkcs11: URIs): the PIN, then each such key loaded once from the token (so that a wrong PIN,
// a missing token or a missing key is said at start and at reload, naming the config key, the URI and the reason).
Result<LoadedSecrets> load_secrets(const Config& config, SystemdCredential credential = SystemdCredential::required);
// The master keys alone, as load_secrets() loads them: the current one (required) and the next one of a rotation (a
// missing credential or file is no next key; an unreadable or malformed one is an error). A master-key rotation
// reads them again to learn which keys the next start will try (dauthd(8) MASTER KEY ROTATION).
Result<LoadedSecrets> load_master_keys(const Config& config, SystemdCredential credential = SystemdCredential::required);

}  // namespace dauth::daemon

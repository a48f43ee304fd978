// Parsing and validating dauthd.toml against config_schema() (docs/conventions.md §5–6): parse into a new value, check
// every key, then the cross-field rules, and only then build the typed view. Nothing here exits or logs.
#include "dauth/daemon/config.hpp"

#include <arpa/inet.h>
#include <grp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <set>
#include <tuple>
#include <sstream>
#include <toml++/toml.h>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/key_file.hpp"
#include "dauth/crypto/keystore.hpp"
#include "dauth/crypto/x509.hpp"
#include "dauth/crypto/token.hpp"
#include "dauth/rspf/credential_rules.hpp"
#include "dauth/transport/address.hpp"
#include "dauth/transport/transport.hpp"
#include "secret_file.hpp"

namespace dauth::daemon {

namespace {

// ----- rendering values for messages and for the normalised config -----

std::string toml_quote(std::string_view text) {
  std::string out = "\"";
  for (const char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", u);
      out += escaped;
    } else {
      out += c;
    }
  }
  out += '"';
  return out;
}

std::string render(const ConfigValue& value) {
  if (const auto* b = std::get_if<bool>(&value)) return *b ? "true" : "false";
  if (const auto* i = std::get_if<std::int64_t>(&value)) return std::to_string(*i);
  if (const auto* s = std::get_if<std::string>(&value)) return toml_quote(*s);
  const auto& list = std::get<std::vector<std::string>>(value);
  std::string out = "[";
  for (std::size_t i = 0; i < list.size(); ++i) out += (i ? ", " : "") + toml_quote(list[i]);
  return out + "]";
}

// A node as it appeared, shortened for an error message.
std::string render_node(const toml::node& node) {
  if (node.is_table()) return "{...}";
  std::string out;
  if (const auto* s = node.as_string()) {
    out = toml_quote(s->get());
  } else if (const auto* i = node.as_integer()) {
    out = std::to_string(i->get());
  } else if (const auto* f = node.as_floating_point()) {
    std::ostringstream text;
    text << f->get();
    out = text.str();
  } else if (const auto* b = node.as_boolean()) {
    out = b->get() ? "true" : "false";
  } else if (node.is_array()) {
    out = "[...]";
  } else {
    out = "(date/time)";
  }
  constexpr std::size_t kMaxShown = 72;
  if (out.size() > kMaxShown) out = out.substr(0, kMaxShown) + "...";
  return out;
}

std::string_view type_word(ValueType type) {
  switch (type) {
    case ValueType::boolean: return "a boolean (true or false)";
    case ValueType::integer: return "an integer";
    case ValueType::string: return "a string";
    case ValueType::path: return "a string holding an absolute path";
    case ValueType::string_list: return "an array of strings";
    case ValueType::path_list: return "an array of absolute paths";
  }
  return "a value";
}

std::string range_text(const KeySpec& spec) {
  std::string text = std::to_string(spec.min) + "–" + std::to_string(spec.max);
  if (!spec.unit.empty()) text += " " + std::string(spec.unit);
  return text;
}

// ----- string syntax checks: each returns what is wrong and what is allowed, or an empty string -----

std::string one_of(std::string_view value, std::initializer_list<std::string_view> allowed) {
  for (const auto a : allowed) {
    if (a == value) return {};
  }
  std::string text = "must be one of";
  for (const auto a : allowed) text += " " + std::string(a);
  return text;
}

std::string check_string(ValueCheck check, const std::string& value) {
  switch (check) {
    case ValueCheck::none: return {};
    case ValueCheck::ae_id_or_any:
      if (value == "*") return {};
      [[fallthrough]];
    case ValueCheck::ae_id: {
      auto r = crypto::validate_ae_id(value);
      return r ? std::string() : r.error().message;
    }
    case ValueCheck::fqdn: {
      auto r = crypto::validate_fqdn(value);
      return r ? std::string() : r.error().message;
    }
    case ValueCheck::kpm_id: {
      auto r = crypto::validate_kpm_id(value);
      return r ? std::string() : r.error().message;
    }
    case ValueCheck::remote_address: {
      auto parsed = transport::parse_host_port(value);  // the one host:port syntax (dauth/transport/address.hpp)
      return parsed ? std::string() : parsed.error().message;
    }
    case ValueCheck::listen_address:
    case ValueCheck::loopback_address: {
      auto parsed = transport::parse_host_port(value);
      if (!parsed) return parsed.error().message;
      auto address = transport::numeric_address(parsed->host, parsed->port);
      if (!address) return "must be an IP address and port (a listen address is bound, not resolved)";
      // PROTOCOL.md §6: local AEs speak plain CoAP, which must never leave the host.
      if (check == ValueCheck::loopback_address && !transport::is_loopback(address->get())) {
        return "must be a loopback address (127.0.0.0/8 or [::1]) and port";
      }
      return {};
    }
    case ValueCheck::loopback_ip:
      // A source address, not an endpoint: the AE's source port changes with every socket it opens.
      return transport::is_loopback_ip(value) ? ""
                                              : "must be a loopback IP address (127.0.0.0/8 or ::1), without port";
    case ValueCheck::log_level: return one_of(value, {"error", "warning", "notice", "info", "debug"});
    case ValueCheck::master_key_source: return one_of(value, {"credential", "file"});
    case ValueCheck::peer_credential: return one_of(value, {"psk", "certificate", "rpk"});
    case ValueCheck::esprim_accept: return one_of(value, {"accept", "off"});
    case ValueCheck::esprim_use: return one_of(value, {"off", "required"});
    case ValueCheck::public_key_id: {
      auto r = crypto::canonical_public_key_id(value);
      return r ? std::string() : r.error().message;
    }
    case ValueCheck::raw_key_source:
      // "generate": ours, sealed in the store; a pkcs11: URI: a key in a token (loaded at start and reload).
      if (crypto::is_pkcs11_uri(value)) {
        auto checked = transport::check_token_key_uri(value);
        return checked ? std::string() : checked.error().message;
      }
      return value == "generate" ? std::string()
                                 : "must be \"generate\" or the pkcs11: URI (RFC 7512) of a private key in a token";
    case ValueCheck::coap_method:
      return one_of(value, {"GET", "POST", "PUT", "DELETE", "FETCH", "PATCH", "IPATCH"});
    case ValueCheck::group_name: {
      if (value.empty()) return {};
      group entry{};
      group* found = nullptr;
      std::vector<char> buffer(16384);
      if (::getgrnam_r(value.c_str(), &entry, buffer.data(), buffer.size(), &found) != 0 || found == nullptr) {
        return "no such group on this system";
      }
      return {};
    }
    case ValueCheck::private_key: return {};  // Parser::convert: a path, or a URI checked by transport
    case ValueCheck::credential_name:
      for (const char c : value) {
        const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
                        c == '.' || c == '-';
        if (!ok) return "must be a systemd credential name: letters, digits, _ . - only";
      }
      return {};
  }
  return {};
}

// ----- the parser -----

class Parser {
 public:
  explicit Parser(std::string source) : source_(std::move(source)) {}

  void error(const toml::source_region& where, const std::string& message) {
    error_at(where.begin.line, where.begin.column, message);
  }
  void error_at(std::uint32_t line, std::uint32_t column, const std::string& message) {
    std::string text = source_;
    if (line > 0) text += ":" + std::to_string(line) + ":" + std::to_string(column);
    errors_.push_back({line, column, text + ": " + message});
  }
  void error_entry(const ConfigTable& table, const ConfigEntry& entry, const std::string& message) {
    error_at(entry.line, entry.column, table.key_path(entry.spec->name) + " = " + render(entry.value) + ": " +
                                           message);
  }
  bool failed() const { return !errors_.empty(); }
  // In file order, so that the first line printed is the first problem in the file.
  std::string joined() const {
    auto sorted = errors_;
    std::stable_sort(sorted.begin(), sorted.end(), [](const Message& a, const Message& b) {
      return std::tie(a.line, a.column) < std::tie(b.line, b.column);
    });
    std::string text;
    for (const auto& e : sorted) text += (text.empty() ? "" : "\n") + e.text;
    return text;
  }

  void parse_root(const toml::table& root, std::vector<ConfigTable>& out);
  void check_cross_fields(const std::vector<ConfigTable>& tables);

 private:
  void parse_table(const toml::table& table, const SectionSpec& section, int index,
                   std::vector<ConfigTable>& out);
  std::optional<ConfigValue> convert(const KeySpec& spec, const std::string& path, const toml::node& node);

  struct Message {
    std::uint32_t line;
    std::uint32_t column;
    std::string text;
  };
  std::string source_;
  std::vector<Message> errors_;
};

const SectionSpec* find_section(std::string_view name) {
  for (const auto& s : config_sections()) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

const KeySpec* find_key(std::string_view section, std::string_view name) {
  for (const auto& k : config_schema()) {
    if (k.section == section && k.name == name) return &k;
  }
  return nullptr;
}

std::string allowed_keys(std::string_view section) {
  std::string text;
  for (const auto& k : config_schema()) {
    if (k.section == section) text += (text.empty() ? "" : ", ") + std::string(k.name);
  }
  for (const auto& s : config_sections()) {
    const std::string prefix = std::string(section) + ".";
    if (s.array && s.name.substr(0, prefix.size()) == prefix) {
      text += (text.empty() ? "[[" : ", [[") + std::string(s.name) + "]]";
    }
  }
  return text;
}

ConfigValue default_of(const KeySpec& spec) {
  // Defaults are written as TOML text in the table so that the man page can show them verbatim.
  const auto doc = toml::parse("v = " + std::string(spec.default_value));
  const toml::node& node = *doc.get("v");
  switch (spec.type) {
    case ValueType::boolean: return node.as_boolean()->get();
    case ValueType::integer: return node.as_integer()->get();
    case ValueType::string:
    case ValueType::path: return node.as_string()->get();
    case ValueType::string_list:
    case ValueType::path_list: {
      std::vector<std::string> list;
      for (const auto& item : *node.as_array()) list.push_back(item.as_string()->get());
      return list;
    }
  }
  return false;
}

std::optional<ConfigValue> Parser::convert(const KeySpec& spec, const std::string& path, const toml::node& node) {
  const auto bad = [&](const std::string& why) {
    error(node.source(), path + " = " + render_node(node) + ": " + why);
    return std::nullopt;
  };
  const auto check_text = [&](const std::string& text) -> std::string {
    const auto length = static_cast<std::int64_t>(text.size());
    if (spec.check == ValueCheck::private_key && crypto::is_pkcs11_uri(text)) {
      if (auto uri = transport::check_token_key_uri(text); !uri) return uri.error().message;
      if (length > spec.max) return "length " + std::to_string(length) + ": at most " + std::to_string(spec.max);
      return {};
    }
    if (spec.type == ValueType::path || spec.type == ValueType::path_list) {
      if (text.empty() || text.front() != '/') {
        return spec.check == ValueCheck::private_key ? "must be an absolute path or a pkcs11: URI (RFC 7512)"
                                                     : "must be an absolute path";
      }
    }
    if (length < spec.min || length > spec.max) {
      if (spec.min > 0 && text.empty()) return "must not be empty";
      return "length " + std::to_string(length) + ": must be " + std::to_string(spec.min) + "–" +
             std::to_string(spec.max) + " characters";
    }
    return check_string(spec.check, text);
  };

  switch (spec.type) {
    case ValueType::boolean:
      if (const auto* b = node.as_boolean()) return ConfigValue(b->get());
      return bad(std::string("must be ") + std::string(type_word(spec.type)));
    case ValueType::integer: {
      const auto* i = node.as_integer();
      if (!i) return bad("must be an integer (" + range_text(spec) + ")");
      if (i->get() < spec.min || i->get() > spec.max) return bad("must be " + range_text(spec));
      return ConfigValue(i->get());
    }
    case ValueType::string:
    case ValueType::path: {
      const auto* s = node.as_string();
      if (!s) return bad(std::string("must be ") + std::string(type_word(spec.type)));
      const auto why = check_text(s->get());
      if (!why.empty() && crypto::is_pkcs11_uri(s->get())) {
        // Not quoted back: the URI may carry a PIN (the reason quotes it when it does not).
        error(node.source(), path + ": " + why);
        return std::nullopt;
      }
      if (!why.empty()) return bad(why);
      return ConfigValue(s->get());
    }
    case ValueType::string_list:
    case ValueType::path_list: {
      const auto* array = node.as_array();
      if (!array) return bad(std::string("must be ") + std::string(type_word(spec.type)));
      const auto count = static_cast<std::int64_t>(array->size());
      if (count < spec.min || count > spec.max) {
        return bad(std::to_string(count) + " items: must have " + std::to_string(spec.min) + "–" +
                   std::to_string(spec.max));
      }
      std::vector<std::string> list;
      bool ok = true;
      for (std::size_t i = 0; i < array->size(); ++i) {
        const toml::node& item = *array->get(i);
        const std::string item_path = path + "[" + std::to_string(i) + "]";
        const auto* s = item.as_string();
        if (!s) {
          error(item.source(), item_path + " = " + render_node(item) + ": must be a string");
          ok = false;
          continue;
        }
        // Lists hold item values of a string type; length limits apply to the list, syntax to each item.
        std::string why;
        if (spec.type == ValueType::path_list && (s->get().empty() || s->get().front() != '/')) {
          why = "must be an absolute path";
        } else {
          why = check_string(spec.check, s->get());
        }
        if (!why.empty()) {
          error(item.source(), item_path + " = " + render_node(item) + ": " + why);
          ok = false;
          continue;
        }
        if (std::find(list.begin(), list.end(), s->get()) != list.end()) {
          error(item.source(), item_path + " = " + render_node(item) + ": listed twice");
          ok = false;
          continue;
        }
        list.push_back(s->get());
      }
      if (!ok) return std::nullopt;
      return ConfigValue(std::move(list));
    }
  }
  return std::nullopt;
}

void Parser::parse_table(const toml::table& table, const SectionSpec& section, int index,
                         std::vector<ConfigTable>& out) {
  ConfigTable result;
  result.section = std::string(section.name);
  result.index = index;
  result.line = table.source().begin.line;
  std::vector<std::pair<const toml::array*, const SectionSpec*>> children;

  for (const auto& [key, node] : table) {
    const std::string name(key.str());
    const std::string path = result.key_path(name);
    if (const KeySpec* spec = find_key(section.name, name)) {
      if (auto value = convert(*spec, path, node)) {
        const auto where = node.source().begin;
        result.entries.push_back({spec, std::move(*value), where.line, where.column});
      }
      continue;
    }
    const SectionSpec* child = find_section(std::string(section.name) + "." + name);
    if (child && child->array && index < 0) {
      if (const auto* array = node.as_array(); array && array->is_array_of_tables()) {
        children.emplace_back(array, child);
      } else {
        error(key.source(), path + ": must be an array of tables: write [[" + std::string(child->name) +
                                "]] for each entry");
      }
      continue;
    }
    error(key.source(), path + ": unknown key; allowed in " +
                            (index < 0 ? "[" + std::string(section.name) + "]"
                                       : "[[" + std::string(section.name) + "]]") +
                            ": " + allowed_keys(section.name));
  }

  // Schema order, defaults filled in, required keys enforced.
  std::vector<ConfigEntry> ordered;
  for (const auto& spec : config_schema()) {
    if (spec.section != section.name) continue;
    auto given = std::find_if(result.entries.begin(), result.entries.end(),
                              [&](const ConfigEntry& e) { return e.spec == &spec; });
    if (given != result.entries.end()) {
      ordered.push_back(std::move(*given));
    } else if (!spec.default_value.empty()) {
      ordered.push_back({&spec, default_of(spec), 0, 0});
    } else if (spec.required) {
      error(table.source(), result.key_path(spec.name) + ": missing; required (" + std::string(spec.doc) + ")");
    }
  }
  ordered.shrink_to_fit();  // kept for the daemon's life: one exact allocation per table, not a doubling's slack
  result.entries = std::move(ordered);
  out.push_back(std::move(result));

  for (const auto& [array, child] : children) {
    int child_index = 0;
    for (const auto& element : *array) parse_table(*element.as_table(), *child, child_index++, out);
  }
}

void Parser::parse_root(const toml::table& root, std::vector<ConfigTable>& out) {
  bool have_daemon = false;
  for (const auto& [key, node] : root) {
    const std::string name(key.str());
    const SectionSpec* section = find_section(name);
    if (!section || section->array) {
      error(key.source(), name + ": unknown section; allowed: [daemon], [enrolee], [mef], [peer]");
      continue;
    }
    const auto* table = node.as_table();
    if (!table) {
      error(key.source(), name + " = " + render_node(node) + ": must be a table: write [" + name + "]");
      continue;
    }
    have_daemon = have_daemon || name == "daemon";
    parse_table(*table, *section, -1, out);
  }
  if (!have_daemon) {
    // [daemon] may be omitted entirely: every key in it has a default.
    toml::table empty;
    parse_table(empty, *find_section("daemon"), -1, out);
  }
}

// ----- cross-field rules (docs/conventions.md §6: checked once, at the end) -----

const ConfigTable* find_table(const std::vector<ConfigTable>& tables, std::string_view section) {
  for (const auto& t : tables) {
    if (t.section == section && t.index < 0) return &t;
  }
  return nullptr;
}

std::vector<const ConfigTable*> array_tables(const std::vector<ConfigTable>& tables, std::string_view section) {
  std::vector<const ConfigTable*> out;
  for (const auto& t : tables) {
    if (t.section == section) out.push_back(&t);
  }
  return out;
}

const std::string* text_of(const ConfigTable* table, std::string_view key) {
  if (!table) return nullptr;
  const ConfigEntry* e = table->find(key);
  return e ? std::get_if<std::string>(&e->value) : nullptr;
}

std::string where_of(const std::string& source, const ConfigTable& table, const ConfigEntry& entry) {
  if (entry.line == 0) return table.key_path(entry.spec->name) + " (default)";
  return table.key_path(entry.spec->name) + " (" + source + ":" + std::to_string(entry.line) + ")";
}

void Parser::check_cross_fields(const std::vector<ConfigTable>& tables) {
  const ConfigTable* daemon = find_table(tables, "daemon");
  const ConfigTable* enrolee = find_table(tables, "enrolee");
  const ConfigTable* mef = find_table(tables, "mef");
  const ConfigTable* peer = find_table(tables, "peer");

  // Master key: the source named must be configured.
  if (daemon) {
    const ConfigEntry* source = daemon->find("master_key_source");
    const auto& kind = std::get<std::string>(source->value);
    if (kind == "file" && !daemon->find("master_key_file")) {
      error_entry(*daemon, *source, "needs daemon.master_key_file");
    }
    if (kind == "credential" && text_of(daemon, "master_key_credential")->empty()) {
      error_entry(*daemon, *daemon->find("master_key_credential"),
                  "must name a credential when master_key_source = \"credential\"");
    }
  }

  // Local AEs: unique ids, exactly one bootstrap credential each, KpmIDs issued by the configured MEF.
  std::set<std::string> local_ae_ids;
  std::map<std::string, const ConfigTable*> local_sources;
  const auto aes = array_tables(tables, "enrolee.ae");
  if (enrolee && aes.empty()) {
    error_at(enrolee->line, 1, "[enrolee]: needs at least one [[enrolee.ae]] (the local AEs it enrols)");
  }
  for (const ConfigTable* ae : aes) {
    const ConfigEntry* id = ae->find("id");
    if (!id) continue;
    if (!local_ae_ids.insert(std::get<std::string>(id->value)).second) {
      error_entry(*ae, *id, "AE-ID listed twice in [[enrolee.ae]]");
    }
    // A source address maps to one AE (the proxy takes a request from it as that AE's).
    if (const ConfigEntry* source = ae->find("local_source")) {
      const auto& address = std::get<std::string>(source->value);
      const auto [first, inserted] = local_sources.emplace(address, ae);
      if (!inserted) {
        error_entry(*ae, *source, "already " + where_of(source_, *first->second,
                                                           *first->second->find("local_source")) +
                                      "; a source address maps to one AE");
      }
    }
    const bool has_kpm_id = ae->find("kpm_id") != nullptr;
    const bool has_kpm_file = ae->find("kpm_file") != nullptr;
    const bool has_cert = ae->find("certificate_file") != nullptr;
    const bool has_key = ae->find("private_key_file") != nullptr;
    const ConfigEntry* raw_key = ae->find("raw_key");
    if (has_kpm_id != has_kpm_file) {
      error_entry(*ae, *id, "kpm_id and kpm_file go together: give both or neither");
    }
    if (has_cert != has_key) {
      error_entry(*ae, *id, "certificate_file and private_key_file go together: give both or neither");
    }
    // Its raw key is the bootstrap credential of an AE that has no other (RPK-bootstrapped RSPF).
    if (has_kpm_id == has_cert && has_kpm_id == has_kpm_file && has_cert == has_key && (has_kpm_id || !raw_key)) {
      error_entry(*ae, *id, "needs exactly one bootstrap credential: kpm_id + kpm_file, certificate_file + "
                            "private_key_file, or raw_key");
    }
    if (raw_key && !has_kpm_id && !has_cert && enrolee &&
        std::get<std::vector<std::string>>(enrolee->find("mef_raw_keys")->value).empty()) {
      error_entry(*ae, *raw_key, "bootstraps with its raw key and needs enrolee.mef_raw_keys (the MEF's raw key ids)");
    }
    if (raw_key && std::get<bool>(ae->find("certificate_enrolment")->value)) {
      error_entry(*ae, *ae->find("certificate_enrolment"),
                  "cannot go with raw_key: the AE-ID certificate would replace the raw key kept under the AE-ID");
    }
    if (has_cert && enrolee && !enrolee->find("mef_trust_anchor")) {
      error_entry(*ae, *ae->find("certificate_file"),
                  "needs enrolee.mef_trust_anchor (the CA of the MEF's certificate) for the certificate RSPF");
    }
    // The EST key in a token: a key URI without a PIN (crypto::Token checks the rest when it is used), and only for
    // an AE that asks for a certificate. A URI with a PIN is not quoted.
    if (const ConfigEntry* key = ae->find("certificate_key")) {
      const auto& uri = std::get<std::string>(key->value);
      if (auto checked = transport::check_token_key_uri(uri); !checked && crypto::is_pkcs11_uri(uri)) {
        // Not quoted back: the URI may carry a PIN (the reason quotes it when it does not).
        error_at(key->line, key->column, ae->key_path("certificate_key") + ": " + checked.error().message);
      } else if (!crypto::is_pkcs11_uri(uri)) {
        error_entry(*ae, *key, "must be a pkcs11: URI (RFC 7512), e.g. \"pkcs11:token=dauth;object=" +
                                   std::get<std::string>(id->value) + "\"");
      } else if (!std::get<bool>(ae->find("certificate_enrolment")->value)) {
        error_entry(*ae, *key, "needs certificate_enrolment = true (it is the key of the EST certificate)");
      }
    }
    // The bootstrap key's rule is rspf's, as for dauthctl credentials add (Enrolee::use_bootstrap_key).
    const std::string* mef_fqdn = text_of(enrolee, "mef_fqdn");
    if (const ConfigEntry* kpm_id = ae->find("kpm_id"); kpm_id && mef_fqdn) {
      if (auto named = rspf::check_kpm_id_names_mef(std::get<std::string>(kpm_id->value), *mef_fqdn); !named) {
        error_entry(*ae, *kpm_id, named.error().message + " (enrolee.mef_fqdn)");
      }
    }
  }

  // MEF: paired files, unique enrolees, KpmIDs of this MEF, certificate enrolment needs an issuing CA.
  if (mef) {
    const std::pair<std::string_view, std::string_view> pairs[] = {
        {"certificate_file", "private_key_file"}, {"issuing_ca_certificate", "issuing_ca_key"}};
    for (const auto& [a, b] : pairs) {
      const ConfigEntry* ea = mef->find(a);
      const ConfigEntry* eb = mef->find(b);
      if ((ea == nullptr) != (eb == nullptr)) {
        error_entry(*mef, ea ? *ea : *eb, "mef." + std::string(a) + " and mef." + std::string(b) +
                                              " go together: give both or neither");
      }
    }
    const ConfigEntry* enrolment = mef->find("enrolment_lifetime");
    const ConfigEntry* session = mef->find("session_key_lifetime");
    if (std::get<std::int64_t>(session->value) > std::get<std::int64_t>(enrolment->value)) {
      error_entry(*mef, *session, "must not exceed " + where_of(source_, *mef, *enrolment) + " = " +
                                      render(enrolment->value) + ": keys derived from Ke expire with it");
    }
  }
  // MEF enrolee rows: the row rules are rspf's (check_enrolee_row), the same as for dauthctl enrolees add; here
  // only what a file adds: the key comes from kpm_file, and each identity is listed once.
  std::set<std::string> kpm_ids;
  std::set<std::string> certificate_ae_ids;
  std::set<std::string> rpk_ids;
  rspf::MefOffer offer;
  if (mef) {
    offer.fqdn = *text_of(mef, "fqdn");
    offer.serves_x509 = mef->find("certificate_file") && mef->find("device_ca");
    offer.issues_certificates = mef->find("issuing_ca_certificate") != nullptr;
    offer.serves_rpk = mef->find("raw_key") != nullptr;
  }
  for (const ConfigTable* row : array_tables(tables, "mef.enrolee")) {
    const ConfigEntry* kpm_id = row->find("kpm_id");
    const ConfigEntry* kpm_file = row->find("kpm_file");
    const ConfigEntry* certificate_ae_id = row->find("certificate_ae_id");
    rspf::EnroleeRow checked;
    if (kpm_id) checked.kpm_id = std::get<std::string>(kpm_id->value);
    checked.has_key = kpm_file != nullptr;
    if (certificate_ae_id) checked.certificate_ae_id = std::get<std::string>(certificate_ae_id->value);
    const ConfigEntry* rpk = row->find("rpk");
    if (rpk) checked.rpk = std::get<std::string>(rpk->value);
    checked.enrolee_id = std::get<std::string>(row->find("enrolee_id")->value);
    checked.targets = std::get<std::vector<std::string>>(row->find("targets")->value);
    checked.lifetime = std::get<std::int64_t>(row->find("lifetime")->value);
    checked.certificate_enrolment = std::get<bool>(row->find("certificate_enrolment")->value);
    if (mef) {
      for (const auto& problem : rspf::check_enrolee_row(checked, offer)) {
        const ConfigEntry* at = row->find(problem.field);
        if (!at && problem.field == "kpm_id") at = kpm_file;
        if (!at) at = kpm_id ? kpm_id : kpm_file ? kpm_file : certificate_ae_id ? certificate_ae_id : rpk;
        if (at) {
          error_entry(*row, *at, problem.message);
        } else {
          error_at(row->line, 1, "mef.enrolee[" + std::to_string(row->index) + "]: " + problem.message);
        }
      }
    }
    if (certificate_ae_id && !certificate_ae_ids.insert(checked.certificate_ae_id).second) {
      error_entry(*row, *certificate_ae_id, "AE-ID listed twice as certificate_ae_id in [[mef.enrolee]]");
    }
    if (rpk) {
      const auto canonical = crypto::canonical_public_key_id(checked.rpk);
      if (canonical && !rpk_ids.insert(*canonical).second) {
        error_entry(*row, *rpk, "key listed twice in [[mef.enrolee]]");
      }
    }
    if (!kpm_id) continue;
    // "k@MEF.example" and "k@mef.example" are one KpmID.
    const auto canonical = crypto::canonical_kpm_id(checked.kpm_id);
    if (canonical && !kpm_ids.insert(*canonical).second) {
      error_entry(*row, *kpm_id, "KpmID listed twice in [[mef.enrolee]]");
    }
  }

  // Addresses bound by different roles must differ: both are UDP sockets.
  struct Bound {
    const ConfigTable* table;
    const char* key;
  };
  const Bound bound[] = {{enrolee, "local_listen"}, {mef, "listen"}, {peer, "listen"}};
  for (std::size_t i = 0; i < std::size(bound); ++i) {
    for (std::size_t j = i + 1; j < std::size(bound); ++j) {
      if (!bound[i].table || !bound[j].table) continue;
      const ConfigEntry* a = bound[i].table->find(bound[i].key);
      const ConfigEntry* b = bound[j].table->find(bound[j].key);
      const auto pa = transport::parse_host_port(std::get<std::string>(a->value));
      const auto pb = transport::parse_host_port(std::get<std::string>(b->value));
      if (!pa || !pb) continue;
      if (pa->port == pb->port) {
        const ConfigEntry& shown = b->line ? *b : *a;
        const ConfigTable& shown_table = b->line ? *bound[j].table : *bound[i].table;
        const ConfigEntry& other = b->line ? *a : *b;
        const ConfigTable& other_table = b->line ? *bound[i].table : *bound[j].table;
        error_entry(shown_table, shown, "UDP port " + std::to_string(pa->port) + " is also used by " +
                                            where_of(source_, other_table, other) + " = " + render(other.value) +
                                            "; each role needs its own port");
      }
    }
  }

  // Peer: unique static addresses; the policy names local AEs that exist.
  std::set<std::string> remote_ids;
  for (const ConfigTable* row : array_tables(tables, "peer.address")) {
    const ConfigEntry* id = row->find("ae_id");
    if (id && !remote_ids.insert(std::get<std::string>(id->value)).second) {
      error_entry(*row, *id, "AE-ID listed twice in [[peer.address]]");
    }
    const ConfigEntry* credential = row->find("credential");
    if (peer && credential && std::get<std::string>(credential->value) == "certificate" &&
        std::get<std::vector<std::string>>(peer->find("trust_anchors")->value).empty()) {
      error_entry(*row, *credential, "needs peer.trust_anchors (the CAs of the peers' AE-ID certificates)");
    }
  }
  std::map<std::string, const ConfigTable*> pinned;
  for (const ConfigTable* row : array_tables(tables, "peer.rpk")) {
    const ConfigEntry* key = row->find("key");
    if (!key) continue;
    const auto canonical = crypto::canonical_public_key_id(std::get<std::string>(key->value));
    if (!canonical) continue;
    // One key authenticates one AE-ID: the handshake's grant names it.
    if (const auto [first, inserted] = pinned.emplace(*canonical, row); !inserted) {
      error_entry(*row, *key, "already pinned by " + where_of(source_, *first->second, *first->second->find("key")) +
                                  "; a key authenticates one AE-ID");
    }
  }
  // Raw public keys are a GnuTLS feature of libcoap (RFC 7250): an OpenSSL build refuses them here, not at the first
  // handshake.
  if (!transport::backend_supports_rpk()) {
    const std::pair<const ConfigTable*, const char*> uses[] = {{peer, "raw_key"}, {mef, "raw_key"}};
    for (const auto& [table, key] : uses) {
      if (const ConfigEntry* entry = table ? table->find(key) : nullptr) {
        error_entry(*table, *entry, "raw public keys need the GnuTLS build of dauthd (this one uses " +
                                        std::string(transport::to_string(transport::compiled_backend())) + ")");
      }
    }
    for (const char* section : {"enrolee.ae", "peer.rpk", "mef.enrolee"}) {
      for (const ConfigTable* row : array_tables(tables, section)) {
        for (const char* key : {"raw_key", "key", "rpk"}) {
          if (const ConfigEntry* entry = row->find(key)) {
            error_entry(*row, *entry, "raw public keys need the GnuTLS build of dauthd (this one uses " +
                                          std::string(transport::to_string(transport::compiled_backend())) + ")");
          }
        }
      }
    }
  }
  for (const ConfigTable* rule : array_tables(tables, "peer.policy")) {
    const ConfigEntry* locals = rule->find("local_aes");
    if (!locals) continue;
    for (const auto& id : std::get<std::vector<std::string>>(locals->value)) {
      if (!local_ae_ids.count(id)) {
        error_entry(*rule, *locals, "names " + toml_quote(id) + ", which is not the id of any [[enrolee.ae]]");
      }
    }
  }
  // Hops (docs/relay.md): unique names and identities, exactly one key source each, every via names a hop, and
  // every relay destination has the hop that authenticates it.
  std::map<std::string, const ConfigTable*> hop_names;
  std::set<std::string> hop_addresses;
  for (const ConfigTable* row : array_tables(tables, "peer.hop")) {
    const ConfigEntry* name = row->find("name");
    if (name && !hop_names.emplace(std::get<std::string>(name->value), row).second) {
      error_entry(*row, *name, "hop name listed twice in [[peer.hop]]");
    }
    if (const ConfigEntry* address = row->find("address")) hop_addresses.insert(std::get<std::string>(address->value));
  }
  std::set<std::string> hop_client_ids;
  for (const char* section : {"peer.hop", "peer.hop_client"}) {
    for (const ConfigTable* row : array_tables(tables, section)) {
      const bool file = row->find("key_file") != nullptr;
      const bool credential = row->find("key_credential") != nullptr;
      if (file == credential) {
        error_at(row->line, 1, std::string("[[") + section + "]] needs exactly one of key_file and key_credential");
      }
      const ConfigEntry* identity = row->find("identity");
      if (identity && std::string_view(section) == "peer.hop_client" &&
          !hop_client_ids.insert(std::get<std::string>(identity->value)).second) {
        error_entry(*row, *identity, "identity listed twice in [[peer.hop_client]]");
      }
    }
  }
  for (const ConfigTable* row : array_tables(tables, "peer.address")) {
    const ConfigEntry* via = row->find("via");
    if (via && !hop_names.count(std::get<std::string>(via->value))) {
      error_entry(*row, *via, "names no [[peer.hop]] (hop names: " +
                                  (hop_names.empty() ? std::string("none") : [&] {
                                    std::string names;
                                    for (const auto& [n, t] : hop_names) names += (names.empty() ? "" : ", ") + n;
                                    return names;
                                  }()) + ")");
    }
    // A hop carries only outer ESPrim messages; without ESPrim the requests would go straight to address, around
    // the path the operator configured.
    const ConfigEntry* esprim = row->find("esprim");
    if (via && (!esprim || std::get<std::string>(esprim->value) != "required")) {
      error_entry(*row, *via, "needs esprim = \"required\" in the same [[peer.address]]: a hop carries only "
                              "ESPrim-protected requests (PROTOCOL.md §7)");
    }
  }
  if (const ConfigTable* relay = find_table(tables, "relay")) {
    if (!peer) error_at(relay->line, 1, "[relay] needs the [peer] section (it relays on the peer endpoint)");
    if (const ConfigEntry* allow = relay->find("allow")) {
      for (const auto& destination : std::get<std::vector<std::string>>(allow->value)) {
        if (!hop_addresses.count(destination)) {
          error_entry(*relay, *allow, "destination " + toml_quote(destination) +
                                          " has no [[peer.hop]] with that address (its credentials authenticate "
                                          "the next hop)");
        }
      }
    }
  }
  if (!peer) {
    for (const char* child : {"peer.address", "peer.policy", "peer.rpk", "peer.hop", "peer.hop_client"}) {
      if (const auto rows = array_tables(tables, child); !rows.empty()) {
        error_at(rows.front()->line, 1, std::string("[[") + child + "]] needs the [peer] section");
      }
    }
  }
}

// ----- the typed view -----

template <class T>
T get(const ConfigTable& table, std::string_view key, T fallback = T{}) {
  const ConfigEntry* e = table.find(key);
  if (!e) return fallback;
  return std::get<T>(e->value);
}

std::filesystem::path get_path(const ConfigTable& table, std::string_view key) {
  return get<std::string>(table, key);
}

// DNS names and KpmIDs enter the typed view in their one canonical form (PROTOCOL.md §1), so that every lookup and
// comparison after the parser agrees whatever case the file used. The values were validated before this.
std::string get_fqdn(const ConfigTable& table, std::string_view key) {
  return crypto::canonical_fqdn(get<std::string>(table, key));
}
std::string get_kpm_id(const ConfigTable& table, std::string_view key) {
  const std::string given = get<std::string>(table, key);
  return given.empty() ? given : crypto::canonical_kpm_id(given).value();
}

void build_typed(Config& config) {
  for (const ConfigTable& t : config.tables) {
    if (t.section == "daemon") {
      auto& d = config.daemon;
      d.state_directory = get_path(t, "state_directory");
      d.control_socket = get_path(t, "control_socket");
      d.control_group = get<std::string>(t, "control_group");
      d.master_key_source = get<std::string>(t, "master_key_source");
      d.master_key_credential = get<std::string>(t, "master_key_credential");
      d.master_key_file = get_path(t, "master_key_file");
      d.master_key_next_credential = get<std::string>(t, "master_key_next_credential");
      d.master_key_next_file = get_path(t, "master_key_next_file");
      d.pkcs11_module = get<std::string>(t, "pkcs11_module");
      d.pkcs11_pin_credential = get<std::string>(t, "pkcs11_pin_credential");
      d.pkcs11_pin_file = get_path(t, "pkcs11_pin_file");
      d.log_level = log::level_from_string(get<std::string>(t, "log_level")).value_or(log::Level::info);
      d.max_control_clients = static_cast<int>(get<std::int64_t>(t, "max_control_clients"));
      d.shutdown_timeout = static_cast<int>(get<std::int64_t>(t, "shutdown_timeout"));
    } else if (t.section == "enrolee") {
      auto& e = config.enrolee.emplace();
      e.mef_address = get<std::string>(t, "mef_address");
      e.mef_fqdn = get_fqdn(t, "mef_fqdn");
      e.mef_trust_anchor = get_path(t, "mef_trust_anchor");
      e.local_listen = get<std::string>(t, "local_listen");
      for (const auto& id : get<std::vector<std::string>>(t, "mef_raw_keys")) {
        e.mef_raw_keys.insert(crypto::canonical_public_key_id(id).value());
      }
    } else if (t.section == "mef") {
      auto& m = config.mef.emplace();
      m.fqdn = get_fqdn(t, "fqdn");
      m.listen = get<std::string>(t, "listen");
      m.certificate_file = get_path(t, "certificate_file");
      m.private_key_file = get_path(t, "private_key_file");
      m.issuing_ca_certificate = get_path(t, "issuing_ca_certificate");
      m.issuing_ca_key = get_path(t, "issuing_ca_key");
      m.device_ca = get_path(t, "device_ca");
      m.enrolment_lifetime = get<std::int64_t>(t, "enrolment_lifetime");
      m.session_key_lifetime = get<std::int64_t>(t, "session_key_lifetime");
      m.certificate_lifetime = get<std::int64_t>(t, "certificate_lifetime");
      m.raw_key = get<std::string>(t, "raw_key");
    } else if (t.section == "peer") {
      auto& p = config.peer.emplace();
      p.listen = get<std::string>(t, "listen");
      for (const auto& a : get<std::vector<std::string>>(t, "trust_anchors")) p.trust_anchors.emplace_back(a);
      p.idle_timeout = get<std::int64_t>(t, "idle_timeout");
      p.max_sessions = get<std::int64_t>(t, "max_sessions");
      p.max_outgoing_sessions = get<std::int64_t>(t, "max_outgoing_sessions");
      p.max_handshakes = get<std::int64_t>(t, "max_handshakes");
      p.handshake_timeout = get<std::int64_t>(t, "handshake_timeout");
      p.nstart = get<std::int64_t>(t, "nstart");
      p.local_nstart = get<std::int64_t>(t, "local_nstart");
      p.legacy_onem2m_options = get<bool>(t, "legacy_onem2m_options");
      p.esprim_accept = get<std::string>(t, "esprim") == "accept";
      p.esprim_rand_lifetime = get<std::int64_t>(t, "esprim_rand_lifetime");
      p.esprim_max_sessions = get<std::int64_t>(t, "esprim_max_sessions");
      p.raw_key = get<std::string>(t, "raw_key");
    }
  }
  // Array elements follow their parent section in tables, so the parents exist by now.
  for (const ConfigTable& t : config.tables) {
    if (t.section == "enrolee.ae" && config.enrolee) {
      LocalAe ae;
      ae.id = get<std::string>(t, "id");
      ae.endpoint = get<std::string>(t, "endpoint");
      ae.local_source = get<std::string>(t, "local_source");
      ae.kpm_id = get_kpm_id(t, "kpm_id");
      ae.kpm_file = get_path(t, "kpm_file");
      ae.certificate_file = get_path(t, "certificate_file");
      ae.private_key_file = get_path(t, "private_key_file");
      ae.certificate_enrolment = get<bool>(t, "certificate_enrolment");
      ae.raw_key = get<std::string>(t, "raw_key");
      ae.certificate_key = get<std::string>(t, "certificate_key");
      config.enrolee->aes.push_back(std::move(ae));
    } else if (t.section == "mef.enrolee" && config.mef) {
      MefEnrolee row;
      row.kpm_id = get_kpm_id(t, "kpm_id");
      row.kpm_file = get_path(t, "kpm_file");
      row.certificate_ae_id = get<std::string>(t, "certificate_ae_id");
      if (const std::string rpk = get<std::string>(t, "rpk"); !rpk.empty()) {
        row.rpk = crypto::canonical_public_key_id(rpk).value();
      }
      row.enrolee_id = get<std::string>(t, "enrolee_id");
      row.targets = get<std::vector<std::string>>(t, "targets");
      row.lifetime = get<std::int64_t>(t, "lifetime");
      if (row.lifetime == 0) row.lifetime = config.mef->enrolment_lifetime;
      row.certificate_enrolment = get<bool>(t, "certificate_enrolment");
      config.mef->enrolees.push_back(std::move(row));
    } else if (t.section == "peer.address" && config.peer) {
      config.peer->addresses.push_back({get<std::string>(t, "ae_id"), get<std::string>(t, "address"),
                                        get<std::string>(t, "credential"), get<std::string>(t, "via"),
                                        get<std::string>(t, "esprim") == "required"});
    } else if (t.section == "peer.hop" && config.peer) {
      config.peer->hops.push_back({get<std::string>(t, "name"), get<std::string>(t, "address"),
                                   get<std::string>(t, "identity"),
                                   {get_path(t, "key_file"), get<std::string>(t, "key_credential")}});
    } else if (t.section == "peer.hop_client" && config.peer) {
      config.peer->hop_clients.push_back(
          {get<std::string>(t, "identity"), {get_path(t, "key_file"), get<std::string>(t, "key_credential")}});
    } else if (t.section == "relay") {
      config.relay.enable = get<bool>(t, "enable");
      config.relay.allow = get<std::vector<std::string>>(t, "allow");
    } else if (t.section == "peer.rpk" && config.peer) {
      config.peer->pinned_keys.push_back(
          {crypto::canonical_public_key_id(get<std::string>(t, "key")).value(), get<std::string>(t, "ae_id")});
    } else if (t.section == "peer.policy" && config.peer) {
      config.peer->policy.push_back({get<std::string>(t, "peer"), get<std::vector<std::string>>(t, "local_aes"),
                                     get<std::vector<std::string>>(t, "methods")});
    }
  }
}

}  // namespace

const ConfigEntry* ConfigTable::find(std::string_view key) const {
  for (const auto& e : entries) {
    if (e.spec->name == key) return &e;
  }
  return nullptr;
}

std::string ConfigTable::key_path(std::string_view key) const {
  std::string path = section;
  if (index >= 0) path += "[" + std::to_string(index) + "]";
  return path + "." + std::string(key);
}

std::string Config::roles() const {
  std::string text;
  if (enrolee) text += "enrolee";
  if (mef) text += std::string(text.empty() ? "" : ",") + "mef";
  if (peer) text += std::string(text.empty() ? "" : ",") + "peer";
  return text.empty() ? "none" : text;
}

std::string Config::normalised(const LoadedSecrets* secrets) const {
  std::string text = "# dauthd effective configuration from " + source + " (defaults included)\n";
  for (const ConfigTable& table : tables) {
    text += table.index < 0 ? "\n[" + table.section + "]\n" : "\n[[" + table.section + "]]\n";
    for (const ConfigEntry& e : table.entries) {
      text += std::string(e.spec->name) + " = " + render(e.value);
      if (e.spec->key_file) {
        // The file name is not secret; its content is, and is never printed (docs/conventions.md §7).
        text += "  # key (hidden)";
        const LoadedSecrets::Key* key = nullptr;
        if (secrets && e.spec->name == "master_key_credential" && daemon.master_key_source == "credential") {
          if (!secrets->master_key().empty()) {
            text += ": " + std::to_string(secrets->master_key().size()) + " bytes, fingerprint " +
                    secrets->master_key().fingerprint();
          }
        } else if (secrets && e.spec->name == "master_key_file" && daemon.master_key_source == "file") {
          if (!secrets->master_key().empty()) {
            text += ": " + std::to_string(secrets->master_key().size()) + " bytes, fingerprint " +
                    secrets->master_key().fingerprint();
          }
        } else if (secrets && !secrets->next_master_key().empty() &&
                   ((e.spec->name == "master_key_next_credential" && daemon.master_key_source == "credential") ||
                    (e.spec->name == "master_key_next_file" && daemon.master_key_source == "file"))) {
          text += ": " + std::to_string(secrets->next_master_key().size()) + " bytes, fingerprint " +
                  secrets->next_master_key().fingerprint();
        } else if (secrets && e.spec->name == "key_credential" &&
                   (key = secrets->find_hop_key(HopKeySource{{}, std::get<std::string>(e.value)})) != nullptr) {
          text += ": " + std::to_string(key->key.size()) + " bytes, fingerprint " + key->key.fingerprint();
        } else if (secrets && (key = secrets->find_file(std::get<std::string>(e.value))) != nullptr) {
          text += ": " + std::to_string(key->key.size()) + " bytes, fingerprint " + key->key.fingerprint();
        }
      }
      text += "\n";
    }
  }
  return text;
}

Result<Config> parse_config(std::string_view text, std::string_view source_name) {
  Parser parser{std::string(source_name)};
  Config config;
  config.source = std::string(source_name);
  try {
    const toml::table root = toml::parse(text, source_name);
    parser.parse_root(root, config.tables);
  } catch (const toml::parse_error& e) {
    parser.error(e.source(), "TOML syntax: " + std::string(e.description()));
    return make_error(Errc::parse, parser.joined());
  }
  if (!parser.failed()) parser.check_cross_fields(config.tables);
  if (parser.failed()) return make_error(Errc::invalid_argument, parser.joined());
  config.tables.shrink_to_fit();  // held as long as the daemon runs (10,000 [[mef.enrolee]] rows: 1 MB of slack)
  build_typed(config);
  if (config.mef) config.mef->enrolees.shrink_to_fit();
  return config;
}

Result<Config> load_config(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    return make_error(Errc::io, file.string() + ": cannot read configuration: " + std::strerror(errno));
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return make_error(Errc::io, file.string() + ": read error");
  return parse_config(text.str(), file.string());
}

// ----- key material -----

const LoadedSecrets::Key* LoadedSecrets::find_file(const std::filesystem::path& path) const {
  const auto it = files_.find(path.string());
  return it == files_.end() ? nullptr : &it->second;
}

const LoadedSecrets::Key* LoadedSecrets::find_hop_key(const HopKeySource& source) const {
  if (!source.key_file.empty()) return find_file(source.key_file);
  const auto it = credentials_.find(source.key_credential);
  return it == credentials_.end() ? nullptr : &it->second;
}

namespace {

Error secret_error(const Config& config, const ConfigTable& table, std::string_view key, const Error& e) {
  const ConfigEntry* entry = table.find(key);
  std::string where = config.source;
  if (entry && entry->line) where += ":" + std::to_string(entry->line) + ":" + std::to_string(entry->column);
  return make_error(e.code, where + ": " + table.key_path(key) + ": " + e.message);
}

// A PIN is short text (PKCS#11 leaves its length to the token; 256 bytes is far above any token's limit).
constexpr std::size_t kMaxPinBytes = 256;

// The PIN file's content without its one optional trailing newline; Errc::parse if nothing is left.
Result<SecretBuffer> read_pin_file(const std::filesystem::path& path) {
  auto text = crypto::read_key_file(path, "PKCS#11 PIN file", kMaxPinBytes);
  if (!text) return std::move(text).error();
  if (text->size() > kMaxPinBytes) {
    return make_error(Errc::parse, path.string() + ": longer than " + std::to_string(kMaxPinBytes) + " bytes");
  }
  std::size_t length = text->size();
  if (length > 0 && text->data()[length - 1] == '\n') --length;
  if (length == 0) return make_error(Errc::parse, path.string() + ": empty (the token's user PIN, one line)");
  return text->slice(0, length);
}

// The keys of the configuration given as pkcs11: URIs.
std::vector<std::pair<const ConfigTable*, const ConfigEntry*>> token_key_entries(const Config& config) {
  std::vector<std::pair<const ConfigTable*, const ConfigEntry*>> out;
  for (const ConfigTable& table : config.tables) {
    for (const ConfigEntry& entry : table.entries) {
      if (entry.spec->check != ValueCheck::private_key && entry.spec->check != ValueCheck::raw_key_source) continue;
      if (crypto::is_pkcs11_uri(std::get<std::string>(entry.value))) out.emplace_back(&table, &entry);
    }
  }
  return out;
}

// The token's PIN, then every token key loaded once with it: what start and reload say about a wrong PIN, a
// missing token or a missing key, before any role is built or changed.
template <typename Fail>
Result<void> load_token_secrets(const Config& config, SystemdCredential credential,
                                std::shared_ptr<const SecretBuffer>& pin, const Fail& fail) {
  const auto keys = token_key_entries(config);
  // EST keys generated in the token (enrolee.ae.certificate_key) need the PIN too; they may not exist yet, so they
  // are not loaded here.
  bool generates_keys = false;
  if (config.enrolee) {
    for (const auto& ae : config.enrolee->aes) generates_keys |= !ae.certificate_key.empty();
  }
  if (keys.empty() && !generates_keys) return ok_result();
  const auto& d = config.daemon;
  const ConfigTable* daemon_table = find_table(config.tables, "daemon");
  const char* directory = std::getenv("CREDENTIALS_DIRECTORY");
  const bool have_directory = directory != nullptr && *directory != '\0';
  if (!d.pkcs11_pin_file.empty()) {
    auto read = read_pin_file(d.pkcs11_pin_file);
    if (!read) return fail(*daemon_table, "pkcs11_pin_file", read.error());
    pin = std::make_shared<const SecretBuffer>(std::move(read).value());
  } else if (have_directory) {
    // systemd LoadCredential= (systemd.exec(5)): $CREDENTIALS_DIRECTORY/<name>. Absent: a token without a PIN.
    const std::filesystem::path path = std::filesystem::path(directory) / d.pkcs11_pin_credential;
    std::error_code ignored;
    if (std::filesystem::exists(path, ignored)) {
      auto read = read_pin_file(path);
      if (!read) return fail(*daemon_table, "pkcs11_pin_credential", read.error());
      pin = std::make_shared<const SecretBuffer>(std::move(read).value());
    }
  } else if (credential == SystemdCredential::later) {
    return ok_result();  // the PIN comes with the credentials when systemd starts the unit: keys checked then
  }
  // Another module than the running one is a restart's (reload_rules): the keys are checked with the running one.
  if (auto module = transport::use_pkcs11_module(d.pkcs11_module);
      !module && module.error().code != Errc::invalid_argument) {
    return fail(*daemon_table, "pkcs11_module", module.error());
  }
  for (const auto& [table, entry] : keys) {
    const std::string& uri = std::get<std::string>(entry->value);
    auto loaded = transport::check_token_key(transport::TokenKey{uri, pin});
    if (!loaded) return fail(*table, entry->spec->name, loaded.error());
  }
  return ok_result();
}

}  // namespace

Result<LoadedSecrets> load_master_keys(const Config& config, SystemdCredential credential) {
  LoadedSecrets secrets;
  const auto& d = config.daemon;
  const ConfigTable* daemon_table = find_table(config.tables, "daemon");
  const auto fail = [&](std::string_view key, const Error& e) {
    return secret_error(config, *daemon_table, key, e);
  };
  // The next key of a rotation: absent (no credential passed, no file) is normal; anything else must load.
  const auto take_next = [&](Result<SecretBuffer> key, std::string_view config_key) -> Result<void> {
    if (!key && key.error().code == Errc::not_found) return ok_result();
    if (!key) return fail(config_key, key.error());
    secrets.next_master_key_ = std::move(key).value();
    return ok_result();
  };

  if (d.master_key_source == "file") {
    auto key = crypto::load_master_key_file(d.master_key_file);
    if (!key) return fail("master_key_file", key.error());
    secrets.master_key_ = std::move(key).value();
    if (!d.master_key_next_file.empty()) {
      if (auto next = take_next(crypto::load_master_key_file(d.master_key_next_file), "master_key_next_file");
          !next) {
        return std::move(next).error();
      }
    }
  } else {
    // systemd LoadCredential= (systemd.exec(5)): $CREDENTIALS_DIRECTORY/<name>, readable only by us.
    const char* directory = std::getenv("CREDENTIALS_DIRECTORY");
    if ((!directory || !*directory) && credential == SystemdCredential::later) {
      // Left out: the caller says where it will come from.
    } else if (!directory || !*directory) {
      return fail("master_key_credential",
                  make_error(Errc::not_found, "credential " + toml_quote(d.master_key_credential) +
                                                  ": $CREDENTIALS_DIRECTORY is not set (not started by systemd "
                                                  "with LoadCredential=); use master_key_source = \"file\""));
    } else {
      auto key = crypto::load_master_key_credential(d.master_key_credential);
      if (!key) return fail("master_key_credential", key.error());
      secrets.master_key_ = std::move(key).value();
      if (!d.master_key_next_credential.empty()) {
        if (auto next = take_next(crypto::load_master_key_credential(d.master_key_next_credential),
                                  "master_key_next_credential");
            !next) {
          return std::move(next).error();
        }
      }
    }
  }
  return secrets;
}

Result<LoadedSecrets> load_secrets(const Config& config, SystemdCredential credential) {
  // Sizes: master key 32 bytes (keystore.hpp kMasterKeySize); Kpm at least 16 bytes (PROTOCOL.md §3.1), at most 64.
  constexpr std::size_t kKpmMinBytes = 16;
  constexpr std::size_t kKpmMaxBytes = 64;
  auto master_keys = load_master_keys(config, credential);
  if (!master_keys) return std::move(master_keys).error();
  LoadedSecrets secrets = std::move(master_keys).value();
  const auto fail = [&](const ConfigTable& table, std::string_view key, const Error& e) {
    return secret_error(config, table, key, e);
  };

  if (auto token = load_token_secrets(config, credential, secrets.pkcs11_pin_, fail); !token) {
    return std::move(token).error();
  }

  for (const ConfigTable& table : config.tables) {
    if (table.section != "enrolee.ae" && table.section != "mef.enrolee") continue;
    const ConfigEntry* entry = table.find("kpm_file");
    if (!entry) continue;
    const auto& path = std::get<std::string>(entry->value);
    if (secrets.files_.count(path)) continue;
    auto key = detail::read_hex_key_file(path, kKpmMinBytes, kKpmMaxBytes);
    if (!key) return fail(table, "kpm_file", key.error());
    secrets.files_.emplace(path, LoadedSecrets::Key{table.key_path("kpm_file"), std::move(key).value()});
  }
  // Hop keys (docs/relay.md): the Kpm file format, at least 256 bits (a static key that guards a whole hop).
  constexpr std::size_t kHopKeyMinBytes = 32;
  const char* directory = std::getenv("CREDENTIALS_DIRECTORY");
  const bool have_directory = directory != nullptr && *directory != '\0';
  for (const ConfigTable& table : config.tables) {
    if (table.section != "peer.hop" && table.section != "peer.hop_client") continue;
    if (const ConfigEntry* entry = table.find("key_file")) {
      const auto& path = std::get<std::string>(entry->value);
      if (secrets.files_.count(path)) continue;
      auto key = detail::read_hex_key_file(path, kHopKeyMinBytes, kKpmMaxBytes);
      if (!key) return fail(table, "key_file", key.error());
      secrets.files_.emplace(path, LoadedSecrets::Key{table.key_path("key_file"), std::move(key).value()});
    } else if (const ConfigEntry* credential_entry = table.find("key_credential")) {
      const auto& name = std::get<std::string>(credential_entry->value);
      if (secrets.credentials_.count(name)) continue;
      if (!have_directory) {
        if (credential == SystemdCredential::later) continue;  // comes with the unit's LoadCredential=
        return fail(table, "key_credential",
                    make_error(Errc::not_found, "credential " + toml_quote(name) +
                                                    ": $CREDENTIALS_DIRECTORY is not set (not started by systemd "
                                                    "with LoadCredential=); use key_file"));
      }
      // systemd LoadCredential= (systemd.exec(5)): $CREDENTIALS_DIRECTORY/<name>, the key file format.
      auto key = detail::read_hex_key_file(std::filesystem::path(directory) / name, kHopKeyMinBytes, kKpmMaxBytes);
      if (!key) return fail(table, "key_credential", key.error());
      secrets.credentials_.emplace(name,
                                   LoadedSecrets::Key{table.key_path("key_credential"), std::move(key).value()});
    }
  }
  return secrets;
}

}  // namespace dauth::daemon

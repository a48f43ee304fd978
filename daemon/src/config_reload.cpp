// What a reload changes: the keys it applies and the ones that wait for a restart, both by config name, decided by
// the reload rules of the configuration table (config_schema.cpp).
#include <sys/stat.h>

#include <algorithm>
#include <set>

#include "dauth/daemon/config.hpp"

namespace dauth::daemon {

namespace {

bool is_live_array(std::string_view section) {
  return section == "mef.enrolee" || section == "peer.address" || section == "peer.policy" ||
         section == "peer.rpk";
}

std::string id_of_ae(const ConfigTable& table) {
  const ConfigEntry* id = table.find("id");
  return id ? std::get<std::string>(id->value) : std::string();
}

// A table's name in messages: "mef", "enrolee.ae (CAE-meter)" (local AEs by id: their position may change),
// "peer.policy[2]".
std::string table_name(const ConfigTable& table) {
  if (table.section == "enrolee.ae") return "enrolee.ae (" + id_of_ae(table) + ")";
  if (table.index >= 0) return table.section + "[" + std::to_string(table.index) + "]";
  return table.section;
}

// A key's name in messages: "mef.listen", "enrolee.ae.endpoint (CAE-meter)", "peer.policy[2].methods".
std::string key_name(const ConfigTable& table, std::string_view key) {
  if (table.section == "enrolee.ae") return "enrolee.ae." + std::string(key) + " (" + id_of_ae(table) + ")";
  return table.key_path(key);
}

std::string value_text(const ConfigValue& value) {
  struct Text {
    std::string operator()(bool b) const { return b ? "true" : "false"; }
    std::string operator()(std::int64_t n) const { return std::to_string(n); }
    std::string operator()(const std::string& s) const { return "\"" + s + "\""; }
    std::string operator()(const std::vector<std::string>& list) const {
      std::string text = "[";
      for (const auto& item : list) text += (text.size() > 1 ? ", \"" : "\"") + item + "\"";
      return text + "]";
    }
  };
  return std::visit(Text{}, value);
}

// A file read once at start (a certificate, CA or key file) can be renewed in place under the same name: its
// identity and time stamps count as part of its value, so that a reload names it as needing a restart instead of
// saying nothing. Written again with the same bytes it is named too: only a restart reads it, so only a restart can
// tell. Directories and sockets (state_directory, control_socket) are compared by name only.
std::string restart_value_text(const ConfigEntry& entry) {
  std::string text = value_text(entry.value);
  if (entry.spec->type != ValueType::path) return text;
  struct stat st {};
  const auto& path = std::get<std::string>(entry.value);
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return text;
  return text + " (file " + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + ", " +
         std::to_string(st.st_size) + " bytes, modified " + std::to_string(st.st_mtim.tv_sec) + "." +
         std::to_string(st.st_mtim.tv_nsec) + ")";
}

std::map<std::string, const ConfigTable*> tables_by_name(const Config& config) {
  std::map<std::string, const ConfigTable*> out;
  for (const auto& table : config.tables) out.emplace(table_name(table), &table);
  return out;
}

}  // namespace

RestartValues restart_values(const Config& config) {
  RestartValues values;
  for (const ConfigTable& table : config.tables) {
    if (!is_live_array(table.section)) values[table_name(table)] = "present";  // a role section, a local AE
    for (const ConfigEntry& entry : table.entries) {
      if (table.section == "enrolee.ae" && entry.spec->name == "id") continue;  // the AE's own name, above
      switch (reload_rule(table.section, entry.spec->name)) {
        case Reload::live: break;
        case Reload::restart: values[key_name(table, entry.spec->name)] = restart_value_text(entry); break;
        case Reload::live_while_set: values[key_name(table, entry.spec->name)] = "set"; break;
      }
    }
  }
  return values;
}

std::vector<std::string> restart_pending(const RestartValues& running, const RestartValues& fresh) {
  std::set<std::string> changed;
  for (const auto& [name, value] : running) {
    const auto it = fresh.find(name);
    if (it == fresh.end() || it->second != value) changed.insert(name);
  }
  for (const auto& [name, value] : fresh) {
    if (!running.count(name)) changed.insert(name);
  }
  // A role or local AE added or removed is one entry, not one per key of it.
  const auto covered = [&](const std::string& name) {
    const auto open = name.find(" (");
    const std::string base = name.substr(0, open);
    const std::string ae = open == std::string::npos ? std::string() : "enrolee.ae" + name.substr(open);
    for (const auto& other : changed) {
      if (other == name) continue;
      if (other.find(" (") == std::string::npos && base.compare(0, other.size() + 1, other + ".") == 0) {
        return true;  // "peer.listen" of a [peer] added or removed
      }
      if (other == ae) return true;  // "enrolee.ae.endpoint (CAE-x)" of a local AE added or removed
    }
    return false;
  };
  std::vector<std::string> out;
  for (const auto& name : changed) {
    if (!covered(name)) out.push_back(name);
  }
  return out;
}

std::vector<std::string> live_changes(const Config& before, const Config& after) {
  std::vector<std::string> out;
  const auto old_tables = tables_by_name(before);
  const auto new_tables = tables_by_name(after);
  for (const auto& [name, table] : new_tables) {
    const auto old = old_tables.find(name);
    if (old == old_tables.end()) {
      if (is_live_array(table->section)) out.push_back(name);  // a row added
      continue;
    }
    std::set<std::string_view> keys;
    for (const auto& entry : table->entries) keys.insert(entry.spec->name);
    for (const auto& entry : old->second->entries) keys.insert(entry.spec->name);
    for (const std::string_view key : keys) {
      const ConfigEntry* was = old->second->find(key);
      const ConfigEntry* is = table->find(key);
      if (was && is && was->value == is->value) continue;
      switch (reload_rule(table->section, key)) {
        case Reload::live: out.push_back(key_name(*table, key)); break;
        case Reload::live_while_set:
          if (was && is) out.push_back(key_name(*table, key));
          break;
        case Reload::restart: break;
      }
    }
  }
  for (const auto& [name, table] : old_tables) {
    if (!new_tables.count(name) && is_live_array(table->section)) out.push_back(name);  // a row removed
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace dauth::daemon

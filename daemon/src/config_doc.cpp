// The configuration table as the man page shows it (config.hpp). dauthd.toml(5) holds this text for every section
// and key, so that a default, range or doc changed in config_schema.cpp shows up as a failing test until the page
// says the same.
#include <string>

#include "dauth/daemon/config.hpp"

namespace dauth::daemon {

namespace {

constexpr std::int64_t kHour = 3600;
constexpr std::int64_t kDay = 24 * kHour;
constexpr std::int64_t kYear = 365 * kDay;

// Man-page text from plain text: '-' is a hyphen only when escaped, and the apostrophe, en dash and section sign
// have portable names (groff warns about, and some formatters mangle, the bare characters).
std::string roff(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto rest = text.substr(i);
    if (rest.rfind("–", 0) == 0) {
      out += "\\(en";
      i += std::string_view("–").size() - 1;
    } else if (rest.rfind("§", 0) == 0) {
      out += "\\(sc";
      i += std::string_view("§").size() - 1;
    } else if (text[i] == '-') {
      out += "\\-";
    } else if (text[i] == '\'') {
      out += "\\(aq";
    } else if (text[i] == '\\') {
      out += "\\e";
    } else {
      out += text[i];
    }
  }
  return out;
}

std::string count_of(std::int64_t n, const char* unit) {
  return std::to_string(n) + " " + unit + (n == 1 ? "" : "s");
}

// A number of seconds in the largest unit it is a whole number of (from an hour up), else in seconds.
std::string duration_words(std::int64_t seconds) {
  if (seconds > 0 && seconds % kYear == 0) return count_of(seconds / kYear, "year");
  if (seconds > 0 && seconds % kDay == 0) return count_of(seconds / kDay, "day");
  if (seconds > 0 && seconds % kHour == 0) return count_of(seconds / kHour, "hour");
  return count_of(seconds, "second");
}

bool in_seconds(const KeySpec& spec) { return spec.unit == "seconds"; }

std::string_view type_name(ValueType type) {
  switch (type) {
    case ValueType::boolean: return "boolean";
    case ValueType::integer: return "integer";
    case ValueType::string: return "string";
    case ValueType::path: return "path";
    case ValueType::string_list: return "array of strings";
    case ValueType::path_list: return "array of paths";
  }
  return "value";
}

}  // namespace

std::string describe_range(const KeySpec& spec) {
  if (spec.type != ValueType::integer) return {};
  if (!in_seconds(spec)) {
    return std::to_string(spec.min) + " to " + std::to_string(spec.max) +
           (spec.unit.empty() ? "" : " " + std::string(spec.unit));
  }
  const std::string low = duration_words(spec.min);
  const std::string high = duration_words(spec.max);
  const auto ends_in_seconds = [](const std::string& words) {
    const auto unit = words.substr(words.find(' ') + 1);
    return unit == "second" || unit == "seconds";
  };
  // "0 to 300 seconds" rather than "0 seconds to 300 seconds"; a zero needs no unit either.
  if (ends_in_seconds(high) && (ends_in_seconds(low) || spec.min == 0)) {
    return std::to_string(spec.min) + " to " + high;
  }
  return (spec.min == 0 ? std::string("0") : low) + " to " + high;
}

std::string man_page_section(const SectionSpec& section) {
  const std::string name(section.name);
  std::string text = ".SS \"" + (section.array ? "[[" + name + "]]" : "[" + name + "]") + "\"\n";
  text += roff(section.doc) + ".";
  if (section.role) text += " Present = role on.";
  return text + "\n";
}

std::string man_page_entry(const KeySpec& spec) {
  std::string facts(type_name(spec.type));
  if (const auto range = describe_range(spec); !range.empty()) facts += ", " + range;
  if (spec.required) {
    facts += "; required";
  } else if (spec.default_value.empty()) {
    facts += "; optional";
  } else {
    facts += "; default \\fB" + roff(spec.default_value) + "\\fR";
    if (spec.type == ValueType::integer && in_seconds(spec)) {
      const std::int64_t value = std::stoll(std::string(spec.default_value));
      const std::string words = duration_words(value);
      if (words != count_of(value, "second")) facts += " (" + words + ")";
    }
  }
  if (spec.key_file) facts += "; names key material, printed as (hidden)";
  // reload_rules(), the one table Daemon::reload follows (RELOAD below explains the three).
  switch (reload_rule(spec.section, spec.name)) {
    case Reload::live: facts += "; reload applies it"; break;
    case Reload::restart: facts += "; needs a restart"; break;
    case Reload::live_while_set: facts += "; reload applies a new value, setting or removing it needs a restart"; break;
  }
  return ".TP\n.B " + roff(spec.name) + "\n(" + facts + ")\n" + roff(spec.doc) + ".\n";
}

}  // namespace dauth::daemon

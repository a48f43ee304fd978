// Repeated member names in a JSON text (RFC 8259 §4 leaves their meaning open): every rspf reader refuses them, so
// that no other reader of the same text can take another value for a member than ours. The one place that detects
// them (messages.cpp, esprim.cpp).
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace dauth::rspf {

// Pass callback() to nlohmann::json::parse; afterwards repeated() names the first member name given twice in one
// object, if any. The key event comes at the depth of the object holding it, one more than that object's
// object_start.
class RepeatedKeyWatch {
 public:
  nlohmann::json::parser_callback_t callback() {
    return [this](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      const auto level = static_cast<std::size_t>(depth);
      if (event == nlohmann::json::parse_event_t::object_start) {
        if (keys_by_depth_.size() < level + 2) keys_by_depth_.resize(level + 2);
        keys_by_depth_[level + 1].clear();
      } else if (event == nlohmann::json::parse_event_t::key && level < keys_by_depth_.size() &&
                 !keys_by_depth_[level].insert(parsed.get<std::string>()).second && !repeated_) {
        repeated_ = parsed.get<std::string>();
      }
      return true;
    };
  }
  const std::optional<std::string>& repeated() const { return repeated_; }

 private:
  std::vector<std::set<std::string>> keys_by_depth_;
  std::optional<std::string> repeated_;
};

}  // namespace dauth::rspf

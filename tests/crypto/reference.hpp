// Runs tests/crypto/reference_derivations.py (an independent Python implementation) on a batch of requests.
#pragma once

#include <sstream>
#include <string>
#include <vector>

#include "support.hpp"

namespace dauth::test {

inline std::vector<std::string> run_reference(const std::vector<std::string>& json_lines) {
  std::string input;
  for (const auto& line : json_lines) input += line + "\n";
  const auto result =
      run_command({"python3", std::string(DAUTH_SOURCE_DIR) + "/tests/crypto/reference_derivations.py"}, input);
  if (result.exit_code != 0) throw std::runtime_error("reference_derivations.py failed: " + result.output);
  std::vector<std::string> lines;
  std::istringstream out(result.output);
  for (std::string line; std::getline(out, line);) lines.push_back(line);
  return lines;
}

}  // namespace dauth::test

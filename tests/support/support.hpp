// Shared helpers for the test suites: real temporary directories, real child processes, real files.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "dauth/secret.hpp"

namespace dauth::test {

// A fresh directory under $TMPDIR (0700), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

struct CommandResult {
  int exit_code = -1;      // exit status, or 128 + signal number
  std::string output;      // stdout and stderr, interleaved
};

// Runs argv (no shell) with optional stdin text; waits for it.
CommandResult run_command(const std::vector<std::string>& argv, const std::string& stdin_text = {});

// True when the program is on PATH.
bool have_program(const std::string& name);

std::string read_text_file(const std::filesystem::path& path);
Bytes read_binary_file(const std::filesystem::path& path);
void write_file(const std::filesystem::path& path, const std::string& content, int mode = 0600);
void write_file(const std::filesystem::path& path, const Bytes& content, int mode = 0600);

}  // namespace dauth::test

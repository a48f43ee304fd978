// The key of --psk-file FILE|- as an open descriptor for dauthd (docs/control-protocol.md "Passing keys"): keys
// travel by file or stdin, never argv, environment or JSON (docs/conventions.md §8).
#pragma once

#include <cstddef>
#include <string>

#include "dauth/unique_fd.hpp"

namespace dauthctl {

// FILE: checked with dauthd's own reader (secret_file.hpp: regular, no group/other bits, 16–64 bytes of hex), then
// passed open; dauthd checks it again on the descriptor. "-": standard input; a regular file (`< key`) is checked
// the same way and passed as is (so the mode rule still holds), a terminal is refused, anything else (a pipe) is
// read to its end, checked, and handed over in a new pipe that holds the whole key, so dauthd never waits for a
// writer. On failure prints the reason (naming `option`) and returns the exit code (2); 0 on success.
// out owns the descriptor passed with the request.
int open_key_source(const std::string& source, const char* option, dauth::UniqueFd& out);
// The same for a key of min_bytes..max_bytes (the master key of `dauthctl rekey`: exactly 32).
int open_key_source(const std::string& source, const char* option, dauth::UniqueFd& out, std::size_t min_bytes,
                    std::size_t max_bytes);

}  // namespace dauthctl

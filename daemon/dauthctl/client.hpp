// dauthctl's side of the control protocol (docs/control-protocol.md): one request line, one reply line.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "verbs.hpp"

namespace dauthctl {

// Human rendering of a verb's "result" object; --json prints the result itself instead.
using HumanPrinter = std::function<void(const nlohmann::json& result, std::ostream& out)>;

// Sends {"verb": verb, "args": args}, prints the result (human or --json) or the daemon's error unchanged, and
// returns the exit code: 0 ok, 1 failed, 2 usage, 3 daemon unreachable, 4 refused (dauthctl(1)). fds go with the
// request line (SCM_RIGHTS); args name them by index ("key_fd": 0). The caller keeps them open until this returns.
int call(const Context& context, const std::string& verb, const nlohmann::json& args, const HumanPrinter& human,
         const std::vector<int>& fds = {});

// Like call(), with a printer for a successful result that may decide the output itself (stats --prometheus).
int call_raw(const Context& context, const std::string& verb, const nlohmann::json& args,
             const std::function<void(const nlohmann::json& result)>& on_result, const std::vector<int>& fds = {});

// Human helpers shared by the verbs.
std::string format_duration(long long seconds);
// A unix time in the local time zone: "2026-12-07 02:10:00" (readable) or "2026-12-07T02:10:00+0000" (iso: one word,
// for key=value rows).
enum class TimeStyle { readable, iso };
std::string local_time(std::int64_t unix_seconds, TimeStyle style = TimeStyle::readable);
// A moment relative to now, as wg show writes it: "1 minute, 12 seconds ago", "in 29 days, 3 hours", "now";
// "never" for 0 (the replies' "no time").
std::string when(std::int64_t now, std::int64_t at);
// key=value rows: values with spaces, quotes or nothing are double-quoted (with \" and \\ escaped), so that each
// row splits on spaces; time fields (*_at, created, last_used) as local ISO 8601 times, 0 as "never".
void print_rows(const nlohmann::json& rows, std::ostream& out, const char* empty_text);

}  // namespace dauthctl

// What the request paths of the peer role share (proxy.cpp: the AE-pair session paths; esprim_paths.cpp: ESPrim):
// refusal bodies, the local AE's view of a response, the SIGTERM drain and the in-flight table.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "dauth/error.hpp"
#include "dauth/transport/transport.hpp"
#include "roles_impl.hpp"

namespace dauth::daemon {

// A refusal with the body every dauth role answers with (PROTOCOL.md §2) and oneM2M-RSC `rsc` if given.
transport::Response refusal(int code, std::optional<std::uint32_t> rsc, const Error& error);
// `response` as a local AE gets it: without oneM2M-RSC unless the AE's request was oneM2M-aware (sent an RQI).
transport::Response for_local_ae(transport::Response response, const transport::Request& request);
// During the SIGTERM drain: answers 5.03 and returns true.
bool refuse_while_draining(const Roles::Impl& roles, const transport::Request& request,
                           transport::Responder& responder);
// The CoAP code for a failed delivery to a local AE (Roles::Impl::deliver_to_local_ae): 4.04 no endpoint, 5.00
// unresolvable endpoint, 5.04 no answer.
int delivery_failure_code(const Error& error);

}  // namespace dauth::daemon

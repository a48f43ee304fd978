// The MEF's observed GET /fetchCredentials feed (PROTOCOL.md §4–5): a target learns
// new KeIDs ahead of the first handshake, drops revoked ones with their live sessions, and the feed is refused to
// non-targets and to a wrong oneM2M-FR. Real Mef, Enrolee and TargetKeys objects on loopback DTLS.
#include <catch2/catch.hpp>

#include <algorithm>

#include "dauth/rspf/messages.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace dauth::test;

namespace {

transport::Request feed_request(const std::string& originator) {
  transport::Request request;
  request.method = transport::Method::get;
  request.path = {"fetchCredentials"};
  request.originator = originator;
  return request;
}

transport::Request get(std::vector<std::string> path) {
  transport::Request request;
  request.method = transport::Method::get;
  request.path = std::move(path);
  return request;
}

std::size_t handshake_failures(const World& world) {
  return static_cast<std::size_t>(std::count_if(world.failures.begin(), world.failures.end(), [](const auto& f) {
    return f.kind == transport::FailureKind::handshake_failed || f.kind == transport::FailureKind::handshake_timeout;
  }));
}

}  // namespace

TEST_CASE("feed: an enrolment naming the target gives it the key before any handshake, a revocation drops key "
          "and live session",
          "[rspf][network][feed]") {
  World world(/*with_ca=*/false, /*observe_feed=*/true);
  std::vector<std::pair<std::string, bool>> fetch_outcomes;
  world.valve_keys->set_fetch_observer([&](const std::string& ke_id, const Result<void>& outcome) {
    fetch_outcomes.emplace_back(ke_id, outcome.ok());
  });
  // The valve enrols first: its feed subscription authenticates with its own KeID/Ker (retried until it can).
  REQUIRE(world.enrol(*world.valve).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->feeds_live() == 1; }));
  const auto notifications_before = world.valve_keys->feed_notifications();

  // (a) The meter enrols naming the valve: the MEF notifies, the valve fetches the key ahead of time.
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string meter_ke_id = *world.meter->ke_id();
  REQUIRE(world.pump([&] { return world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(meter_ke_id, "CAE-valve")) != nullptr; }));
  CHECK(world.valve_keys->feed_notifications() > notifications_before);
  REQUIRE(fetch_outcomes.size() == 1);
  CHECK(fetch_outcomes.front() == std::make_pair(meter_ke_id, true));
  CHECK(world.log.contains("announced by the MEF's feed"));

  auto key = world.meter->key_for_target("CAE-valve");
  REQUIRE(key.ok());
  const auto to_valve = transport::ClientCredentials::psk(key->ke_id, key->key.clone(), "CAE-valve");
  const std::size_t failures_before = handshake_failures(world);
  auto first = world.call(*world.meter_node, world.valve_address(), to_valve, get({"temp"}));
  INFO((first.ok() ? std::string("ok") : first.error().to_string()));
  REQUIRE(first.ok());  // the very first attempt: no refused handshake, no retry
  CHECK(std::string(first->payload.begin(), first->payload.end()) == meter_ke_id);
  CHECK(handshake_failures(world) == failures_before);
  CHECK(fetch_outcomes.size() == 1);  // no on-demand retrieval was needed
  const std::size_t meter_sessions_before = world.meter_node->stats().live_client_sessions;
  REQUIRE(meter_sessions_before >= 1);

  // (b) Revocation at the MEF: the valve drops the key and closes the live meter -> valve session.
  REQUIRE(world.mef->revoke(meter_ke_id).ok());
  REQUIRE(world.pump([&] { return world.valve_keys->is_revoked(meter_ke_id); }));
  CHECK(world.valve_store->find<crypto::SessionKeyRecord>(crypto::session_key_id(meter_ke_id, "CAE-valve")) == nullptr);
  CHECK(world.log.contains("KeID " + meter_ke_id + " revoked by MEF " + std::string(kMefFqdn) +
                           ": key removed, 1 live session(s) closed"));
  // The meter sees the close_notify; its next request needs a new handshake, which the valve refuses.
  REQUIRE(world.pump([&] { return world.meter_node->stats().live_client_sessions < meter_sessions_before; }));
  const std::size_t before_retry = handshake_failures(world);
  auto after = world.call(*world.meter_node, world.valve_address(), to_valve, get({"temp"}));
  REQUIRE_FALSE(after.ok());
  CHECK(after.error().code == Errc::unauthenticated);
  CHECK(handshake_failures(world) > before_retry);
  const bool refused_as_revoked = std::any_of(world.failures.begin(), world.failures.end(), [&](const auto& f) {
    return f.kind == transport::FailureKind::handshake_failed && f.reason.find("revoked") != std::string::npos;
  });
  CHECK(refused_as_revoked);
  CHECK(fetch_outcomes.size() == 1);  // refused from the feed's list, without asking the MEF
}

TEST_CASE("feed: refused to a non-target and to a wrong oneM2M-FR, the answer lists issued and revoked KeIDs",
          "[rspf][network][feed]") {
  World world;
  REQUIRE(world.enrol(*world.valve).ok());
  REQUIRE(world.enrol(*world.meter).ok());
  const std::string meter_ke_id = *world.meter->ke_id();
  auto valve_credentials = world.valve->mef_credentials();
  auto meter_credentials = world.meter->mef_credentials();
  REQUIRE(valve_credentials.ok());
  REQUIRE(meter_credentials.ok());

  // Every call of the subscriptions below (they outlive one statement: later notifications land here too).
  struct Subscription {
    std::vector<Result<transport::Response>> calls;
    transport::Observation observation;
  };
  std::vector<std::unique_ptr<Subscription>> subscriptions;
  auto subscribe = [&](transport::Node& node, const transport::ClientCredentials& credentials,
                       transport::Request request) -> transport::Response {
    subscriptions.push_back(std::make_unique<Subscription>());
    Subscription* one = subscriptions.back().get();
    one->observation = node.observe(world.mef_address(), credentials, std::move(request),
                                    [one](Result<transport::Response> n, const transport::Session*) {
                                      one->calls.push_back(std::move(n));
                                    });
    if (!world.pump([&] { return !one->calls.empty(); })) return transport::Response::with_text(599, "no answer");
    if (!one->calls.front().ok()) return transport::Response::with_text(599, one->calls.front().error().to_string());
    return *one->calls.front();
  };

  // The meter is nobody's Enrolment Target.
  auto non_target = subscribe(*world.meter_node, *meter_credentials, feed_request("CAE-meter"));
  CHECK(non_target.code == 403);
  CHECK_FALSE(non_target.observe);
  CHECK(rspf::error_from_response("MEF", non_target).message.find("no enrolee's Enrolment Target") !=
        std::string::npos);
  // The valve, claiming to be the meter in oneM2M-FR.
  auto impostor = subscribe(*world.valve_node, *valve_credentials, feed_request("CAE-meter"));
  CHECK(impostor.code == 403);
  CHECK_FALSE(impostor.observe);
  CHECK(world.log.contains("oneM2M-FR 'CAE-meter' differs from the authenticated identity 'CAE-valve'"));

  // The valve as itself: a live subscription whose body lists the meter's KeID as issued.
  auto first = subscribe(*world.valve_node, *valve_credentials, feed_request("CAE-valve"));
  REQUIRE(first.code == 205);
  CHECK(first.observe.has_value());
  CHECK(first.content_format == transport::kContentFormatCbor);
  auto feed = rspf::decode_credential_feed(ByteView(first.payload), rspf::ContentFormat::cbor);
  REQUIRE(feed.ok());
  CHECK(feed->issued == std::vector<std::string>{meter_ke_id});
  CHECK(feed->revoked.empty());

  // After the revocation the KeID moves to "revoked": in a notification, and in a JSON answer on request.
  REQUIRE(world.mef->revoke(meter_ke_id).ok());
  Subscription& valve_feed = *subscriptions.back();
  REQUIRE(world.pump([&] { return valve_feed.calls.size() == 2; }));
  REQUIRE(valve_feed.calls.back().ok());
  CHECK(valve_feed.calls.back()->observe.has_value());
  auto notified = rspf::decode_credential_feed(ByteView(valve_feed.calls.back()->payload), rspf::ContentFormat::cbor);
  REQUIRE(notified.ok());
  CHECK(notified->issued.empty());
  CHECK(notified->revoked == std::vector<std::string>{meter_ke_id});
  auto json_request = feed_request("CAE-valve");
  json_request.accept = static_cast<std::uint16_t>(rspf::ContentFormat::json);
  auto answer = world.call(*world.valve_node, world.mef_address(), *valve_credentials, std::move(json_request));
  REQUIRE(answer.ok());
  REQUIRE(answer->code == 205);
  CHECK(answer->content_format == static_cast<std::uint16_t>(rspf::ContentFormat::json));
  CHECK(std::string(answer->payload.begin(), answer->payload.end()) ==
        "{\"issued\":[],\"revoked\":[\"" + meter_ke_id + "\"]}");
}

// A key retrieval that failed is tried again with backoff, not once per handshake naming its KeID: a client
// retrying with a KeID its MEF does not know (or an MEF that cannot be reached) must not turn every ClientHello into
// a request to the MEF. Real Mef, Enrolee and TargetKeys on loopback DTLS.
#include <catch2/catch.hpp>

#include <thread>

#include "network_world.hpp"

using namespace dauth;
using namespace dauth::test;

TEST_CASE("target keys: a failed retrieval is held back for its backoff, then tried again", "[rspf][network]") {
  World world;
  REQUIRE(world.enrol(*world.valve).ok());
  std::vector<std::pair<std::string, bool>> outcomes;
  world.valve_keys->set_fetch_observer([&](const std::string& ke_id, const Result<void>& outcome) {
    outcomes.emplace_back(ke_id, outcome.ok());
  });
  const std::string unknown = "0123456789ABCDEF0123456789ABCDEF@" + std::string(kMefFqdn);  // never enrolled

  auto first = world.valve_keys->lookup_psk(unknown);
  REQUIRE_FALSE(first.ok());
  CHECK(first.error().message.find("retrieval from") != std::string::npos);  // started
  REQUIRE(world.pump([&] { return outcomes.size() == 1; }));
  CHECK_FALSE(outcomes.front().second);  // the MEF does not know it

  // Handshakes naming it again right away are refused without asking the MEF (jitter 0: the first step is 1 s).
  for (int i = 0; i < 5; ++i) {
    auto again = world.valve_keys->lookup_psk(unknown);
    REQUIRE_FALSE(again.ok());
    INFO(again.error().message);
    CHECK(again.error().message.find("next try in") != std::string::npos);
  }
  world.pump([] { return false; }, 300ms);
  CHECK(outcomes.size() == 1);
  CHECK(world.valve_keys->fetches_pending() == 0);

  // Once the backoff has passed, the next handshake starts a retrieval again; its failure doubles the wait.
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  auto later = world.valve_keys->lookup_psk(unknown);
  REQUIRE_FALSE(later.ok());
  CHECK(later.error().message.find("retrieval from") != std::string::npos);
  REQUIRE(world.pump([&] { return outcomes.size() == 2; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  auto doubled = world.valve_keys->lookup_psk(unknown);
  REQUIRE_FALSE(doubled.ok());
  CHECK(doubled.error().message.find("next try in") != std::string::npos);  // 2 s after the second failure
}

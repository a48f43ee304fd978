// Durability of the MEF's answer (PROTOCOL.md §3.4, issue 4): the enrolment key is stored (fdatasync) before the
// 2.04 leaves, so an MEF process killed with SIGKILL right after answering still knows every KeID an Enrolee got.
// The MEF runs as a separate process (mef_test_server) on one state directory across many kill/restart cycles;
// after the last restart the Enrolment Target fetches every KeID the Enrolee was given.
#include <catch2/catch.hpp>

#include <algorithm>
#include <csignal>

#include "child_process.hpp"
#include "dauth/crypto/onem2m.hpp"
#include "dauth/rspf/messages.hpp"
#include "network_world.hpp"

using namespace dauth;
using namespace std::chrono_literals;

namespace {

constexpr int kTrials = 24;

// A started mef_test_server and the port it serves on.
struct MefProcess {
  std::unique_ptr<test::ChildProcess> child;
  std::uint16_t port = 0;
};

MefProcess start_mef(const std::vector<std::string>& argv) {
  MefProcess mef;
  mef.child = std::make_unique<test::ChildProcess>(argv);
  const auto line = mef.child->read_line(20s);
  INFO("mef_test_server said: " << line.value_or("(nothing)") << mef.child->output());
  REQUIRE(line.has_value());
  REQUIRE(line->rfind("ready ", 0) == 0);
  mef.port = static_cast<std::uint16_t>(std::stoi(line->substr(6)));
  return mef;
}

// Drives one client node until done() or 10 s.
bool pump(transport::Node& node, const std::function<bool()>& done) {
  return node.run_until(done, 10000ms);
}

Result<void> enrol(transport::Node& node, rspf::Enrolee& enrolee, const std::function<void()>& on_answer) {
  std::optional<Result<void>> outcome;
  enrolee.enrol([&](Result<void> r) {
    on_answer();  // first thing after the answer arrived: the test's SIGKILL
    outcome.emplace(std::move(r));
  });
  if (!pump(node, [&] { return outcome.has_value(); })) return make_error(Errc::timeout, "test: enrol hung");
  return std::move(*outcome);
}

}  // namespace

TEST_CASE("every KeID an Enrolee received survives SIGKILL of the MEF right after its answer",
          "[rspf][network][durability]") {
  test::TempDir dir;
  const auto state = dir / "mef-state";
  std::filesystem::create_directories(state);
  ::chmod(state.c_str(), 0700);
  const auto key_file = dir / "master.key";
  REQUIRE(crypto::write_new_master_key_file(key_file).ok());
  const SecretBuffer meter_kpm = SecretBuffer::random(32);
  const SecretBuffer valve_kpm = SecretBuffer::random(32);
  const std::vector<std::string> argv = {
      DAUTH_MEF_TEST_SERVER, state.string(), key_file.string(), "0", test::kMefFqdn,
      std::string(test::kMeterKpmId) + "=" + to_hex(meter_kpm.view()) + "=CAE-meter=CAE-valve",
      std::string(test::kValveKpmId) + "=" + to_hex(valve_kpm.view()) + "=CAE-valve="};

  const SecretBuffer local_master = SecretBuffer::random(crypto::kMasterKeySize);
  auto meter_store = test::open_store(dir / "meter", local_master);
  test::World::put(meter_store, crypto::BootstrapKeyRecord{test::kMeterKpmId, meter_kpm.clone(), "CAE-meter"});
  std::vector<transport::Failure> failures;
  auto meter_node = test::make_node(std::nullopt, &failures);
  test::LogLines log;

  std::vector<std::string> received;  // every KeID the MEF answered
  for (int trial = 0; trial < kTrials; ++trial) {
    auto mef = start_mef(argv);
    rspf::EnroleeConfig config;
    config.kpm_id = test::kMeterKpmId;
    config.mef_address = transport::Peer{"127.0.0.1", mef.port};
    config.log = log.sink();
    auto meter = rspf::Enrolee::create(*meter_node, meter_store, std::move(config)).value();
    // 1-3 enrolments per MEF life, the SIGKILL right after the last answer.
    const int enrolments = 1 + trial % 3;
    for (int n = 0; n < enrolments; ++n) {
      const bool last = n + 1 == enrolments;
      auto outcome = enrol(*meter_node, *meter, [&] {
        if (last) mef.child->kill_with(SIGKILL);
      });
      INFO("trial " << trial << " enrolment " << n << ": "
                    << (outcome.ok() ? std::string("ok") : outcome.error().to_string()));
      REQUIRE(outcome.ok());
      received.push_back(meter->ke_id().value());
    }
    REQUIRE(mef.child->wait(10s) == 128 + SIGKILL);
  }
  REQUIRE(received.size() == static_cast<std::size_t>(kTrials / 3 * 6));
  std::sort(received.begin(), received.end());
  REQUIRE(std::adjacent_find(received.begin(), received.end()) == received.end());  // each a new KeID

  // The last restart: the Enrolment Target enrols and fetches each of them.
  auto mef = start_mef(argv);
  const transport::Peer mef_address{"127.0.0.1", mef.port};
  auto valve_store = test::open_store(dir / "valve", local_master);
  test::World::put(valve_store, crypto::BootstrapKeyRecord{test::kValveKpmId, valve_kpm.clone(), "CAE-valve"});
  auto valve_node = test::make_node(std::nullopt, &failures);
  rspf::EnroleeConfig valve_config;
  valve_config.kpm_id = test::kValveKpmId;
  valve_config.mef_address = mef_address;
  valve_config.log = log.sink();
  auto valve = rspf::Enrolee::create(*valve_node, valve_store, std::move(valve_config)).value();
  REQUIRE(enrol(*valve_node, *valve, [] {}).ok());
  const auto credentials = valve->mef_credentials().value();
  for (const auto& ke_id : received) {
    transport::Request request;
    request.method = transport::Method::get;
    request.path = rspf::fetch_credentials_path(crypto::parse_ke_id(ke_id).value(), crypto::Suid::rspf_key_for_saef);
    request.originator = "CAE-valve";
    std::optional<Result<transport::Response>> answer;
    valve_node->request(mef_address, credentials, std::move(request),
                        [&](Result<transport::Response> r, const transport::Session*) { answer.emplace(std::move(r)); });
    REQUIRE(pump(*valve_node, [&] { return answer.has_value(); }));
    INFO("KeID " << ke_id << ": " << (answer->ok() ? std::to_string((*answer)->code) : answer->error().to_string()));
    REQUIRE(answer->ok());
    REQUIRE((*answer)->code == 205);
    auto body = rspf::decode_fetch_credentials_response(ByteView((*answer)->payload));
    REQUIRE(body.ok());
    // The MEF's key is the one the meter derives from the Ke it holds for this KeID.
    const auto* ours = meter_store.find<crypto::EnrolmentKeyRecord>(ke_id);
    REQUIRE(ours != nullptr);
    auto expected = crypto::derive_usage_constrained_key(ours->ke, crypto::Suid::rspf_key_for_saef, "CAE-valve");
    REQUIRE(body->credential.equals(*expected));
  }
  mef.child->kill_with(SIGTERM);
}

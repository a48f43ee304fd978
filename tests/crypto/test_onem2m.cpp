// TS-0003 derivations (PROTOCOL.md §3.3–3.5, §4) against the independent Python reference on many random inputs.
#include <catch2/catch.hpp>

#include "dauth/crypto/onem2m.hpp"
#include "reference.hpp"

using dauth::ByteView;
using dauth::SecretBuffer;
namespace crypto = dauth::crypto;

namespace {

// Records what the derivation asks of the session; the real exporters are tested in transport/.
class RecordingExporter : public crypto::KeyingMaterialExporter {
 public:
  explicit RecordingExporter(SecretBuffer output) : output_(std::move(output)) {}
  dauth::Result<SecretBuffer> export_keying_material(std::string_view label, std::size_t length) const override {
    label_ = std::string(label);
    length_ = length;
    return output_.clone();
  }
  mutable std::string label_;
  mutable std::size_t length_ = 0;

 private:
  SecretBuffer output_;
};

std::string random_target(int i) {
  const std::string n = std::to_string(i);
  switch (i % 4) {
    case 0: return "CAE-valve-" + n;
    case 1: return "/in-cse/CAE-valve-" + n;
    case 2: return "//m2m.example.net/in-cse/S" + n;
    default: return "C~x.y_z-" + n;
  }
}

}  // namespace

TEST_CASE("the enrolment key uses the TS-0003 bootstrap label and 48 bytes", "[onem2m]") {
  RecordingExporter session(SecretBuffer::random(48));
  auto key = crypto::derive_enrolment_key(session, "mef.example.net");
  REQUIRE(key.ok());
  REQUIRE(session.label_ == "EXPORTER-oneM2M-Bootstrap");  // TS-0003 §10.3.1
  REQUIRE(session.length_ == 48);
  REQUIRE(key->ke.size() == 32);
}

TEST_CASE("bootstrap split, KeID, Ker and usage-constrained keys match the Python reference", "[onem2m][reference]") {
  constexpr int kCases = 150;
  std::vector<std::string> requests;
  std::vector<std::string> expected;
  for (int i = 0; i < kCases; ++i) {
    const SecretBuffer exported = SecretBuffer::random(48);
    const std::string fqdn = (i % 3 == 0) ? "MEF-" + std::to_string(i) + ".Example.NET" : "mef" + std::to_string(i) + ".local";
    auto key = crypto::split_bootstrap_export(exported, fqdn);
    REQUIRE(key.ok());
    requests.push_back(R"({"op":"bootstrap","export":")" + dauth::to_hex(exported.view()) + R"(","fqdn":")" + fqdn +
                       "\"}");
    expected.push_back(key->ke_id.text() + " " + dauth::to_hex(key->ke.view()));

    const std::string ke_hex = dauth::to_hex(key->ke.view());
    requests.push_back(R"({"op":"ker","ke":")" + ke_hex + "\"}");
    expected.push_back(dauth::to_hex(crypto::derive_reauthentication_key(key->ke).view()));

    const auto suid = (i % 2 == 0) ? crypto::Suid::rspf_key_for_saef : crypto::Suid::certificate_for_saef;
    const std::string target = random_target(i);
    auto usage = crypto::derive_usage_constrained_key(key->ke, suid, target);
    REQUIRE(usage.ok());
    requests.push_back(R"({"op":"usage","ke":")" + ke_hex + R"(","suid":)" + std::to_string(static_cast<int>(suid)) +
                       R"(,"target":")" + target + "\"}");
    expected.push_back(dauth::to_hex(usage->view()));
  }
  const auto reference = dauth::test::run_reference(requests);
  REQUIRE(reference.size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO("request " << requests[i]);
    REQUIRE(reference[i] == expected[i]);
  }
}

TEST_CASE("KeID text is canonical and round-trips through the parser", "[onem2m]") {
  const std::uint8_t bytes[48] = {0xab, 0xcd, 0x01};
  auto key = crypto::split_bootstrap_export(SecretBuffer::copy_of(ByteView(bytes, 48)), "MEF.Example.net");
  REQUIRE(key.ok());
  REQUIRE(key->ke_id.text() == "ABCD0100000000000000000000000000@mef.example.net");
  auto parsed = crypto::parse_ke_id("abcd0100000000000000000000000000@MEF.example.NET");
  REQUIRE(parsed.ok());
  REQUIRE(parsed->text() == key->ke_id.text());
}

TEST_CASE("derivations refuse bad sizes and identifiers", "[onem2m]") {
  REQUIRE(crypto::split_bootstrap_export(SecretBuffer::random(47), "mef.example").error().code ==
          dauth::Errc::invalid_argument);
  REQUIRE_FALSE(crypto::split_bootstrap_export(SecretBuffer::random(48), "bad fqdn").ok());
  REQUIRE_FALSE(crypto::derive_usage_constrained_key(SecretBuffer::random(16), crypto::Suid::rspf_key_for_saef,
                                                     "CAE-x").ok());
  auto bad_target =
      crypto::derive_usage_constrained_key(SecretBuffer::random(32), crypto::Suid::rspf_key_for_saef, "CAE x");
  REQUIRE_FALSE(bad_target.ok());
  REQUIRE(bad_target.error().message.find("'CAE x'") != std::string::npos);
}

TEST_CASE("different targets and SUIDs give unrelated keys", "[onem2m]") {
  const SecretBuffer ke = SecretBuffer::random(32);
  auto a = crypto::derive_usage_constrained_key(ke, crypto::Suid::rspf_key_for_saef, "CAE-a");
  auto b = crypto::derive_usage_constrained_key(ke, crypto::Suid::rspf_key_for_saef, "CAE-b");
  auto c = crypto::derive_usage_constrained_key(ke, crypto::Suid::certificate_for_saef, "CAE-a");
  REQUIRE_FALSE(a->equals(*b));
  REQUIRE_FALSE(a->equals(*c));
  REQUIRE_FALSE(a->equals(crypto::derive_reauthentication_key(ke)));
}

TEST_CASE("SUIDs parse from decimal text", "[onem2m]") {
  REQUIRE(*crypto::parse_suid("22") == crypto::Suid::rspf_key_for_saef);
  REQUIRE(*crypto::parse_suid("42") == crypto::Suid::certificate_for_saef);
  REQUIRE_FALSE(crypto::parse_suid("21").ok());
  REQUIRE_FALSE(crypto::parse_suid("022").ok());
  REQUIRE_FALSE(crypto::parse_suid("").ok());
}

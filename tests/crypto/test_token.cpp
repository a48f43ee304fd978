// PKCS#11 keys through crypto::Token, on a throwaway SoftHSM2 token per test (tests/support/softhsm_token.hpp).
#include <catch2/catch.hpp>

#include "softhsm_token.hpp"
#include "support.hpp"

using namespace dauth;

TEST_CASE("a throwaway SoftHSM token lives in its own directory and goes away with it") {
  std::filesystem::path directory;
  {
    test::ThrowawayToken token("dauth-throwaway");
    directory = token.directory();
    token.add_token("dauth-second");
    const test::CommandResult slots = token.run({"softhsm2-util", "--show-slots"});
    CHECK(slots.output.find("dauth-throwaway") != std::string::npos);
    CHECK(slots.output.find("dauth-second") != std::string::npos);
    CHECK(!std::filesystem::is_empty(token.token_directory()));
    CHECK(token.uri("my key") == "pkcs11:token=dauth-throwaway;object=my%20key");
  }
  CHECK(!std::filesystem::exists(directory));
}

TEST_CASE("a throwaway SoftHSM token imports a PEM private key that p11tool then lists") {
  test::ThrowawayToken token("dauth-import");
  const auto pem = token.directory() / "key.pem";
  token.run({"openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", pem.string()});
  const std::string uri = token.import_private_key(pem, "imported", "0a");
  CHECK(uri == "pkcs11:token=dauth-import;object=imported;type=private");
  const test::CommandResult listed =
      token.run({"p11tool", "--list-all-privkeys", "--login", "--set-pin=" + token.pin(), "pkcs11:token=dauth-import"});
  CHECK(listed.output.find("object=imported;type=private") != std::string::npos);
  CHECK(listed.output.find("ID: 0a") != std::string::npos);
}

// HMAC-SHA-256 and HKDF-SHA-256: RFC 5869 Appendix A (all SHA-256 cases) and an independent Python reference.
#include <catch2/catch.hpp>

#include "dauth/crypto/kdf.hpp"
#include "reference.hpp"

using dauth::ByteView;
using dauth::Bytes;
using dauth::SecretBuffer;

namespace {

Bytes range(std::uint8_t first, std::size_t count) {
  Bytes out(count);
  for (std::size_t i = 0; i < count; ++i) out[i] = static_cast<std::uint8_t>(first + i);
  return out;
}
std::string okm_hex(const Bytes& ikm, const Bytes& salt, const Bytes& info, std::size_t length) {
  auto okm = dauth::crypto::hkdf_sha256(SecretBuffer::copy_of(ikm), salt, info, length);
  REQUIRE(okm.ok());
  return dauth::to_hex(okm->view());
}

}  // namespace

TEST_CASE("HKDF-SHA-256 matches RFC 5869 A.1 (basic test case)", "[kdf][kat]") {
  REQUIRE(okm_hex(Bytes(22, 0x0b), range(0x00, 13), range(0xf0, 10), 42) ==
          "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
}

TEST_CASE("HKDF-SHA-256 matches RFC 5869 A.2 (longer inputs and outputs)", "[kdf][kat]") {
  REQUIRE(okm_hex(range(0x00, 80), range(0x60, 80), range(0xb0, 80), 82) ==
          "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09da3275600"
          "c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87");
}

TEST_CASE("HKDF-SHA-256 matches RFC 5869 A.3 (zero-length salt and info)", "[kdf][kat]") {
  REQUIRE(okm_hex(Bytes(22, 0x0b), {}, {}, 42) ==
          "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8");
}

TEST_CASE("HKDF-SHA-256 refuses lengths outside 1..8160", "[kdf]") {
  const SecretBuffer ikm = SecretBuffer::random(32);
  REQUIRE(dauth::crypto::hkdf_sha256(ikm, {}, {}, 0).error().code == dauth::Errc::invalid_argument);
  REQUIRE_FALSE(dauth::crypto::hkdf_sha256(ikm, {}, {}, 255 * 32 + 1).ok());
  REQUIRE(dauth::crypto::hkdf_sha256(ikm, {}, {}, 255 * 32).ok());
}

TEST_CASE("HMAC-SHA-256 matches RFC 4231 test case 2", "[kdf][kat]") {
  const SecretBuffer key = SecretBuffer::copy_of(ByteView::of("Jefe"));
  const auto mac = dauth::crypto::hmac_sha256(key, ByteView::of("what do ya want for nothing?"));
  REQUIRE(dauth::to_hex(mac.view()) == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST_CASE("HMAC and HKDF agree with an independent Python implementation on random inputs", "[kdf][reference]") {
  constexpr int kCases = 200;
  std::vector<std::string> requests;
  std::vector<std::string> expected;
  for (int i = 0; i < kCases; ++i) {
    std::uint8_t sizes[4];
    dauth::random_bytes(sizes, sizeof sizes);
    Bytes key(sizes[0] % 100 + 1), msg(sizes[1] % 200), salt(sizes[2] % 80), info(sizes[3] % 80);
    for (Bytes* b : {&key, &msg, &salt, &info}) dauth::random_bytes(b->data(), b->size());
    const std::size_t length = 1 + static_cast<std::size_t>(sizes[0]) * 3 % 300;
    requests.push_back(R"({"op":"hmac","key":")" + dauth::to_hex(key) + R"(","msg":")" + dauth::to_hex(msg) + "\"}");
    expected.push_back(dauth::to_hex(dauth::crypto::hmac_sha256(SecretBuffer::copy_of(key), msg).view()));
    requests.push_back(R"({"op":"hkdf","ikm":")" + dauth::to_hex(key) + R"(","salt":")" + dauth::to_hex(salt) +
                       R"(","info":")" + dauth::to_hex(info) + R"(","length":)" + std::to_string(length) + "}");
    expected.push_back(okm_hex(key, salt, info, length));
  }
  const auto reference = dauth::test::run_reference(requests);
  REQUIRE(reference.size() == expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) {
    INFO("request " << requests[i]);
    REQUIRE(reference[i] == expected[i]);
  }
}

TEST_CASE("SHA-256 of public data", "[kdf][kat]") {
  REQUIRE(dauth::to_hex(dauth::crypto::sha256(ByteView::of("abc"))) ==
          "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_CASE("short_hash is SipHash-2-4 (the reference vectors), keyed, and refuses a key of another size", "[kdf]") {
  Bytes key_bytes(16);
  for (std::size_t i = 0; i < key_bytes.size(); ++i) key_bytes[i] = static_cast<std::uint8_t>(i);
  const SecretBuffer key = SecretBuffer::copy_of(ByteView(key_bytes));
  // SipHash paper, appendix A: key 00..0f; messages 00..(n-1); outputs as bytes, read here big-endian.
  CHECK(dauth::crypto::short_hash(key, ByteView(Bytes{})) == 0x310e0edd47db6f72ULL);
  Bytes fifteen(15);
  for (std::size_t i = 0; i < fifteen.size(); ++i) fifteen[i] = static_cast<std::uint8_t>(i);
  CHECK(dauth::crypto::short_hash(key, ByteView(fifteen)) == 0xe545be4961ca29a1ULL);
  const SecretBuffer other = SecretBuffer::random(dauth::crypto::kShortHashKeySize);
  CHECK(dauth::crypto::short_hash(other, ByteView(fifteen)) != dauth::crypto::short_hash(key, ByteView(fifteen)));
  CHECK_THROWS_AS(dauth::crypto::short_hash(SecretBuffer::random(32), ByteView(fifteen)), std::invalid_argument);
}

// base64url, AES-256-GCM and the JWE Compact Serialization (alg "dir", enc "A256GCM") of crypto/src/jose.cpp:
// RFC 4648 §10 vectors, the GCM specification's and NIST CAVP's AES-256 known answers, tampering, every refusal,
// and both directions against an independent implementation (python3-jwcrypto).
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "dauth/crypto/jose.hpp"
#include "support.hpp"

#include "../../crypto/src/aes_gcm.hpp"

using dauth::ByteView;
using dauth::Bytes;
using dauth::Errc;
using dauth::SecretBuffer;
namespace crypto = dauth::crypto;

namespace {

Bytes hex(const std::string& text) {
  auto bytes = dauth::from_hex(text);
  REQUIRE(bytes.ok());
  return *bytes;
}
Bytes bytes_of(std::string_view text) { return Bytes(text.begin(), text.end()); }
SecretBuffer key_of(const std::string& hex_text) { return SecretBuffer::copy_of(hex(hex_text)); }

const std::string kHeader =
    R"({"alg":"dir","enc":"A256GCM","kid":"00112233445566778899aabbccddeeff@mef.example.net","seq":7})";
const std::string kPlaintext = R"({"op":2,"to":"CAE-receiver","rqi":"r1"})";

std::vector<std::string> split_dots(const std::string& text) {
  std::vector<std::string> parts(1);
  for (char c : text) {
    if (c == '.') {
      parts.emplace_back();
    } else {
      parts.back() += c;
    }
  }
  return parts;
}
std::string join_dots(const std::vector<std::string>& parts) {
  std::string text;
  for (std::size_t i = 0; i < parts.size(); ++i) text += (i == 0 ? "" : ".") + parts[i];
  return text;
}

// The parse error for text, which must be Errc::parse and must not quote the part that was refused.
std::string parse_refusal(const std::string& text, const std::string& must_not_quote = {}) {
  auto parsed = crypto::parse_jwe_compact(text);
  REQUIRE_FALSE(parsed.ok());
  CHECK(parsed.error().code == Errc::parse);
  if (!must_not_quote.empty()) CHECK(parsed.error().message.find(must_not_quote) == std::string::npos);
  return parsed.error().message;
}

}  // namespace

TEST_CASE("base64url matches the RFC 4648 section 10 vectors both ways", "[jose][base64url][kat]") {
  const std::vector<std::pair<std::string, std::string>> vectors = {
      {"", ""},           {"f", "Zg"},         {"fo", "Zm8"},        {"foo", "Zm9v"},
      {"foob", "Zm9vYg"}, {"fooba", "Zm9vYmE"}, {"foobar", "Zm9vYmFy"}};
  for (const auto& [plain, encoded] : vectors) {
    INFO(plain);
    CHECK(crypto::base64url_encode(ByteView::of(plain)) == encoded);
    auto decoded = crypto::base64url_decode(encoded);
    REQUIRE(decoded.ok());
    CHECK(*decoded == bytes_of(plain));
  }
}

TEST_CASE("base64url uses the url-safe alphabet and round-trips every byte value", "[jose][base64url]") {
  // 0xfb 0xff is "+/8=" in standard base64: here '-' and '_' and no padding.
  CHECK(crypto::base64url_encode(hex("fbff")) == "-_8");
  CHECK(crypto::base64url_encode(hex("fbeffe")) == "--_-");
  Bytes all(256);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint8_t>(i);
  for (std::size_t length = 0; length <= all.size(); ++length) {
    const Bytes prefix(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(length));
    const std::string text = crypto::base64url_encode(prefix);
    CHECK(text.size() == (length * 4 + 2) / 3);
    auto back = crypto::base64url_decode(text);
    REQUIRE(back.ok());
    CHECK(*back == prefix);
  }
}

TEST_CASE("base64url decoding refuses padding and characters outside the url-safe alphabet", "[jose][base64url]") {
  const std::vector<std::string> refused = {
      "Zg==", "Zg=", "Zm8=", "Zm9vYmFy====",  // padding
      "Zm+v", "Zm/v",                          // the standard alphabet's 62 and 63
      "Zm9v\n", " Zm9v", "Zm 9v", "Zm9v\t", "Zm\r\n9v",  // whitespace anywhere
      std::string("Zm\0v", 4), "Zm9v\xc3\xa9", "Zm.v", "Zm9v!"};
  for (const auto& text : refused) {
    INFO(dauth::to_hex(ByteView::of(text)));
    auto decoded = crypto::base64url_decode(text);
    REQUIRE_FALSE(decoded.ok());
    CHECK(decoded.error().code == Errc::parse);
  }
}

// libsodium 1.0.18's url-safe lookup reads a char as signed: some bytes >= 0x80 came out as alphabet values (the
// fuzzer found "Zm9vYm\xd1Fy-_8" decoding), so jose.cpp checks the alphabet itself. Every byte value, in one place.
TEST_CASE("base64url decoding accepts exactly the 64 url-safe characters", "[jose][base64url]") {
  const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::size_t accepted = 0;
  for (int value = 0; value < 256; ++value) {
    const char c = static_cast<char>(value);
    // "Zm9vYmFy" with its fifth character replaced: canonical whichever alphabet character stands there.
    const std::string text = std::string("Zm9v") + c + "mFy";
    const bool in_alphabet = alphabet.find(c) != std::string::npos;
    INFO("byte " << value);
    auto decoded = dauth::crypto::base64url_decode(text);
    CHECK(decoded.ok() == in_alphabet);
    if (decoded.ok()) {
      ++accepted;
      CHECK(crypto::base64url_encode(*decoded) == text);
    } else {
      CHECK(decoded.error().code == Errc::parse);
    }
  }
  CHECK(accepted == 64);
}

TEST_CASE("base64url decoding refuses a length of 1 mod 4 and non-canonical trailing bits", "[jose][base64url]") {
  // One character is 6 bits: never a whole byte.
  for (const std::string text : {"Z", "Zm9vY", "Zm9vYmFyZ"}) {
    INFO(text);
    auto decoded = crypto::base64url_decode(text);
    REQUIRE_FALSE(decoded.ok());
    CHECK(decoded.error().code == Errc::parse);
  }
  // "Zg" is the one text for "f"; "Zh".."Zv" carry the same byte with non-zero leftover bits. Same for "Zm8" / "Zm9".
  for (const std::string text : {"Zh", "Zi", "Zp", "Zv", "Zm9", "Zm-", "Zm9vYh", "Zm9vYmF"}) {
    INFO(text);
    auto decoded = crypto::base64url_decode(text);
    REQUIRE_FALSE(decoded.ok());
    CHECK(decoded.error().code == Errc::parse);
  }
  // Every other character after "Z" (decodes to 'f' only with 4 zero bits) is refused: exactly 4 of 64 are canonical
  // ("g", "w", "A", "Q"), one for each value of the byte's two low bits.
  const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  std::size_t accepted = 0;
  for (char c : alphabet) accepted += crypto::base64url_decode(std::string("Z") + c).ok() ? 1 : 0;
  CHECK(accepted == 4);
}

TEST_CASE("base64url refusals do not quote the input", "[jose][base64url]") {
  const std::string text = "c2VjcmV0LXRva2VuLXZhbHVl=";
  auto decoded = crypto::base64url_decode(text);
  REQUIRE_FALSE(decoded.ok());
  CHECK(decoded.error().message.find("c2VjcmV0") == std::string::npos);
}

// AES-256 cases of the GCM specification (McGrew and Viega, test cases 13 to 16, as published with NIST's GCM
// material) and of NIST CAVP gcmEncryptExtIV256.rsp (96-bit IV, 128-bit tag).
TEST_CASE("AES-256-GCM matches the GCM specification and NIST CAVP known answers", "[jose][gcm][kat]") {
  struct Vector {
    const char* name;
    std::string key, iv, plaintext, aad, ciphertext, tag;
  };
  const std::string k15 = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
  const std::string p15 =
      "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de6"
      "57ba637b391aafd255";
  const std::string c15 =
      "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a"
      "0abcc9f662898015ad";
  const std::vector<Vector> vectors = {
      {"GCM test case 13", std::string(64, '0'), std::string(24, '0'), "", "", "",
       "530f8afbc74536b9a963b4f1c4cb738b"},
      {"GCM test case 14", std::string(64, '0'), std::string(24, '0'), std::string(32, '0'), "",
       "cea7403d4d606b6e074ec5d3baf39d18", "d0d1c8a799996bf0265b98b5d48ab919"},
      {"GCM test case 15", k15, "cafebabefacedbaddecaf888", p15, "", c15, "b094dac5d93471bdec1a502270e3cc6c"},
      {"GCM test case 16 (with AAD)", k15, "cafebabefacedbaddecaf888", p15.substr(0, 120),
       "feedfacedeadbeeffeedfacedeadbeefabaddad2", c15.substr(0, 120), "76fc6ece0f4e1768cddf8853bb2d551b"},
      {"CAVP gcmEncryptExtIV256 PTlen 128",
       "31bdadd96698c204aa9ce1448ea94ae1fb4a9a0b3c9d773b51bb1822666b8f22", "0d18e06c7c725ac9e362e1ce",
       "2db5168e932556f8089a0622981d017d", "", "fa4362189661d163fcd6a56d8bf0405a",
       "d636ac1bbedd5cc3ee727dc2ab4a9489"},
      {"CAVP gcmEncryptExtIV256 PTlen 104",
       "e5a0eb92cc2b064e1bc80891faf1fab5e9a17a9c3a984e25416720e30e6c2b21", "4742357c335913153ff0eb0f",
       "8499893e16b0ba8b007d54665a", "", "eb8e6175f1fe38eb1acf95fd51", "88a8b74bb74fda553e91020a23deed45"},
  };
  for (const auto& v : vectors) {
    INFO(v.name);
    const SecretBuffer key = key_of(v.key);
    auto sealed = crypto::detail::aes256gcm_seal(key, hex(v.iv), hex(v.aad), hex(v.plaintext));
    REQUIRE(sealed.ok());
    CHECK(dauth::to_hex(sealed->ciphertext) == v.ciphertext);
    CHECK(dauth::to_hex(sealed->tag) == v.tag);
    auto opened = crypto::detail::aes256gcm_open(key, hex(v.iv), hex(v.aad), hex(v.ciphertext), hex(v.tag));
    REQUIRE(opened.ok());
    CHECK(dauth::to_hex(*opened) == v.plaintext);
    // Any other AAD or tag is refused.
    Bytes tag = hex(v.tag);
    tag[15] ^= 0x01;
    auto forged = crypto::detail::aes256gcm_open(key, hex(v.iv), hex(v.aad), hex(v.ciphertext), tag);
    REQUIRE_FALSE(forged.ok());
    CHECK(forged.error().code == Errc::crypto);
    auto other_aad = crypto::detail::aes256gcm_open(key, hex(v.iv), hex(v.aad + "00"), hex(v.ciphertext),
                                                    hex(v.tag));
    REQUIRE_FALSE(other_aad.ok());
    CHECK(other_aad.error().code == Errc::crypto);
  }
}

// Made with Python's cryptography (OpenSSL) AESGCM: key 80..9f, IV 00..0b, AAD the base64url header.
TEST_CASE("A JWE made with a chosen IV matches an independently computed object", "[jose][jwe][kat]") {
  const std::string expected =
      "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIiwia2lkIjoiMDAxMTIyMzM0NDU1NjY3Nzg4OTlhYWJiY2NkZGVlZmZAbWVmLmV4YW1wbGUu"
      "bmV0Iiwic2VxIjo3fQ..AAECAwQFBgcICQoL.iGIQWTccSIfkADZOEnS-4LGq1KwXwr7IpC7hlpoOBVu_aiWz2w9G."
      "mo1XKtiILqKFCnSor5H9Bw";
  const SecretBuffer key = key_of("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
  auto made = crypto::jwe_encrypt_dir_a256gcm_with_iv(key, kHeader, ByteView::of(kPlaintext),
                                                      hex("000102030405060708090a0b"));
  REQUIRE(made.ok());
  CHECK(*made == expected);

  auto parsed = crypto::parse_jwe_compact(expected);
  REQUIRE(parsed.ok());
  CHECK(parsed->protected_header == kHeader);
  CHECK(parsed->protected_b64 == split_dots(expected)[0]);
  CHECK(dauth::to_hex(parsed->iv) == "000102030405060708090a0b");
  auto opened = crypto::jwe_decrypt_dir_a256gcm(key, *parsed);
  REQUIRE(opened.ok());
  CHECK(*opened == bytes_of(kPlaintext));
}

TEST_CASE("JWE objects get a fresh IV and round-trip including an empty plaintext", "[jose][jwe]") {
  const SecretBuffer key = SecretBuffer::random(crypto::kA256GcmKeySize);
  auto first = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView::of(kPlaintext));
  auto second = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView::of(kPlaintext));
  REQUIRE(first.ok());
  REQUIRE(second.ok());
  CHECK(split_dots(*first)[2] != split_dots(*second)[2]);
  CHECK(*first != *second);
  for (const std::string* text : {&*first, &*second}) {
    auto parsed = crypto::parse_jwe_compact(*text);
    REQUIRE(parsed.ok());
    auto opened = crypto::jwe_decrypt_dir_a256gcm(key, *parsed);
    REQUIRE(opened.ok());
    CHECK(*opened == bytes_of(kPlaintext));
  }

  auto empty = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView{});
  REQUIRE(empty.ok());
  CHECK(split_dots(*empty)[3].empty());
  auto parsed = crypto::parse_jwe_compact(*empty);
  REQUIRE(parsed.ok());
  auto opened = crypto::jwe_decrypt_dir_a256gcm(key, *parsed);
  REQUIRE(opened.ok());
  CHECK(opened->empty());
}

TEST_CASE("Flipping any bit of the header or IV or ciphertext or tag fails the tag", "[jose][jwe]") {
  const SecretBuffer key = SecretBuffer::random(crypto::kA256GcmKeySize);
  auto made = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView::of(kPlaintext));
  REQUIRE(made.ok());
  auto original = crypto::parse_jwe_compact(*made);
  REQUIRE(original.ok());
  REQUIRE(crypto::jwe_decrypt_dir_a256gcm(key, *original).ok());

  auto refused = [&](const crypto::JweCompact& object) {
    auto opened = crypto::jwe_decrypt_dir_a256gcm(key, object);
    return !opened.ok() && opened.error().code == Errc::crypto;
  };
  std::size_t flips = 0;
  std::size_t refusals = 0;
  // The header travels as text: a changed header is a changed base64url part, so the AAD changes.
  const Bytes header = bytes_of(original->protected_header);
  for (std::size_t bit = 0; bit < header.size() * 8; ++bit) {
    Bytes changed = header;
    changed[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
    crypto::JweCompact object = *original;
    object.protected_b64 = crypto::base64url_encode(changed);
    object.protected_header.assign(changed.begin(), changed.end());
    ++flips;
    refusals += refused(object) ? 1 : 0;
  }
  for (Bytes crypto::JweCompact::*part : {&crypto::JweCompact::iv, &crypto::JweCompact::ciphertext,
                                          &crypto::JweCompact::tag}) {
    for (std::size_t bit = 0; bit < ((*original).*part).size() * 8; ++bit) {
      crypto::JweCompact object = *original;
      (object.*part)[bit / 8] ^= static_cast<std::uint8_t>(1u << (bit % 8));
      ++flips;
      refusals += refused(object) ? 1 : 0;
    }
  }
  CHECK(flips == (kHeader.size() + crypto::kGcmIvSize + kPlaintext.size() + crypto::kGcmTagSize) * 8);
  CHECK(refusals == flips);

  // The same through the text: one changed character of each part.
  const auto parts = split_dots(*made);
  for (std::size_t index : {0u, 2u, 3u, 4u}) {
    auto changed = parts;
    char& c = changed[index][1];
    c = c == 'A' ? 'B' : 'A';
    auto parsed = crypto::parse_jwe_compact(join_dots(changed));
    REQUIRE(parsed.ok());
    CHECK(refused(*parsed));
  }

  const SecretBuffer other = SecretBuffer::random(crypto::kA256GcmKeySize);
  auto wrong_key = crypto::jwe_decrypt_dir_a256gcm(other, *original);
  REQUIRE_FALSE(wrong_key.ok());
  CHECK(wrong_key.error().code == Errc::crypto);
}

TEST_CASE("Keys of the wrong size and IVs of the wrong size are invalid arguments", "[jose][jwe]") {
  const SecretBuffer key = SecretBuffer::random(crypto::kA256GcmKeySize);
  auto made = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView::of(kPlaintext));
  REQUIRE(made.ok());
  auto parsed = crypto::parse_jwe_compact(*made);
  REQUIRE(parsed.ok());
  for (std::size_t size : {0u, 16u, 24u, 31u, 33u, 64u}) {
    INFO(size);
    const SecretBuffer wrong = SecretBuffer::random(size);
    auto encrypted = crypto::jwe_encrypt_dir_a256gcm(wrong, kHeader, ByteView::of(kPlaintext));
    REQUIRE_FALSE(encrypted.ok());
    CHECK(encrypted.error().code == Errc::invalid_argument);
    auto decrypted = crypto::jwe_decrypt_dir_a256gcm(wrong, *parsed);
    REQUIRE_FALSE(decrypted.ok());
    CHECK(decrypted.error().code == Errc::invalid_argument);
  }
  for (std::size_t size : {0u, 8u, 11u, 13u, 16u}) {
    INFO(size);
    auto encrypted = crypto::jwe_encrypt_dir_a256gcm_with_iv(key, kHeader, ByteView::of(kPlaintext), Bytes(size));
    REQUIRE_FALSE(encrypted.ok());
    CHECK(encrypted.error().code == Errc::invalid_argument);
  }
  // A JweCompact built by hand is checked too: decrypt never reads past an IV or tag of the wrong size.
  crypto::JweCompact short_iv = *parsed;
  short_iv.iv.pop_back();
  auto opened = crypto::jwe_decrypt_dir_a256gcm(key, short_iv);
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::invalid_argument);
  crypto::JweCompact short_tag = *parsed;
  short_tag.tag.pop_back();
  opened = crypto::jwe_decrypt_dir_a256gcm(key, short_tag);
  REQUIRE_FALSE(opened.ok());
  CHECK(opened.error().code == Errc::invalid_argument);
  // An empty header is no JWE.
  auto headless = crypto::jwe_encrypt_dir_a256gcm(key, "", ByteView::of(kPlaintext));
  REQUIRE_FALSE(headless.ok());
  CHECK(headless.error().code == Errc::invalid_argument);
}

TEST_CASE("parse_jwe_compact refuses other part counts and a non-empty encrypted key", "[jose][jwe]") {
  const SecretBuffer key = SecretBuffer::random(crypto::kA256GcmKeySize);
  auto made = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView::of(kPlaintext));
  REQUIRE(made.ok());
  const auto parts = split_dots(*made);
  REQUIRE(parts.size() == 5);
  REQUIRE(crypto::parse_jwe_compact(*made).ok());

  auto without = [&](std::size_t index) {
    auto changed = parts;
    changed.erase(changed.begin() + static_cast<std::ptrdiff_t>(index));
    return join_dots(changed);
  };
  CHECK(parse_refusal(without(4)).find("fewer") != std::string::npos);
  CHECK(parse_refusal(without(1)).find("fewer") != std::string::npos);
  parse_refusal(parts[0]);
  parse_refusal("");
  parse_refusal("....");
  CHECK(parse_refusal(*made + ".").find("more") != std::string::npos);
  CHECK(parse_refusal(*made + "." + parts[4]).find("more") != std::string::npos);
  parse_refusal(*made + "......");
  // A JWS (three parts) is no JWE either.
  parse_refusal(parts[0] + "." + parts[3] + "." + parts[4]);

  auto with_key = parts;
  with_key[1] = "AAAAAAAAAAAAAAAAAAAAAA";
  CHECK(parse_refusal(join_dots(with_key), with_key[1]).find("encrypted key") != std::string::npos);
  with_key[1] = "A";
  CHECK(parse_refusal(join_dots(with_key)).find("encrypted key") != std::string::npos);

  auto no_header = parts;
  no_header[0].clear();
  CHECK(parse_refusal(join_dots(no_header)).find("protected header") != std::string::npos);
}

TEST_CASE("parse_jwe_compact refuses IVs and tags of the wrong size", "[jose][jwe]") {
  const SecretBuffer key = SecretBuffer::random(crypto::kA256GcmKeySize);
  auto made = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView::of(kPlaintext));
  REQUIRE(made.ok());
  const auto parts = split_dots(*made);
  for (std::size_t size : {0u, 11u, 13u, 16u}) {
    INFO(size);
    auto changed = parts;
    changed[2] = crypto::base64url_encode(Bytes(size, 0x5a));
    CHECK(parse_refusal(join_dots(changed)).find("IV of " + std::to_string(size)) != std::string::npos);
  }
  for (std::size_t size : {0u, 12u, 15u, 17u, 32u}) {
    INFO(size);
    auto changed = parts;
    changed[4] = crypto::base64url_encode(Bytes(size, 0x5a));
    CHECK(parse_refusal(join_dots(changed)).find("tag of " + std::to_string(size)) != std::string::npos);
  }
}

TEST_CASE("parse_jwe_compact refuses bad base64url in each part and names the part", "[jose][jwe]") {
  const SecretBuffer key = SecretBuffer::random(crypto::kA256GcmKeySize);
  auto made = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView::of(kPlaintext));
  REQUIRE(made.ok());
  const auto parts = split_dots(*made);
  const std::vector<std::pair<std::size_t, std::string>> named = {
      {0, "protected header"}, {2, "IV"}, {3, "ciphertext"}, {4, "tag"}};
  for (const auto& [index, name] : named) {
    // The last spoil pads the part with 'A's to a length of 1 mod 4: a dangling 6-bit group.
    // (A valid part's length is 0, 2 or 3 mod 4, so at least one 'A' is added.)
    const std::string dangling((5 - parts[index].size() % 4) % 4, 'A');
    REQUIRE_FALSE(dangling.empty());
    for (const std::string& spoil :
         {std::string("="), std::string("+"), std::string(" "), std::string("\n"), dangling}) {
      auto changed = parts;
      changed[index] += spoil;
      INFO(name << " + " << dauth::to_hex(ByteView::of(spoil)));
      const std::string message = parse_refusal(join_dots(changed), parts[index]);
      CHECK(message.find(name + " (part " + std::to_string(index + 1) + ")") != std::string::npos);
    }
  }
}

TEST_CASE("parse_jwe_compact refuses input over the size limit before decoding it", "[jose][jwe]") {
  const SecretBuffer key = SecretBuffer::random(crypto::kA256GcmKeySize);
  // The largest plaintext whose object fits: ciphertext characters are 4 per 3 bytes.
  auto small = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, ByteView{});
  REQUIRE(small.ok());
  const std::size_t room = crypto::kMaxJweCompactSize - small->size();
  const std::size_t fitting = room / 4 * 3;
  auto largest = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, Bytes(fitting, 0x41));
  REQUIRE(largest.ok());
  CHECK(largest->size() <= crypto::kMaxJweCompactSize);
  auto parsed = crypto::parse_jwe_compact(*largest);
  REQUIRE(parsed.ok());
  auto opened = crypto::jwe_decrypt_dir_a256gcm(key, *parsed);
  REQUIRE(opened.ok());
  CHECK(opened->size() == fitting);

  // Encrypting what no peer would parse is refused.
  auto too_large = crypto::jwe_encrypt_dir_a256gcm(key, kHeader, Bytes(fitting + 3, 0x41));
  REQUIRE_FALSE(too_large.ok());
  CHECK(too_large.error().code == Errc::limit);

  // One character over the limit: refused whatever it holds.
  CHECK(parse_refusal(*largest + std::string(crypto::kMaxJweCompactSize + 1 - largest->size(), 'A'))
            .find("at most") != std::string::npos);
  CHECK(parse_refusal(std::string(crypto::kMaxJweCompactSize + 1, '.')).find("at most") != std::string::npos);
}

// python3-jwcrypto is an independent JOSE implementation (on python3-cryptography, i.e. OpenSSL).
TEST_CASE("JWE objects interoperate with python3-jwcrypto in both directions", "[jose][jwe][interop]") {
  if (dauth::test::run_command({"/usr/bin/python3", "-c", "import jwcrypto"}).exit_code != 0) {
    // The independent JOSE peer is part of what this test proves; scripts/install-deps installs it.
    FAIL("python3-jwcrypto is not installed for /usr/bin/python3: run scripts/install-deps");
  }
  const std::string script = std::string(DAUTH_SOURCE_DIR) + "/tests/crypto/jose_reference.py";
  const SecretBuffer key = SecretBuffer::random(crypto::kA256GcmKeySize);
  const std::string key_hex = dauth::to_hex(key.view());  // test key: travels on the child's stdin only

  // dauth makes, jwcrypto opens.
  const std::string header =
      R"({"alg":"dir","enc":"A256GCM","kid":"00112233445566778899aabbccddeeff@mef.example.net",)"
      R"("cty":"application/vnd.onem2m-preq+json","ori":"AAECAwQFBgcICQoLDA0ODw","rri":"EBESExQVFhcYGRobHB0eHw",)"
      R"("seq":0})";
  auto made = crypto::jwe_encrypt_dir_a256gcm(key, header, ByteView::of(kPlaintext));
  REQUIRE(made.ok());
  auto decrypted = dauth::test::run_command(
      {"/usr/bin/python3", script}, R"({"op":"decrypt","key":")" + key_hex + R"(","jwe":")" + *made + R"("})");
  INFO(decrypted.output);
  REQUIRE(decrypted.exit_code == 0);
  CHECK(decrypted.output == dauth::to_hex(ByteView::of(kPlaintext)) + "\n");

  // jwcrypto refuses what dauth's tag check refuses: a changed ciphertext.
  auto parts = split_dots(*made);
  parts[3][0] = parts[3][0] == 'A' ? 'B' : 'A';
  auto forged = dauth::test::run_command({"/usr/bin/python3", script}, R"({"op":"decrypt","key":")" + key_hex +
                                                                           R"(","jwe":")" + join_dots(parts) +
                                                                           R"("})");
  CHECK(forged.exit_code != 0);

  // jwcrypto makes, dauth opens.
  const std::string plaintext = R"({"rsc":2000,"coap":205,"rqi":"r1"})";
  auto encrypted = dauth::test::run_command(
      {"/usr/bin/python3", script},
      R"({"op":"encrypt","key":")" + key_hex + R"(","header":)" + header + R"(,"plaintext":")" +
          dauth::to_hex(ByteView::of(plaintext)) + R"("})");
  INFO(encrypted.output);
  REQUIRE(encrypted.exit_code == 0);
  std::string compact = encrypted.output;
  while (!compact.empty() && compact.back() == '\n') compact.pop_back();
  auto parsed = crypto::parse_jwe_compact(compact);
  REQUIRE(parsed.ok());
  CHECK(parsed->protected_header.find(R"("kid")") != std::string::npos);
  auto opened = crypto::jwe_decrypt_dir_a256gcm(key, *parsed);
  REQUIRE(opened.ok());
  CHECK(*opened == bytes_of(plaintext));
  const SecretBuffer other = SecretBuffer::random(crypto::kA256GcmKeySize);
  auto wrong = crypto::jwe_decrypt_dir_a256gcm(other, *parsed);
  REQUIRE_FALSE(wrong.ok());
  CHECK(wrong.error().code == Errc::crypto);
}

#include "dauth/secret.hpp"

#include <sodium.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <stdexcept>

namespace dauth {

void ensure_sodium_initialised() {
  // sodium_init() is idempotent and thread-safe; it returns 1 when already initialised.
  static const int status = sodium_init();
  if (status < 0) {
    std::fputs("dauth: libsodium failed to initialise; refusing to run without a CSPRNG\n", stderr);
    std::abort();
  }
}

SecretBuffer::SecretBuffer(std::size_t size) {
  if (size == 0) return;
  ensure_sodium_initialised();
  data_ = static_cast<std::uint8_t*>(sodium_malloc(size));
  if (data_ == nullptr) throw std::bad_alloc();
  size_ = size;
  sodium_memzero(data_, size_);  // sodium_malloc fills with 0xdb; secrets start from zero
}

SecretBuffer::~SecretBuffer() {
  if (data_ != nullptr) sodium_free(data_);  // zeroes, then unmaps with its guard pages
}

SecretBuffer::SecretBuffer(SecretBuffer&& other) noexcept : data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

SecretBuffer& SecretBuffer::operator=(SecretBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) sodium_free(data_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

SecretBuffer SecretBuffer::random(std::size_t size) {
  SecretBuffer buffer(size);
  if (size > 0) randombytes_buf(buffer.data_, size);
  return buffer;
}

SecretBuffer SecretBuffer::copy_of(ByteView bytes) {
  SecretBuffer buffer(bytes.size);
  if (bytes.size > 0) std::copy(bytes.data, bytes.data + bytes.size, buffer.data_);
  return buffer;
}

SecretBuffer SecretBuffer::clone() const { return copy_of(view()); }

SecretBuffer SecretBuffer::slice(std::size_t offset, std::size_t length) const {
  if (offset > size_ || length > size_ - offset) {
    throw std::out_of_range("SecretBuffer::slice past the end");
  }
  return copy_of(ByteView(data_ + offset, length));
}

bool SecretBuffer::equals(ByteView other) const noexcept {
  if (other.size != size_) return false;
  if (size_ == 0) return true;
  return sodium_memcmp(data_, other.data, size_) == 0;
}

bool SecretBuffer::equals(const SecretBuffer& other) const noexcept { return equals(other.view()); }

void SecretBuffer::wipe() noexcept {
  if (data_ != nullptr) sodium_memzero(data_, size_);
}

std::string SecretBuffer::fingerprint() const {
  ensure_sodium_initialised();
  std::uint8_t hash[crypto_generichash_BYTES];
  crypto_generichash(hash, sizeof hash, data_, size_, nullptr, 0);
  return to_hex(ByteView(hash, 8));
}

void random_bytes(std::uint8_t* out, std::size_t size) {
  if (size == 0) return;  // out may be null for an empty vector; libsodium declares it non-null
  ensure_sodium_initialised();
  randombytes_buf(out, size);
}

std::string to_hex(ByteView bytes, bool upper_case) {
  static constexpr char kLower[] = "0123456789abcdef";
  static constexpr char kUpper[] = "0123456789ABCDEF";
  const char* digits = upper_case ? kUpper : kLower;
  std::string text;
  text.reserve(bytes.size * 2);
  for (std::size_t i = 0; i < bytes.size; ++i) {
    text.push_back(digits[bytes.data[i] >> 4]);
    text.push_back(digits[bytes.data[i] & 0x0f]);
  }
  return text;
}

namespace {
Error hex_error(std::string_view hex) {
  return make_error(Errc::parse, "not hexadecimal: " + std::to_string(hex.size()) +
                                     " characters; expected an even number of 0-9, a-f, A-F");
}
}  // namespace

Result<Bytes> from_hex(std::string_view hex) {
  if (hex.size() % 2 != 0) return hex_error(hex);
  ensure_sodium_initialised();
  Bytes out(hex.size() / 2);
  std::size_t written = 0;
  const char* end = nullptr;
  if (sodium_hex2bin(out.data(), out.size(), hex.data(), hex.size(), nullptr, &written, &end) != 0 ||
      written != out.size() || end != hex.data() + hex.size()) {
    return hex_error(hex);
  }
  return out;
}

Result<SecretBuffer> secret_from_hex(std::string_view hex) {
  // The message must not quote the input: it is key material.
  if (hex.size() % 2 != 0) return hex_error(hex);
  ensure_sodium_initialised();
  SecretBuffer out(hex.size() / 2);
  std::size_t written = 0;
  const char* end = nullptr;
  if (sodium_hex2bin(out.data(), out.size(), hex.data(), hex.size(), nullptr, &written, &end) != 0 ||
      written != out.size() || end != hex.data() + hex.size()) {
    return hex_error(hex);
  }
  return out;
}

}  // namespace dauth

// SecretBuffer: the only type that holds key material (docs/conventions.md §10).
//
// Backed by libsodium guarded memory (sodium_malloc: guard pages, mlock where the limit allows, excluded from core
// dumps with MADV_DONTDUMP). Secrets of up to 1 KiB share guarded 64 KiB arenas (one region per secret would
// exhaust the process's memory mappings at ~40k keys) and are zeroed the moment they are released; larger ones get
// a region of their own, zeroed and unmapped on release. Movable, never copyable. Compare with equals() (constant
// time); print only fingerprint(), never the bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dauth/error.hpp"

namespace dauth {

// Non-owning view of bytes that are not secret (or whose secrecy the caller manages for the duration of a call).
struct ByteView {
  const std::uint8_t* data = nullptr;
  std::size_t size = 0;

  ByteView() = default;
  ByteView(const std::uint8_t* d, std::size_t n) : data(d), size(n) {}
  ByteView(const std::vector<std::uint8_t>& v) : data(v.data()), size(v.size()) {}  // NOLINT: implicit view
  static ByteView of(std::string_view s) {
    return {reinterpret_cast<const std::uint8_t*>(s.data()), s.size()};
  }
};

using Bytes = std::vector<std::uint8_t>;

// Calls sodium_init() once; safe to call from anywhere, any number of times. Aborts if libsodium cannot start:
// without a working CSPRNG nothing in this process may run.
void ensure_sodium_initialised();

class SecretBuffer {
 public:
  SecretBuffer() noexcept = default;
  // size bytes, zero-filled. Throws std::bad_alloc when guarded memory is exhausted.
  explicit SecretBuffer(std::size_t size);
  ~SecretBuffer();

  SecretBuffer(SecretBuffer&& other) noexcept;
  SecretBuffer& operator=(SecretBuffer&& other) noexcept;
  SecretBuffer(const SecretBuffer&) = delete;
  SecretBuffer& operator=(const SecretBuffer&) = delete;

  static SecretBuffer random(std::size_t size);
  static SecretBuffer copy_of(ByteView bytes);
  // Explicit deep copy: the only way to duplicate a secret, so that every copy is visible in the code.
  SecretBuffer clone() const;

  std::uint8_t* data() noexcept { return data_; }
  const std::uint8_t* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  ByteView view() const noexcept { return {data_, size_}; }

  // A copy of bytes [offset, offset + length); throws std::out_of_range past the end.
  SecretBuffer slice(std::size_t offset, std::size_t length) const;

  // Constant-time equality (sodium_memcmp); buffers of different sizes are unequal.
  bool equals(const SecretBuffer& other) const noexcept;
  bool equals(ByteView other) const noexcept;

  // Zeroes the content in place (the buffer keeps its size). The destructor wipes anyway.
  void wipe() noexcept;

  // First 8 bytes of BLAKE2b-256(content) in lower-case hex: safe for logs, not reversible.
  std::string fingerprint() const;

 private:
  std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

namespace detail {
// For the wipe test only: true iff former_address was a small secret's slot and its size bytes are all zero now.
bool released_secret_is_wiped(const std::uint8_t* former_address, std::size_t size);
}  // namespace detail

// Cryptographically secure random bytes (randombytes_buf).
void random_bytes(std::uint8_t* out, std::size_t size);
// A uniformly distributed random number in [0, upper_bound) (randombytes_uniform: no modulo bias); 0 if the bound
// is 0.
std::uint32_t random_uniform(std::uint32_t upper_bound);

// Hex of non-secret bytes (identifiers, serials, hashes).
std::string to_hex(ByteView bytes, bool upper_case = false);
Result<Bytes> from_hex(std::string_view hex);

// Hex into guarded memory without an intermediate copy (key files). Whitespace is not accepted.
Result<SecretBuffer> secret_from_hex(std::string_view hex);
// The secret as lower-case hex text followed by a newline, in guarded memory (a key file's content), constant
// time.
SecretBuffer secret_to_hex_line(const SecretBuffer& secret);

}  // namespace dauth

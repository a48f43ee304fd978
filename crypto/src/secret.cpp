#include "dauth/secret.hpp"

#include <sodium.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <new>
#include <stdexcept>
#include <vector>

namespace dauth {

namespace {

// Small secrets live in slots of shared guarded arenas. One sodium_malloc per secret costs ~40 µs and three memory
// mappings (guard page, data, guard page), and a process may hold only vm.max_map_count (65530) mappings: a store
// with 100k keys failed with bad_alloc at 20–40k live buffers (measured). An arena is one sodium_malloc region
// (guard pages around it, mlock'ed where the limit allows, MADV_DONTDUMP); a released slot is zeroed at once and
// reused. Slots inside an arena are not guarded from each other; larger secrets keep a region of their own.
class SecretArenas {
 public:
  static constexpr std::array<std::size_t, 9> kSlotSizes = {16, 32, 48, 64, 96, 128, 256, 512, 1024};
  static constexpr std::size_t kArenaSize = 64 * 1024;

  static SecretArenas& instance() {
    // Never destroyed: SecretBuffers with static storage duration may be released after main() returns.
    static SecretArenas* arenas = new SecretArenas();
    return *arenas;
  }

  static int class_of(std::size_t size) {
    for (std::size_t i = 0; i < kSlotSizes.size(); ++i) {
      if (size <= kSlotSizes[i]) return static_cast<int>(i);
    }
    return -1;
  }

  std::uint8_t* allocate(int size_class) {
    const std::lock_guard<std::mutex> lock(mutex_);
    auto& free_slots = free_[static_cast<std::size_t>(size_class)];
    if (free_slots.empty()) {
      auto* arena = static_cast<std::uint8_t*>(sodium_malloc(kArenaSize));
      if (arena == nullptr) return nullptr;
      sodium_memzero(arena, kArenaSize);
      arenas_.push_back(arena);
      const std::size_t slot = kSlotSizes[static_cast<std::size_t>(size_class)];
      for (std::size_t offset = kArenaSize - kArenaSize % slot; offset >= slot; offset -= slot) {
        free_slots.push_back(arena + offset - slot);
      }
    }
    std::uint8_t* slot = free_slots.back();
    free_slots.pop_back();
    return slot;
  }

  void release(std::uint8_t* slot, int size_class) {
    sodium_memzero(slot, kSlotSizes[static_cast<std::size_t>(size_class)]);
    const std::lock_guard<std::mutex> lock(mutex_);
    free_[static_cast<std::size_t>(size_class)].push_back(slot);
  }

  bool owns(const std::uint8_t* address, std::size_t size) {
    const std::lock_guard<std::mutex> lock(mutex_);
    return std::any_of(arenas_.begin(), arenas_.end(), [&](const std::uint8_t* arena) {
      return address >= arena && size <= kArenaSize && address <= arena + (kArenaSize - size);
    });
  }

 private:
  std::mutex mutex_;
  std::array<std::vector<std::uint8_t*>, kSlotSizes.size()> free_;
  std::vector<std::uint8_t*> arenas_;
};

std::uint8_t* allocate_secret(std::size_t size) {
  const int size_class = SecretArenas::class_of(size);
  auto* memory = size_class >= 0 ? SecretArenas::instance().allocate(size_class)
                                 : static_cast<std::uint8_t*>(sodium_malloc(size));
  if (memory == nullptr) throw std::bad_alloc();
  return memory;
}

void release_secret(std::uint8_t* memory, std::size_t size) {
  const int size_class = SecretArenas::class_of(size);
  if (size_class >= 0) {
    SecretArenas::instance().release(memory, size_class);
  } else {
    sodium_free(memory);  // zeroes, then unmaps with its guard pages
  }
}

}  // namespace

namespace detail {
bool released_secret_is_wiped(const std::uint8_t* former_address, std::size_t size) {
  if (!SecretArenas::instance().owns(former_address, size)) return false;
  return sodium_is_zero(former_address, size) == 1;
}
}  // namespace detail

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
  data_ = allocate_secret(size);
  size_ = size;
  sodium_memzero(data_, size_);  // sodium_malloc fills with 0xdb; secrets start from zero
}

SecretBuffer::~SecretBuffer() {
  if (data_ != nullptr) release_secret(data_, size_);
}

SecretBuffer::SecretBuffer(SecretBuffer&& other) noexcept : data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

SecretBuffer& SecretBuffer::operator=(SecretBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) release_secret(data_, size_);
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
  std::string text = to_hex(ByteView(hash, 8));
  sodium_memzero(hash, sizeof hash);  // the full digest of a key stays out of freed stack memory
  return text;
}

void random_bytes(std::uint8_t* out, std::size_t size) {
  if (size == 0) return;  // out may be null for an empty vector; libsodium declares it non-null
  ensure_sodium_initialised();
  randombytes_buf(out, size);
}

std::uint32_t random_uniform(std::uint32_t upper_bound) {
  if (upper_bound == 0) return 0;
  ensure_sodium_initialised();
  return randombytes_uniform(upper_bound);
}

SecretBuffer secret_to_hex_line(const SecretBuffer& secret) {
  SecretBuffer text(secret.size() * 2 + 1);
  // sodium_bin2hex runs in constant time and writes a NUL after the digits: the newline takes its place.
  sodium_bin2hex(reinterpret_cast<char*>(text.data()), text.size(), secret.data(), secret.size());
  text.data()[secret.size() * 2] = '\n';
  return text;
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
// The message never quotes the input: for secret_from_hex it is key material.
Error hex_error(std::string_view hex) {
  return make_error(Errc::parse, "not hexadecimal: " + std::to_string(hex.size()) +
                                     " characters; expected an even number of 0-9, a-f, A-F");
}

// Decodes hex into a Buffer (Bytes or SecretBuffer) of half its size, written in place: no intermediate copy.
template <class Buffer>
Result<Buffer> decode_hex(std::string_view hex) {
  if (hex.size() % 2 != 0) return hex_error(hex);
  if (hex.empty()) return Buffer();  // sodium_hex2bin declares its output non-null; an empty buffer has none
  ensure_sodium_initialised();
  Buffer out(hex.size() / 2);
  std::size_t written = 0;
  const char* end = nullptr;
  if (sodium_hex2bin(out.data(), out.size(), hex.data(), hex.size(), nullptr, &written, &end) != 0 ||
      written != out.size() || end != hex.data() + hex.size()) {
    return hex_error(hex);
  }
  return out;
}
}  // namespace

Result<Bytes> from_hex(std::string_view hex) { return decode_hex<Bytes>(hex); }

Result<SecretBuffer> secret_from_hex(std::string_view hex) { return decode_hex<SecretBuffer>(hex); }

}  // namespace dauth

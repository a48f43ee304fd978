#include "keystore_codec.hpp"

#include <sodium.h>

#include <cstring>
#include <limits>
#include <type_traits>

#include "dauth/crypto/identifiers.hpp"

namespace dauth::crypto::keystore_codec {

static_assert(kNonceSize == crypto_aead_xchacha20poly1305_ietf_NPUBBYTES, "XChaCha20-Poly1305 nonce size");
static_assert(kTagSize == crypto_aead_xchacha20poly1305_ietf_ABYTES, "XChaCha20-Poly1305 tag size");
static_assert(kSealingKeySize == crypto_aead_xchacha20poly1305_ietf_KEYBYTES, "XChaCha20-Poly1305 key size");
static_assert(kMaxCiphertextSize <= std::numeric_limits<std::uint32_t>::max(), "length field is u32");

namespace {

void put_u16(std::uint8_t* out, std::uint16_t v) {
  out[0] = static_cast<std::uint8_t>(v >> 8);
  out[1] = static_cast<std::uint8_t>(v);
}
void put_u32(std::uint8_t* out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<std::uint8_t>(v >> (24 - 8 * i));
}
void put_u64(std::uint8_t* out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(v >> (56 - 8 * i));
}
std::uint16_t get_u16(const std::uint8_t* in) { return static_cast<std::uint16_t>((in[0] << 8) | in[1]); }
std::uint32_t get_u32(const std::uint8_t* in) {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | in[i];
  return v;
}
std::uint64_t get_u64(const std::uint8_t* in) {
  std::uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | in[i];
  return v;
}

void build_additional_data(std::uint8_t* ad, FileKind kind, std::uint64_t generation, std::uint64_t sequence) {
  const std::string_view magic = magic_of(kind);
  std::memcpy(ad, magic.data(), kMagicSize);
  ad[kMagicSize] = static_cast<std::uint8_t>(kind);
  put_u16(ad + kMagicSize + 1, kFormatVersion);
  put_u64(ad + kMagicSize + 3, generation);
  put_u64(ad + kMagicSize + 11, sequence);
}

// ---- record layout: one description per struct, shared by the sizer, the writer and the reader -----------------
// Each archive gets the field name (for error messages) and the field; the order of the calls is the file format.

template <class R, class T>
using IfRecord = std::enable_if_t<std::is_same_v<std::remove_const_t<R>, T>, int>;

template <class A, class R, IfRecord<R, BootstrapKeyRecord> = 0>
void fields(A& a, R& r) {
  a.text("kpm_id", r.kpm_id);
  a.secret("kpm", r.kpm);
  a.text("ae_id", r.ae_id);
}
template <class A, class R, IfRecord<R, EnroleeRecord> = 0>
void fields(A& a, R& r) {
  a.text("credential_id", r.credential_id);
  a.secret("kpm", r.kpm);
  a.text("enrolee_id", r.enrolee_id);
  a.text_list("targets", r.targets);
  a.i64("enrolment_lifetime_s", r.enrolment_lifetime_s);
  a.boolean("certificate_enrolment", r.certificate_enrolment);
}
template <class A, class R, IfRecord<R, EnrolmentKeyRecord> = 0>
void fields(A& a, R& r) {
  a.text("ke_id", r.ke_id);
  a.secret("ke", r.ke);
  a.text("enrolee_id", r.enrolee_id);
  a.text_list("targets", r.targets);
  a.i64("expires_at", r.expires_at);
  a.i64("revoked_at", r.revoked_at);
}
template <class A, class R, IfRecord<R, SessionKeyRecord> = 0>
void fields(A& a, R& r) {
  a.text("ke_id", r.ke_id);
  a.secret("key", r.key);
  a.text("peer_ae_id", r.peer_ae_id);
  a.text("local_ae_id", r.local_ae_id);
  a.i32("suid", r.suid);
  a.i64("expires_at", r.expires_at);
}
template <class A, class R, IfRecord<R, CertificateRecord> = 0>
void fields(A& a, R& r) {
  a.text("name", r.name);
  a.blob_list("chain_der", r.chain_der);
  a.secret("private_key_der", r.private_key_der);
  a.i64("expires_at", r.expires_at);
  a.optional_uri("private_key_uri", r.private_key_uri);
}
template <class A, class R, IfRecord<R, IssuanceRecord> = 0>
void fields(A& a, R& r) {
  a.text("serial_hex", r.serial_hex);
  a.text("ae_id", r.ae_id);
  a.i64("issued_at", r.issued_at);
  a.i64("expires_at", r.expires_at);
  a.i64("revoked_at", r.revoked_at);
}
template <class A, class R, IfRecord<R, PinnedKeyRecord> = 0>
void fields(A& a, R& r) {
  a.text("public_key_id", r.public_key_id);
  a.text("ae_id", r.ae_id);
}
template <class A, class R, IfRecord<R, RevocationListRecord> = 0>
void fields(A& a, R& r) {
  a.text("mef_fqdn", r.mef_fqdn);
  a.text("issuer", r.issuer);
  a.i64("version", r.version);
  a.text_list("serials", r.serials);
  a.i64("received_at", r.received_at);
}

// Counts bytes; also notes the first field that does not fit its length prefix.
class Sizer {
 public:
  void text(const char* name, const std::string& s) { add(name, 2, s.size(), 0xffff); }
  void secret(const char* name, const SecretBuffer& s) { add(name, 4, s.size(), 0xffffffffu); }
  void text_list(const char* name, const std::vector<std::string>& list) {
    count(name, list.size());
    for (const auto& s : list) text(name, s);
  }
  void blob_list(const char* name, const std::vector<Bytes>& list) {
    count(name, list.size());
    for (const auto& b : list) add(name, 4, b.size(), 0xffffffffu);
  }
  void i64(const char*, std::int64_t) { size += 8; }
  void i32(const char*, int) { size += 4; }
  void boolean(const char*, bool) { size += 1; }
  void optional_uri(const char* name, const std::string& s) {
    if (!s.empty()) text(name, s);
  }

  std::size_t size = 1;  // kind byte
  const char* too_long = nullptr;

 private:
  void add(const char* name, std::size_t prefix, std::size_t n, std::size_t max) {
    if (n > max && too_long == nullptr) too_long = name;
    size += prefix + n;
  }
  void count(const char* name, std::size_t n) {
    if (n > 0xffff && too_long == nullptr) too_long = name;
    size += 2;
  }
};

class Writer {
 public:
  explicit Writer(std::uint8_t* out) : p_(out) {}
  void text(const char*, const std::string& s) {
    put_u16(p_, static_cast<std::uint16_t>(s.size()));
    raw(s.data(), s.size(), 2);
  }
  void secret(const char*, const SecretBuffer& s) {
    put_u32(p_, static_cast<std::uint32_t>(s.size()));
    raw(s.data(), s.size(), 4);
  }
  void text_list(const char* name, const std::vector<std::string>& list) {
    put_u16(p_, static_cast<std::uint16_t>(list.size()));
    p_ += 2;
    for (const auto& s : list) text(name, s);
  }
  void blob_list(const char*, const std::vector<Bytes>& list) {
    put_u16(p_, static_cast<std::uint16_t>(list.size()));
    p_ += 2;
    for (const auto& b : list) {
      put_u32(p_, static_cast<std::uint32_t>(b.size()));
      raw(b.data(), b.size(), 4);
    }
  }
  void i64(const char*, std::int64_t v) {
    put_u64(p_, static_cast<std::uint64_t>(v));
    p_ += 8;
  }
  void i32(const char*, int v) {
    put_u32(p_, static_cast<std::uint32_t>(static_cast<std::int32_t>(v)));
    p_ += 4;
  }
  void boolean(const char*, bool v) { *p_++ = v ? 1 : 0; }
  void byte(std::uint8_t v) { *p_++ = v; }
  void optional_uri(const char* name, const std::string& s) {
    if (!s.empty()) text(name, s);
  }

 private:
  void raw(const void* data, std::size_t n, std::size_t prefix) {
    p_ += prefix;
    if (n > 0) std::memcpy(p_, data, n);
    p_ += n;
  }
  std::uint8_t* p_;
};

// Bounds-checked reader over plaintext. The first failure is kept and every later read is a no-op, so a record
// description runs to its end and the caller checks failed() once.
class Reader {
 public:
  Reader(ByteView in, SecretFields secrets, std::string context)
      : in_(in), secrets_(secrets), context_(std::move(context)) {}

  void text(const char* name, std::string& s) {
    const std::uint8_t* p = take_prefixed(name, 2);
    if (p != nullptr) s.assign(reinterpret_cast<const char*>(p), last_length_);
  }
  void secret(const char* name, SecretBuffer& s) {
    const std::uint8_t* p = take_prefixed(name, 4);
    if (p != nullptr && secrets_ == SecretFields::copy) s = SecretBuffer::copy_of(ByteView(p, last_length_));
  }
  void text_list(const char* name, std::vector<std::string>& list) {
    const std::uint8_t* p = take(name, 2);
    if (p == nullptr) return;
    const std::uint16_t n = get_u16(p);
    // Each item needs at least its 2-byte length: a count that cannot fit is refused before any allocation.
    if (std::size_t{n} * 2 > remaining()) {
      return fail(name, "list of " + std::to_string(n) + " items cannot fit in the " + std::to_string(remaining()) +
                            " bytes left");
    }
    list.resize(n);
    for (auto& s : list) text(name, s);
  }
  void blob_list(const char* name, std::vector<Bytes>& list) {
    const std::uint8_t* p = take(name, 2);
    if (p == nullptr) return;
    const std::uint16_t n = get_u16(p);
    if (std::size_t{n} * 4 > remaining()) {
      return fail(name, "list of " + std::to_string(n) + " items cannot fit in the " + std::to_string(remaining()) +
                            " bytes left");
    }
    if (secrets_ == SecretFields::copy) list.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint8_t* q = take_prefixed(name, 4);
      if (q == nullptr) return;
      if (secrets_ == SecretFields::copy) list[i].assign(q, q + last_length_);
    }
  }
  void i64(const char* name, std::int64_t& v) {
    const std::uint8_t* p = take(name, 8);
    if (p != nullptr) v = static_cast<std::int64_t>(get_u64(p));
  }
  void i32(const char* name, int& v) {
    const std::uint8_t* p = take(name, 4);
    if (p != nullptr) v = static_cast<std::int32_t>(get_u32(p));
  }
  void boolean(const char* name, bool& v) {
    const std::uint8_t* p = take(name, 1);
    if (p == nullptr) return;
    if (*p > 1) return fail(name, "boolean byte " + std::to_string(*p) + ", must be 0 or 1");
    v = *p == 1;
  }
  // An optional trailing field (docs/keystore-format.md): absent when the record ends here; present only as a
  // non-empty string that starts with "pkcs11:", so that a record's encoding stays canonical and a measured entry
  // followed by other bytes (measure_entry) does not take them for the field. Bytes that are not such a field are
  // left for expect_end() to refuse.
  void optional_uri(const char* name, std::string& s) {
    constexpr std::string_view kScheme = "pkcs11:";
    if (failed() || remaining() < 2) return;
    const std::size_t n = get_u16(in_.data + pos_);
    if (n < kScheme.size() || n > remaining() - 2 ||
        std::memcmp(in_.data + pos_ + 2, kScheme.data(), kScheme.size()) != 0) {
      return;
    }
    text(name, s);
  }
  std::optional<std::uint8_t> byte(const char* name) {
    const std::uint8_t* p = take(name, 1);
    if (p == nullptr) return std::nullopt;
    return *p;
  }
  std::optional<std::uint64_t> u64(const char* name) {
    const std::uint8_t* p = take(name, 8);
    if (p == nullptr) return std::nullopt;
    return get_u64(p);
  }
  void expect_end() {
    if (!failed() && remaining() != 0) {
      fail_at(std::to_string(remaining()) + " trailing bytes after the last field");
    }
  }

  std::size_t position() const { return pos_; }
  std::size_t remaining() const { return in_.size - pos_; }
  bool failed() const { return error_.has_value(); }
  Error take_error() { return std::move(*error_); }
  void fail(const char* name, const std::string& what) { fail_at(std::string("field '") + name + "': " + what); }

 private:
  void fail_at(const std::string& what) {
    if (!error_) {
      error_ = make_error(Errc::parse, context_ + " at plaintext byte " + std::to_string(pos_) + ": " + what);
    }
  }
  const std::uint8_t* take(const char* name, std::size_t n) {
    if (failed()) return nullptr;
    if (n > remaining()) {
      fail(name, "needs " + std::to_string(n) + " bytes, " + std::to_string(remaining()) + " left");
      return nullptr;
    }
    const std::uint8_t* p = in_.data + pos_;
    pos_ += n;
    return p;
  }
  // A length prefix of prefix_size bytes and that many bytes; the length is left in last_length_.
  const std::uint8_t* take_prefixed(const char* name, std::size_t prefix_size) {
    const std::uint8_t* p = take(name, prefix_size);
    if (p == nullptr) return nullptr;
    const std::size_t n = prefix_size == 2 ? get_u16(p) : get_u32(p);
    if (n > remaining()) {
      fail(name, "length " + std::to_string(n) + " runs past the end (" + std::to_string(remaining()) + " bytes left)");
      return nullptr;
    }
    last_length_ = n;
    const std::uint8_t* data = in_.data + pos_;
    pos_ += n;
    return data;
  }

  ByteView in_;
  std::size_t pos_ = 0;
  std::size_t last_length_ = 0;
  SecretFields secrets_;
  std::string context_;
  std::optional<Error> error_;
};

template <std::size_t I = 0>
std::optional<Record> default_record(std::uint8_t kind) {
  if constexpr (I < std::variant_size_v<Record>) {
    if (kind == I + 1) return Record(std::in_place_index<I>);
    return default_record<I + 1>(kind);
  } else {
    return std::nullopt;
  }
}

std::string kind_list() { return "1–" + std::to_string(std::variant_size_v<Record>); }

// Reads the kind byte and the fields of one record from reader.
std::optional<Record> read_record(Reader& reader) {
  const std::optional<std::uint8_t> kind = reader.byte("kind");
  if (!kind) return std::nullopt;
  std::optional<Record> record = default_record(*kind);
  if (!record) {
    reader.fail("kind", "unknown record kind " + std::to_string(*kind) + " (known: " + kind_list() + ")");
    return std::nullopt;
  }
  std::visit([&](auto& r) { fields(reader, r); }, *record);
  if (reader.failed()) return std::nullopt;
  return record;
}

}  // namespace

std::string_view magic_of(FileKind kind) noexcept {
  return kind == FileKind::snapshot ? std::string_view("DAUTHKS1") : std::string_view("DAUTHJ01");
}

void append_header(Bytes& out, FileKind kind, std::uint64_t generation) {
  const std::string_view magic = magic_of(kind);
  const std::size_t at = out.size();
  out.resize(at + kHeaderSize);
  std::memcpy(out.data() + at, magic.data(), kMagicSize);
  put_u16(out.data() + at + kMagicSize, kind == FileKind::journal ? kJournalVersion : kFormatVersion);
  put_u64(out.data() + at + kMagicSize + 2, generation);
}

Result<FileHeader> parse_header(ByteView file, FileKind expected, std::string_view file_name) {
  const std::string where(file_name);
  if (file.size < kHeaderSize) {
    return make_error(Errc::corrupt, where + ": " + std::to_string(file.size) + " bytes, shorter than the " +
                                         std::to_string(kHeaderSize) + "-byte header (truncated)");
  }
  const std::string_view magic = magic_of(expected);
  if (std::memcmp(file.data, magic.data(), kMagicSize) != 0) {
    return make_error(Errc::corrupt,
                      where + ": byte offset 0: magic " +
                          quote_for_error(std::string_view(reinterpret_cast<const char*>(file.data), kMagicSize)) +
                          ", expected '" + std::string(magic) + "'");
  }
  const std::uint16_t version = get_u16(file.data + kMagicSize);
  const std::uint16_t newest = expected == FileKind::journal ? kJournalVersion : kFormatVersion;
  if (version < kFormatVersion || version > newest) {
    return make_error(Errc::corrupt, where + ": byte offset " + std::to_string(kMagicSize) + ": format version " +
                                         std::to_string(version) + ", this build reads version " +
                                         (newest == kFormatVersion ? std::to_string(kFormatVersion)
                                                                   : std::to_string(kFormatVersion) + " or " +
                                                                         std::to_string(newest)));
  }
  FileHeader header;
  header.kind = expected;
  header.version = version;
  header.generation = get_u64(file.data + kMagicSize + 2);
  return header;
}

Frame read_frame(ByteView file, std::size_t offset) {
  Frame frame;
  if (offset > file.size || file.size - offset < kLengthSize) return frame;  // truncated
  frame.length = get_u32(file.data + offset);
  if (frame.length < kMinCiphertextSize || frame.length > kMaxCiphertextSize) {
    frame.status = FrameStatus::bad_length;
    return frame;
  }
  const std::size_t total = kLengthSize + kNonceSize + frame.length;
  if (file.size - offset < total) return frame;  // truncated
  frame.status = FrameStatus::complete;
  frame.nonce = ByteView(file.data + offset + kLengthSize, kNonceSize);
  frame.ciphertext = ByteView(file.data + offset + kLengthSize + kNonceSize, frame.length);
  frame.total_size = total;
  return frame;
}

void append_sealed_entry(Bytes& out, const SecretBuffer& sealing_key, FileKind kind, std::uint64_t generation,
                         std::uint64_t sequence, ByteView plaintext) {
  std::uint8_t ad[kAdditionalDataSize];
  build_additional_data(ad, kind, generation, sequence);
  const std::size_t at = out.size();
  out.resize(at + kFrameOverhead + plaintext.size);
  std::uint8_t* frame = out.data() + at;
  put_u32(frame, static_cast<std::uint32_t>(plaintext.size + kTagSize));
  // Random 192-bit nonces: XChaCha20 makes collisions negligible without any nonce state on disk.
  random_bytes(frame + kLengthSize, kNonceSize);
  unsigned long long written = 0;
  crypto_aead_xchacha20poly1305_ietf_encrypt(frame + kLengthSize + kNonceSize, &written, plaintext.data, plaintext.size,
                                             ad, sizeof ad, nullptr, frame + kLengthSize, sealing_key.data());
}

bool open_entry(const SecretBuffer& sealing_key, FileKind kind, std::uint64_t generation, std::uint64_t sequence,
                const Frame& frame, std::uint8_t* plaintext_out) {
  if (frame.status != FrameStatus::complete || sealing_key.size() != kSealingKeySize) return false;
  std::uint8_t ad[kAdditionalDataSize];
  build_additional_data(ad, kind, generation, sequence);
  unsigned long long written = 0;
  return crypto_aead_xchacha20poly1305_ietf_decrypt(plaintext_out, &written, nullptr, frame.ciphertext.data,
                                                    frame.ciphertext.size, ad, sizeof ad, frame.nonce.data,
                                                    sealing_key.data()) == 0;
}

void decrypt_unauthenticated(const SecretBuffer& sealing_key, ByteView nonce, ByteView ciphertext,
                             std::uint8_t* plaintext_out) {
  // Block 0 of the keystream keys Poly1305; the message starts at block 1 (RFC 8439 §2.8, libsodium's
  // aead_xchacha20poly1305.c). With a zero high counter word the original-nonce XChaCha20 stream equals the IETF one.
  crypto_stream_xchacha20_xor_ic(plaintext_out, ciphertext.data, ciphertext.size, nonce.data, 1, sealing_key.data());
}

std::optional<std::size_t> measure_entry(ByteView plaintext_prefix) {
  Reader reader(plaintext_prefix, SecretFields::skip, "entry");
  const std::optional<std::uint8_t> op = reader.byte("operation");
  if (!op) return std::nullopt;
  if (*op == static_cast<std::uint8_t>(EntryOp::put)) {
    (void)read_record(reader);
  } else if (*op == static_cast<std::uint8_t>(EntryOp::remove)) {
    (void)reader.byte("kind");
    std::string id;
    reader.text("id", id);
  } else if (*op == static_cast<std::uint8_t>(EntryOp::end)) {
    (void)reader.u64("record count");
  } else {
    return std::nullopt;
  }
  if (reader.failed()) return std::nullopt;
  return reader.position();
}

std::size_t encoded_record_size(const Record& record) {
  Sizer sizer;
  std::visit([&](const auto& r) { fields(sizer, r); }, record);
  return sizer.size;
}

Result<void> check_encodable(const Record& record) {
  Sizer sizer;
  std::visit([&](const auto& r) { fields(sizer, r); }, record);
  if (sizer.too_long != nullptr) {
    return make_error(Errc::invalid_argument, std::string(to_string(kind_of(record))) + " record " +
                                                  quote_for_error(id_of(record)) + ": field '" + sizer.too_long +
                                                  "' is too long for its length prefix (strings and lists 65535, "
                                                  "blobs 4 GiB)");
  }
  if (1 + sizer.size > kMaxPlaintextSize) {
    return make_error(Errc::invalid_argument, std::string(to_string(kind_of(record))) + " record " +
                                                  quote_for_error(id_of(record)) + ": encodes to " +
                                                  std::to_string(sizer.size) + " bytes, the store allows at most " +
                                                  std::to_string(kMaxPlaintextSize - 1));
  }
  return ok_result();
}

void write_record(const Record& record, std::uint8_t* out) {
  Writer writer(out);
  writer.byte(static_cast<std::uint8_t>(kind_of(record)));
  std::visit([&](const auto& r) { fields(writer, r); }, record);
}

void write_end_entry(std::uint64_t record_count, std::uint8_t* out) {
  out[0] = static_cast<std::uint8_t>(EntryOp::end);
  put_u64(out + 1, record_count);
}

std::size_t remove_entry_size(std::string_view id) { return 1 + 1 + 2 + id.size(); }

void write_remove_entry(RecordKind kind, std::string_view id, std::uint8_t* out) {
  out[0] = static_cast<std::uint8_t>(EntryOp::remove);
  out[1] = static_cast<std::uint8_t>(kind);
  put_u16(out + 2, static_cast<std::uint16_t>(id.size()));
  if (!id.empty()) std::memcpy(out + 4, id.data(), id.size());
}

Result<Entry> parse_entry(ByteView plaintext, SecretFields secrets) {
  Reader reader(plaintext, secrets, "entry");
  Entry entry;
  const std::optional<std::uint8_t> op = reader.byte("operation");
  if (!op) return reader.take_error();
  switch (*op) {
    case static_cast<std::uint8_t>(EntryOp::put): {
      entry.op = EntryOp::put;
      entry.record_bytes = ByteView(plaintext.data + 1, plaintext.size - 1);
      entry.record = read_record(reader);
      if (entry.record) entry.kind = kind_of(*entry.record);
      break;
    }
    case static_cast<std::uint8_t>(EntryOp::remove): {
      entry.op = EntryOp::remove;
      const std::optional<std::uint8_t> kind = reader.byte("kind");
      if (kind && (*kind < 1 || *kind > std::variant_size_v<Record>)) {
        reader.fail("kind", "unknown record kind " + std::to_string(*kind) + " (known: " + kind_list() + ")");
      }
      if (kind) entry.kind = static_cast<RecordKind>(*kind);
      reader.text("id", entry.id);
      break;
    }
    case static_cast<std::uint8_t>(EntryOp::end): {
      entry.op = EntryOp::end;
      entry.count = reader.u64("record count").value_or(0);
      break;
    }
    default:
      reader.fail("operation", "unknown entry operation " + std::to_string(*op) + " (known: 1 put, 2 remove, 3 end)");
  }
  reader.expect_end();
  if (reader.failed()) return reader.take_error();
  return entry;
}

Result<Record> parse_record(ByteView encoded, SecretFields secrets) {
  Reader reader(encoded, secrets, "record");
  std::optional<Record> record = read_record(reader);
  reader.expect_end();
  if (reader.failed()) return reader.take_error();
  return std::move(*record);
}

}  // namespace dauth::crypto::keystore_codec

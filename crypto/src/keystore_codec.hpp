// Binary encoding of the sealed key store (docs/keystore-format.md): file headers, entry frames, the sealing of
// entries with XChaCha20-Poly1305 and the plaintext encoding of records. Internal to dauth_crypto (and the fuzz
// target, which feeds every parser here arbitrary bytes): every read is bounds-checked and every error names the
// field, the value found and what is allowed. Decrypted plaintext only ever lives in SecretBuffer memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "dauth/crypto/keystore.hpp"
#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto::keystore_codec {

// ---- files ---------------------------------------------------------------------------------------------------
enum class FileKind : std::uint8_t { snapshot = 1, journal = 2 };
std::string_view magic_of(FileKind kind) noexcept;  // "DAUTHKS1" / "DAUTHJ01"

inline constexpr std::size_t kMagicSize = 8;
// The entry format (sealing, additional data, plaintext) and the snapshot file: version 1.
inline constexpr std::uint16_t kFormatVersion = 1;
// Journals are written as version 3: the same entries, then zero fill up to the preallocated size (since version 2),
// so that an append overwrites blocks the file already has and its fdatasync has no file size to commit; one append
// may carry several entries (group commit, since version 3), so an interrupted one may leave several torn entries.
// Versions 1 (no fill) and 2 are still read. The additional data of every entry keeps kFormatVersion (the entries
// did not change).
inline constexpr std::uint16_t kJournalVersion = 3;
inline constexpr std::uint16_t kFirstZeroFillJournalVersion = 2;
// magic (8) | u16 format version | u64 generation, all big-endian.
inline constexpr std::size_t kHeaderSize = kMagicSize + 2 + 8;

struct FileHeader {
  FileKind kind = FileKind::snapshot;
  std::uint16_t version = kFormatVersion;
  std::uint64_t generation = 0;
};
// Snapshots get kFormatVersion, journals kJournalVersion.
void append_header(Bytes& out, FileKind kind, std::uint64_t generation);
// Errc::corrupt naming file_name when the magic, version or size is wrong (journals: version 1 to 3).
Result<FileHeader> parse_header(ByteView file, FileKind expected, std::string_view file_name);

// ---- entries -------------------------------------------------------------------------------------------------
// Frame: u32 big-endian length of what follows the nonce | 24-byte nonce | ciphertext with its 16-byte tag.
inline constexpr std::size_t kLengthSize = 4;
inline constexpr std::size_t kNonceSize = 24;  // crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
inline constexpr std::size_t kTagSize = 16;    // crypto_aead_xchacha20poly1305_ietf_ABYTES
inline constexpr std::size_t kSealingKeySize = 32;
// Plaintext holds at least the one-byte operation code.
inline constexpr std::size_t kMinCiphertextSize = kTagSize + 1;
// A certificate chain of a few KiB is the largest record we expect; 16 MiB bounds what a damaged length field can
// make us allocate.
inline constexpr std::size_t kMaxCiphertextSize = std::size_t{16} << 20;
inline constexpr std::size_t kMaxPlaintextSize = kMaxCiphertextSize - kTagSize;
inline constexpr std::size_t kFrameOverhead = kLengthSize + kNonceSize + kTagSize;

enum class FrameStatus {
  complete,    // a whole frame lies at offset
  truncated,   // the bytes end before the frame does (a torn write, or a damaged length field)
  bad_length,  // the length field is outside kMinCiphertextSize..kMaxCiphertextSize
};
struct Frame {
  FrameStatus status = FrameStatus::truncated;
  std::uint32_t length = 0;    // the length field as found (when at least 4 bytes were there)
  ByteView nonce;              // complete frames only
  ByteView ciphertext;         // complete frames only (tag included)
  std::size_t total_size = 0;  // kLengthSize + kNonceSize + length, for complete frames
};
Frame read_frame(ByteView file, std::size_t offset);

// Additional data of every entry: magic | u8 file kind | u16 format version | u64 generation | u64 sequence, so
// an entry opens only at its own position in its own file of its own generation.
inline constexpr std::size_t kAdditionalDataSize = kMagicSize + 1 + 2 + 8 + 8;

// Appends one sealed frame (fresh random nonce) to out.
void append_sealed_entry(Bytes& out, const SecretBuffer& sealing_key, FileKind kind, std::uint64_t generation,
                         std::uint64_t sequence, ByteView plaintext);
// Decrypts a complete frame into plaintext_out (at least ciphertext.size - kTagSize bytes of secret memory).
// False when the tag does not verify.
bool open_entry(const SecretBuffer& sealing_key, FileKind kind, std::uint64_t generation, std::uint64_t sequence,
                const Frame& frame, std::uint8_t* plaintext_out);

// Decrypts without checking the tag (XChaCha20 keystream from block 1, as the IETF AEAD construction uses it).
// Only for measuring the entry behind a damaged length field; the result is never trusted or used as data.
void decrypt_unauthenticated(const SecretBuffer& sealing_key, ByteView nonce, ByteView ciphertext,
                             std::uint8_t* plaintext_out);

// ---- entry plaintext -----------------------------------------------------------------------------------------
// u8 operation, then: put -> the record encoding; remove -> u8 kind, u16 id length, id; end -> u64 record count.
enum class EntryOp : std::uint8_t { put = 1, remove = 2, end = 3 };

// Record encoding: u8 kind, then the fields of the struct in declaration order: strings u16 length + bytes,
// secrets and DER u32 length + bytes, lists u16 count + items, integers big-endian (i64, i32), bool one byte 0/1.
std::size_t encoded_record_size(const Record& record);
// Errc::invalid_argument when a field does not fit its length prefix or the entry would exceed kMaxPlaintextSize.
Result<void> check_encodable(const Record& record);
// Writes exactly encoded_record_size(record) bytes.
void write_record(const Record& record, std::uint8_t* out);

inline constexpr std::size_t kEndEntrySize = 1 + 8;
void write_end_entry(std::uint64_t record_count, std::uint8_t* out);
std::size_t remove_entry_size(std::string_view id);
void write_remove_entry(RecordKind kind, std::string_view id, std::uint8_t* out);

enum class SecretFields {
  copy,  // SecretBuffer fields hold the key material
  skip,  // SecretBuffer and DER fields stay empty: checks the layout and yields the id, no guarded allocation
};
struct Entry {
  EntryOp op = EntryOp::put;
  std::optional<Record> record;                 // put
  ByteView record_bytes;                        // put: the record encoding inside the plaintext (for lazy decoding)
  RecordKind kind = RecordKind::bootstrap_key;  // put and remove
  std::string id;                               // remove
  std::uint64_t count = 0;                      // end
};
// Errc::parse on anything but exactly one well-formed entry (unknown operation or kind, short field, bad bool,
// trailing bytes).
Result<Entry> parse_entry(ByteView plaintext, SecretFields secrets);
// The size of the well-formed entry at the start of plaintext_prefix, which may continue with other bytes;
// nullopt when the prefix does not start with a whole entry.
std::optional<std::size_t> measure_entry(ByteView plaintext_prefix);
// A record encoding alone (kind byte first), as kept for lazy decoding.
Result<Record> parse_record(ByteView encoded, SecretFields secrets);

}  // namespace dauth::crypto::keystore_codec

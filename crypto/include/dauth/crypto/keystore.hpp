// The sealed key store (docs/keystore-format.md): the only code that touches key files.
//
// Records are typed (one struct per credential of PROTOCOL.md), kept in memory in ordered maps (O(log n) lookup) and
// persisted in a state directory as sealed entries (XChaCha20-Poly1305 under a key derived from the master key):
//   keys.snapshot   every record at one generation, closed by a sealed end marker with the record count;
//   keys.journal    puts and removals since that snapshot, one sealed entry each, appended and fdatasync'ed
//                   before put()/remove() return; preallocated with written zeros in 64 KiB steps, so that most
//                   appends change no file size and their fdatasync commits no metadata.
// compact() writes a new snapshot (temporary file, fsync, rename, fsync of the directory) and starts a new journal.
// A truncated, corrupted or tampered snapshot, or a bad entry in the middle of the journal, fails open() with
// Errc::corrupt naming the file and offset; nothing is ever rewritten over it. (The first snapshot entry failing to
// authenticate is Errc::crypto instead: a wrong master key looks exactly like that.) The one tolerated defect is an
// incomplete final journal entry (a write interrupted by a crash, never acknowledged: cut short, or with sectors of
// zero fill in it): open() reports it in OpenReport, moves the torn bytes aside to keys.journal.torn-<unix time>,
// and drops them. The format is in
// docs/keystore-format.md. Files are created 0600; the directory must not be group- or world-writable.
//
// One KeyStore per directory: open() takes an exclusive flock(2) on the directory for the life of the KeyStore and
// fails (Errc::io, "already open") while another holds it — another process, or another KeyStore in this process. Not
// thread-safe: call it from one thread, the daemon's loop (docs/transport.md §1). put_when_durable() (group commit)
// hands its writes to a flush thread of the store's own, which touches nothing but the journal file.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <ctime>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <variant>
#include <vector>

#include "dauth/error.hpp"
#include "dauth/secret.hpp"

namespace dauth::crypto {

// Enrolee side: a pre-provisioned bootstrap credential (PROTOCOL.md §3.1, PSK RSPF). id = kpm_id.
struct BootstrapKeyRecord {
  std::string kpm_id;     // "<relative>@<MEF-FQDN>"
  SecretBuffer kpm;       // >= 16 bytes
  std::string ae_id;      // the local AE this credential enrols
};

// MEF side: one row of the enrolee table (PROTOCOL.md §3.1). id = credential identity (KpmID, or for certificate
// enrolees "cert:" + AE-ID / "rpk:" + public key id).
struct EnroleeRecord {
  std::string credential_id;
  SecretBuffer kpm;                     // empty for certificate enrolees
  std::string enrolee_id;               // AE-ID assigned to the enrolee
  std::vector<std::string> targets;     // allowed Enrolment Targets (AE-IDs)
  std::int64_t enrolment_lifetime_s = 0;
  bool certificate_enrolment = false;   // offer EST certificate enrolment
};

// Both sides: the product of an enrolment (PROTOCOL.md §3.3–3.4). id = KeID text (upper-case hex).
struct EnrolmentKeyRecord {
  std::string ke_id;
  SecretBuffer ke;                      // 32 bytes
  std::string enrolee_id;
  std::vector<std::string> targets;
  std::int64_t expires_at = 0;          // unix seconds (Enrolment Expiry)
  std::int64_t revoked_at = 0;          // 0 = not revoked (MEF side)
};

// Target side: a usage-constrained key fetched from the MEF (PROTOCOL.md §4, §7). id = session_key_id(ke_id,
// local_ae_id, suid): the key differs per target AE (its derivation includes B-ID) and per SUID (22 for the DTLS
// PSK, 23 for ESPrim), so two local AEs targeted by one KeID, and the two keys of one (KeID, AE), keep one record
// each. Stores written when the id was the KeID alone load under the new id (ids are derived from the fields), and
// their journal removals by KeID still apply (docs/keystore-format.md).
struct SessionKeyRecord {
  std::string ke_id;
  SecretBuffer key;                     // 32 bytes
  std::string peer_ae_id;               // the Enrolee-ID the MEF named
  std::string local_ae_id;              // the target (us)
  int suid = 22;
  std::int64_t expires_at = 0;
};

// A certificate credential with its private key (issued to us, or our MEF/CA identity), or with an empty chain a
// raw public key credential (RFC 7250: the Enrolee's RPK bootstrap key, enrolee.hpp). id = name.
// The private key is either sealed here (private_key_der) or lives in a PKCS#11 token (private_key_uri, RFC 7512,
// dauth/crypto/token.hpp): exactly one of the two is set.
struct CertificateRecord {
  std::string name;                     // AE-ID, or a role name such as "mef-ca"
  std::vector<Bytes> chain_der;         // leaf first; empty = raw public key
  SecretBuffer private_key_der;
  std::int64_t expires_at = 0;
  std::string private_key_uri = {};     // "pkcs11:..."; an optional trailing field (docs/keystore-format.md)
};

// MEF side: audit record of an issued certificate (PROTOCOL.md §3.6, §5). id = serial hex (upper-case).
struct IssuanceRecord {
  std::string serial_hex;
  std::string ae_id;
  std::int64_t issued_at = 0;
  std::int64_t expires_at = 0;
  std::int64_t revoked_at = 0;
};

// A raw public key pinned to an identity (RFC 7250, PROTOCOL.md §4). id = RFC 6920 public key id.
struct PinnedKeyRecord {
  std::string public_key_id;
  std::string ae_id;
};

// Peer side: the last certificate revocation list applied from one MEF (PROTOCOL.md §5, rspf::RevocationWatch),
// kept so that a restart starts from it instead of refusing certificates until that MEF answers. id = mef_fqdn.
struct RevocationListRecord {
  std::string mef_fqdn;                 // lower case
  std::string issuer;                   // subject DN of the MEF's issuing CA as its list names it; "" = none named
  std::int64_t version = 0;             // the list's version (revocations the MEF ever made)
  std::vector<std::string> serials;     // revoked certificate serials, crypto::canonical_serial form
  std::int64_t received_at = 0;         // unix seconds: when the MEF last sent it
};

using Record = std::variant<BootstrapKeyRecord, EnroleeRecord, EnrolmentKeyRecord, SessionKeyRecord,
                            CertificateRecord, IssuanceRecord, PinnedKeyRecord, RevocationListRecord>;

// Stored in files: the values never change meaning.
enum class RecordKind : std::uint8_t {
  bootstrap_key = 1,
  enrolee = 2,
  enrolment_key = 3,
  session_key = 4,
  certificate = 5,
  issuance = 6,
  pinned_key = 7,
  revocation_list = 8,
};
std::string_view to_string(RecordKind kind) noexcept;
RecordKind kind_of(const Record& record) noexcept;
std::string id_of(const Record& record);
// The id of a SessionKeyRecord: "<KeID>#<local AE-ID>" for SUID 22 (the id of every record stored before other
// SUIDs were, so that their stores and journal removals keep meaning the same record), "<KeID>#<local AE-ID>#<SUID
// decimal>" for any other SUID ('#' is in neither syntax, so the parts are unambiguous).
inline constexpr char kSessionKeyIdSeparator = '#';
inline constexpr int kSaefSessionKeySuid = 22;  // crypto::Suid::rspf_key_for_saef (onem2m.hpp)
std::string session_key_id(std::string_view ke_id, std::string_view local_ae_id, int suid = kSaefSessionKeySuid);
// Checks a record's fields (identifier syntax, key sizes) before it is stored.
Result<void> validate(const Record& record);

// The sealing master key: 32 bytes written as 64 hex characters, optionally followed by one newline.
inline constexpr std::size_t kMasterKeySize = 32;
// Reads a key file; refuses anything but a regular file without group/world permission bits, naming the mode.
Result<SecretBuffer> load_master_key_file(const std::filesystem::path& path);
// Reads $CREDENTIALS_DIRECTORY/<name> (systemd LoadCredential=); Errc::not_found if the variable is unset.
Result<SecretBuffer> load_master_key_credential(std::string_view name);
// A new random master key in the file format above (0600, refuses to overwrite an existing file).
Result<void> write_new_master_key_file(const std::filesystem::path& path);

// The rule for the key store's directory, which dauthd also applies to daemon.state_directory at start (the store
// lives there): nobody but its owner may write to it, or another user could replace a key-store file. Readable by
// group or others is allowed. Errc::permission "<what>: mode 0770 is writable by group or others; ..." with the fix.
Result<void> check_store_directory_mode(mode_t mode, const std::string& what);

struct OpenReport {
  std::size_t snapshot_records = 0;
  std::size_t journal_entries = 0;
  std::optional<std::string> torn_tail;  // what was set aside, and where, when the journal ended mid-entry
  std::size_t master_key_index = 0;      // which of the master keys given to open() seals the store
};

class KeyStore {
 public:
  // Opens (or, if the directory has no store yet, creates) the store in dir. The directory must exist.
  static Result<KeyStore> open(const std::filesystem::path& dir, SecretBuffer master_key,
                               OpenReport* report = nullptr);
  // The same with candidate master keys in order of preference (a rotation: {current, next}): the store opens with
  // the one it is sealed under, named by OpenReport::master_key_index; a new store is sealed under the first. Only
  // the first snapshot entry is tried with each key (a wrong key fails there, before anything is written); when
  // none opens it, Errc::crypto says how many were tried.
  static Result<KeyStore> open(const std::filesystem::path& dir, std::vector<SecretBuffer> master_keys,
                               OpenReport* report = nullptr);

  KeyStore(KeyStore&&) noexcept;
  KeyStore& operator=(KeyStore&&) noexcept;
  ~KeyStore();

  // Inserts or replaces the record with the same kind and id; durable (fdatasync) when it returns ok. Writes
  // queued by put_when_durable() go to the file first (put() waits for them; their handlers still run from
  // deliver_durable()). A record exactly like the stored one writes nothing (no entry, no fdatasync).
  Result<void> put(Record record);
  // Errc::not_found if absent. Waits for queued writes like put().
  Result<void> remove(RecordKind kind, std::string_view id);

  // Group commit: put() without waiting for the disk, for answers that must not go out before their record is
  // durable (the MEF's enrolments). The record is queued and find() shows it at once; the store's flush thread
  // writes everything queued in one append and one fdatasync, so writes queued while a flush runs share the next
  // one. on_durable runs on the caller's thread, from deliver_durable(), once an fdatasync covering the entry has
  // returned: with ok, or with the error that failed the write — the record is then taken back (find() shows the
  // previous one again, or none) before on_durable runs. An invalid record, a store that refuses writes, or a
  // failed write not yet delivered is returned at once, and on_durable is not called.
  using DurableHandler = std::function<void(Result<void>)>;
  Result<void> put_when_durable(Record record, DurableHandler on_durable);
  // Readable (an eventfd; level-triggered) while finished flushes wait for deliver_durable(). Add it to the loop.
  int durable_fd() const noexcept;
  // Runs the handlers of finished flushes, oldest first. Cheap when there are none (no system call), so a loop may
  // call it every round. Compacts afterwards when the journal has grown past the threshold of put().
  void deliver_durable();
  // Waits until every queued write has finished, then runs the handlers (deliver_durable()). For shutdown: the
  // destructor also waits for queued writes, but drops their undelivered handlers uncalled.
  void finish_queued_writes();

  // nullptr if absent. The pointer (and the SecretBuffers inside the record) stays valid until put() or remove() of
  // this same kind and id, or until the KeyStore is destroyed or assigned to; puts and removes of other records,
  // compact() and moving the KeyStore do not invalidate it. Copy what must outlive that (SecretBuffer::clone()).
  const Record* find(RecordKind kind, std::string_view id) const;
  // Whether exactly this record (kind, id and every field) is stored. Decodes nothing, unlike find().
  bool holds(const Record& record) const;
  template <class T>
  const T* find(std::string_view id) const;

  // Records of one kind in id order.
  void for_each(RecordKind kind, const std::function<void(const Record&)>& visit) const;
  std::size_t size() const;
  std::size_t size(RecordKind kind) const;

  // Rewrites the snapshot with every live record and empties the journal. put() compacts by itself when the
  // journal holds more than max(4096, records) entries.
  Result<void> compact();

  // Master-key rotation (docs/keystore-format.md "Re-sealing"): compacts under the current key, then writes the next
  // generation's snapshot under new_master_key and starts its journal. The rename of that snapshot is the one switch:
  // a crash before it leaves a store that only the old key opens, after it one that only the new key opens, so an
  // open() given both always finds it. Nothing is written when the store is sealed under new_master_key already.
  // A failure after the compaction marks the store as refusing writes (which key seals it is known again only by
  // reopening it with both).
  Result<void> reseal(SecretBuffer new_master_key);
  // Whether master_key is the key this store is sealed under (compared through the derived sealing key).
  bool sealed_with(const SecretBuffer& master_key) const;

  const std::filesystem::path& directory() const;

  // The journal fdatasyncs so far (one per put or remove, one per group of put_when_durable()), the entries they
  // made durable, and the time spent waiting in them: the disk's share of a durable write, reported by
  // `dauthctl stats` and bench_mef.
  struct SyncStats {
    std::uint64_t syncs = 0;
    std::uint64_t entries = 0;
    std::chrono::nanoseconds time{0};
  };
  SyncStats sync_stats() const;

 private:
  struct Impl;
  explicit KeyStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

namespace detail {
template <class T, class V>
struct RecordIndex;
template <class T, class... Ts>
struct RecordIndex<T, std::variant<Ts...>> {
  static constexpr std::size_t value() {
    std::size_t i = 0;
    const bool found = ((std::is_same_v<T, Ts> ? true : (++i, false)) || ...);
    return found ? i : sizeof...(Ts);
  }
};
}  // namespace detail

// The RecordKind of a record struct: its position in Record plus one (checked in keystore.cpp).
template <class T>
constexpr RecordKind kind_for() {
  constexpr std::size_t index = detail::RecordIndex<T, Record>::value();
  static_assert(index < std::variant_size_v<Record>, "not a key-store record type");
  return static_cast<RecordKind>(index + 1);
}

template <class T>
const T* KeyStore::find(std::string_view id) const {
  const Record* r = find(kind_for<T>(), id);
  return r ? std::get_if<T>(r) : nullptr;
}

}  // namespace dauth::crypto

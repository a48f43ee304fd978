// The sealed key store (docs/keystore-format.md); the file format is in docs/keystore-format.md and keystore_codec.hpp.
#include "dauth/crypto/keystore.hpp"

#include <sodium.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "dauth/crypto/identifiers.hpp"
#include "dauth/crypto/kdf.hpp"
#include "keystore_codec.hpp"
#include "files.hpp"

namespace dauth::crypto {

namespace codec = keystore_codec;
using files::io_error;
using files::mode_text;
using files::UniqueFd;

// RecordKind values are stored in files; they must stay equal to the variant position plus one.
static_assert(kind_for<BootstrapKeyRecord>() == RecordKind::bootstrap_key);
static_assert(kind_for<EnroleeRecord>() == RecordKind::enrolee);
static_assert(kind_for<EnrolmentKeyRecord>() == RecordKind::enrolment_key);
static_assert(kind_for<SessionKeyRecord>() == RecordKind::session_key);
static_assert(kind_for<CertificateRecord>() == RecordKind::certificate);
static_assert(kind_for<IssuanceRecord>() == RecordKind::issuance);
static_assert(kind_for<PinnedKeyRecord>() == RecordKind::pinned_key);
static_assert(kind_for<RevocationListRecord>() == RecordKind::revocation_list);

namespace {

constexpr std::size_t kKindCount = std::variant_size_v<Record>;
constexpr std::array<std::string_view, kKindCount> kKindNames = {
    "bootstrap_key", "enrolee",  "enrolment_key", "session_key",
    "certificate",   "issuance", "pinned_key",    "revocation_list",
};
// Sized by the Record variant: a record type added without a name would leave an empty entry.
constexpr bool every_kind_named() {
  for (const auto name : kKindNames) {
    if (name.empty()) return false;
  }
  return true;
}
static_assert(every_kind_named(), "one name per Record alternative");

constexpr const char* kSnapshotName = "keys.snapshot";
constexpr const char* kJournalName = "keys.journal";
constexpr const char* kTornPrefix = "keys.journal.torn-";
// HKDF info of the sealing key (docs/keystore-format.md): a new format derives a new key by changing it.
constexpr std::string_view kSealingInfo = "dauth key store v1 sealing";
// put() compacts when the journal holds more than max(this, records) entries (keystore.hpp).
constexpr std::uint64_t kMinCompactionThreshold = 4096;
constexpr std::size_t kInitialScratchSize = 4096;
// put() keeps record encodings in guarded chunks of this size rather than one SecretBuffer per key: every
// sodium_malloc maps its own pages (tens of microseconds, and vm.max_map_count caps a process at some 30k of them).
constexpr std::size_t kPutChunkSize = std::size_t{1} << 20;
constexpr std::size_t kKeyIdFieldMax = 0xffff;
// Journals are preallocated with written zeros in steps of this size (docs/keystore-format.md): an append inside the
// fill changes no file size, so its fdatasync flushes the data alone, without a file-system journal commit for the
// inode. Written zeros, not fallocate(): unwritten extents need a metadata update on first write as well.
constexpr std::size_t kJournalFillStep = std::size_t{64} << 10;
// Torn appends into the zero fill: the disk writes whole sectors, so the part of an interrupted entry that did not
// reach it reads as zeros from a sector boundary on; a sealed entry holds a run of this many zero bytes with
// probability ~2^-128.
constexpr std::size_t kSectorSize = 512;
constexpr std::size_t kZeroRunOfTornEntry = 16;
// A lost first sector is recognised by zeros from the frame start to the sector boundary when that span covers the
// length field and at least 4 nonce bytes (a sealed frame starts so with probability 2^-32), or the whole header.
constexpr std::size_t kMinLostHeadBytes = 8;
// Group commit writes at most this many bytes of entries in one append (a larger entry goes alone): bytes of one
// interrupted group may follow a torn entry of a version 3 journal, up to this many (docs/keystore-format.md).
constexpr std::size_t kMaxGroupBytes = std::size_t{256} << 10;

// Key sizes (PROTOCOL.md §3.1: Kpm at least 128 bits; §3.3: Ke 256 bits; §4: Kab 256 bits).
constexpr std::size_t kMinKpmSize = 16;
constexpr std::size_t kKeSize = 32;

std::size_t index_of(RecordKind kind) { return static_cast<std::size_t>(kind) - 1; }
bool known_kind(RecordKind kind) {
  const auto k = static_cast<std::size_t>(kind);
  return k >= 1 && k <= kKindCount;
}

Error invalid_record(const Record& record, const std::string& what) {
  return make_error(Errc::invalid_argument, std::string(to_string(kind_of(record))) + " record " +
                                                quote_for_error(id_of(record)) + ": " + what);
}

// A record's decoded value (materialised on first use) or its encoding inside an arena of decrypted plaintext.
// Opening a store only checks each entry's layout and indexes it: one guarded allocation per file instead of one
// per key keeps loading 100k records fast (sodium_malloc costs tens of microseconds, measured in bench/).
struct Slot {
  mutable std::optional<Record> record;
  mutable const std::uint8_t* encoded = nullptr;
  std::size_t encoded_size = 0;
};
using KindMap = std::map<std::string, Slot, std::less<>>;

// A removal written when a SessionKeyRecord's id was its KeID alone: the record it meant is now indexed as
// "<KeID>#<local AE>" (a SUID 22 key, the only kind stored then), and such a store held at most one per KeID.
KindMap::iterator legacy_session_key(KindMap& map, std::string_view ke_id) {
  if (ke_id.find(kSessionKeyIdSeparator) != std::string_view::npos) return map.end();
  const std::string prefix = std::string(ke_id) + kSessionKeyIdSeparator;
  for (auto it = map.lower_bound(prefix); it != map.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
    if (it->first.find(kSessionKeyIdSeparator, prefix.size()) == std::string::npos) return it;  // not "#<SUID>"
  }
  return map.end();
}

Result<void> check_id_length(const Record& record) {
  const std::string id = id_of(record);
  if (id.empty() || id.size() > kKeyIdFieldMax) {
    return invalid_record(record, "id length " + std::to_string(id.size()) + ", must be 1–65535");
  }
  return ok_result();
}

Result<void> check_key(const Record& record, const char* field, const SecretBuffer& key, std::size_t min,
                       std::size_t max) {
  if (key.size() < min || key.size() > max) {
    const std::string allowed = min == max ? "exactly " + std::to_string(min) : "at least " + std::to_string(min);
    return invalid_record(
        record, std::string(field) + " is " + std::to_string(key.size()) + " bytes, must be " + allowed + " bytes");
  }
  return ok_result();
}

Result<void> check_ae_ids(const Record& record, const char* field, const std::vector<std::string>& ids) {
  for (const auto& id : ids) {
    if (auto ok = validate_ae_id(id); !ok) {
      return invalid_record(record, std::string(field) + ": " + ok.error().message);
    }
  }
  return ok_result();
}

Result<void> check_ae_id(const Record& record, const char* field, const std::string& id) {
  if (auto ok = validate_ae_id(id); !ok) return invalid_record(record, std::string(field) + ": " + ok.error().message);
  return ok_result();
}

Result<void> check_ke_id(const Record& record, const std::string& id) {
  auto parsed = parse_ke_id(id);
  if (!parsed) return invalid_record(record, "ke_id: " + parsed.error().message);
  // Lookups compare text: only the canonical form may be stored, or the same key could be stored twice.
  if (parsed->text() != id) {
    return invalid_record(record, "ke_id is not canonical; store it as " + quote_for_error(parsed->text()));
  }
  return ok_result();
}

#define DAUTH_TRY(expr)                                              \
  do {                                                               \
    if (auto try_result_ = (expr); !try_result_) return try_result_; \
  } while (false)

Result<void> validate_fields(const BootstrapKeyRecord& r, const Record& whole) {
  if (auto ok = validate_kpm_id(r.kpm_id); !ok) return invalid_record(whole, "kpm_id: " + ok.error().message);
  DAUTH_TRY(check_key(whole, "kpm", r.kpm, kMinKpmSize, codec::kMaxPlaintextSize));
  return check_ae_id(whole, "ae_id", r.ae_id);
}
Result<void> validate_fields(const EnroleeRecord& r, const Record& whole) {
  // Certificate-bootstrapped enrolees are identified by "cert:<AE-ID>" or "rpk:<key id>" and have no Kpm
  // (keystore.hpp); whether the MEF offers them certificate enrolment is a separate choice.
  const bool certificate_identity = r.credential_id.rfind("cert:", 0) == 0 || r.credential_id.rfind("rpk:", 0) == 0;
  if (certificate_identity) {
    if (!r.kpm.empty()) return invalid_record(whole, "a certificate-bootstrapped enrolee has no kpm");
  } else {
    if (auto ok = validate_kpm_id(r.credential_id); !ok) {
      return invalid_record(whole, "credential_id: " + ok.error().message);
    }
    DAUTH_TRY(check_key(whole, "kpm", r.kpm, kMinKpmSize, codec::kMaxPlaintextSize));
  }
  DAUTH_TRY(check_ae_id(whole, "enrolee_id", r.enrolee_id));
  DAUTH_TRY(check_ae_ids(whole, "targets", r.targets));
  if (r.enrolment_lifetime_s < 0) {
    return invalid_record(whole, "enrolment_lifetime_s " + std::to_string(r.enrolment_lifetime_s) + " is negative");
  }
  return ok_result();
}
Result<void> validate_fields(const EnrolmentKeyRecord& r, const Record& whole) {
  DAUTH_TRY(check_ke_id(whole, r.ke_id));
  DAUTH_TRY(check_key(whole, "ke", r.ke, kKeSize, kKeSize));
  DAUTH_TRY(check_ae_id(whole, "enrolee_id", r.enrolee_id));
  return check_ae_ids(whole, "targets", r.targets);
}
Result<void> validate_fields(const SessionKeyRecord& r, const Record& whole) {
  DAUTH_TRY(check_ke_id(whole, r.ke_id));
  DAUTH_TRY(check_key(whole, "key", r.key, kKeSize, kKeSize));
  DAUTH_TRY(check_ae_id(whole, "peer_ae_id", r.peer_ae_id));
  DAUTH_TRY(check_ae_id(whole, "local_ae_id", r.local_ae_id));
  if (r.suid < 0 || r.suid > 255) {
    return invalid_record(whole, "suid " + std::to_string(r.suid) + ", must be 0–255 (TS-0003 SUID)");
  }
  return ok_result();
}
Result<void> validate_fields(const CertificateRecord& r, const Record& whole) {
  // An empty chain is a raw public key credential (RFC 7250): the public key is the private key's (keystore.hpp).
  for (std::size_t i = 0; i < r.chain_der.size(); ++i) {
    if (r.chain_der[i].empty()) return invalid_record(whole, "chain_der[" + std::to_string(i) + "] is empty");
  }
  if (r.private_key_der.empty() == r.private_key_uri.empty()) {
    return invalid_record(whole, r.private_key_der.empty() ? "private_key_der and private_key_uri are both empty"
                                                           : "private_key_der and private_key_uri are both set");
  }
  // Lower-case "pkcs11:" exactly (RFC 7512's form): the codec recognises the optional field by it.
  if (!r.private_key_uri.empty() && r.private_key_uri.rfind("pkcs11:", 0) != 0) {
    return invalid_record(whole, "private_key_uri " + quote_for_error(r.private_key_uri) +
                                     " does not start with 'pkcs11:' (RFC 7512)");
  }
  return ok_result();
}
Result<void> validate_fields(const IssuanceRecord& r, const Record& whole) {
  if (auto canonical = canonical_serial(r.serial_hex); !canonical || *canonical != r.serial_hex) {
    return invalid_record(whole, "serial_hex must be canonical (upper-case hex of whole octets, no leading zero "
                                 "octet: identifiers.hpp canonical_serial)");
  }
  return check_ae_id(whole, "ae_id", r.ae_id);
}
Result<void> validate_fields(const PinnedKeyRecord& r, const Record& whole) {
  return check_ae_id(whole, "ae_id", r.ae_id);
}
Result<void> validate_fields(const RevocationListRecord& r, const Record& whole) {
  if (auto valid = validate_fqdn(r.mef_fqdn); !valid.ok()) {
    return invalid_record(whole, "mef_fqdn: " + valid.error().message);
  }
  for (const auto& serial : r.serials) {
    // Compared byte for byte with Certificate::serial_hex() at every handshake: one form only.
    if (auto canonical = canonical_serial(serial); !canonical || *canonical != serial) {
      return invalid_record(whole, "serials must be canonical (upper-case hex of whole octets, no leading zero "
                                   "octet: identifiers.hpp canonical_serial)");
    }
  }
  return ok_result();
}

#undef DAUTH_TRY

}  // namespace

std::string_view to_string(RecordKind kind) noexcept {
  return known_kind(kind) ? kKindNames[index_of(kind)] : std::string_view("unknown");
}

RecordKind kind_of(const Record& record) noexcept { return static_cast<RecordKind>(record.index() + 1); }

std::string session_key_id(std::string_view ke_id, std::string_view local_ae_id, int suid) {
  std::string id;
  id.reserve(ke_id.size() + 1 + local_ae_id.size() + 4);
  id.append(ke_id).append(1, kSessionKeyIdSeparator).append(local_ae_id);
  if (suid != kSaefSessionKeySuid) id.append(1, kSessionKeyIdSeparator).append(std::to_string(suid));
  return id;
}

std::string id_of(const Record& record) {
  struct Id {
    std::string operator()(const BootstrapKeyRecord& r) const { return r.kpm_id; }
    std::string operator()(const EnroleeRecord& r) const { return r.credential_id; }
    std::string operator()(const EnrolmentKeyRecord& r) const { return r.ke_id; }
    std::string operator()(const SessionKeyRecord& r) const {
      return session_key_id(r.ke_id, r.local_ae_id, r.suid);
    }
    std::string operator()(const CertificateRecord& r) const { return r.name; }
    std::string operator()(const IssuanceRecord& r) const { return r.serial_hex; }
    std::string operator()(const PinnedKeyRecord& r) const { return r.public_key_id; }
    std::string operator()(const RevocationListRecord& r) const { return r.mef_fqdn; }
  };
  return std::visit(Id{}, record);
}

Result<void> validate(const Record& record) {
  if (auto ok = check_id_length(record); !ok) return ok;
  if (auto ok = std::visit([&](const auto& r) { return validate_fields(r, record); }, record); !ok) return ok;
  return codec::check_encodable(record);
}

namespace {

// Group commit (put_when_durable): the loop thread seals entries and queues their frames; the flush thread appends
// everything queued with one pwrite and one fdatasync and then says how far the journal is durable. Only the
// journal's file state (journal_fd, journal_size, journal_allocated) is shared: the flush thread uses it while
// `writing`, the loop thread only after settle(), when the flush thread is idle with nothing queued. Records,
// handlers and undo data never leave the loop thread.
struct QueuedFrame {
  Bytes frame;  // sealed: no plaintext crosses threads
  std::uint64_t sequence = 0;
};

struct FlushFailure {
  std::uint64_t first_sequence = 0;  // this entry and every later queued one were not written
  std::string message;
  bool breaks_store = false;         // the file content is unknown: refuse writes until reopened
};

struct GroupCommit {
  std::mutex mutex;
  std::condition_variable work;  // the flush thread waits for frames or stop
  std::condition_variable idle;  // settle() waits for the flush thread to finish
  std::deque<QueuedFrame> queued;
  bool writing = false;
  bool stop = false;
  std::uint64_t durable_end = 0;         // every entry with a lower sequence is durable
  std::optional<FlushFailure> failure;   // until the loop thread has taken it back (absorb())
  KeyStore::SyncStats stats;
  std::atomic<bool> outcome_ready{false};  // lock-free check for deliver_durable(), with `event`
  UniqueFd event;                          // eventfd: readable while outcome_ready
  std::thread thread;
};

// A put_when_durable() entry not yet durable, on the loop thread: what find() showed before it, to restore if its
// write fails, and the handler to call.
struct UnconfirmedPut {
  std::uint64_t sequence = 0;
  RecordKind kind{};
  std::string id;
  std::optional<Slot> previous;
  KeyStore::DurableHandler on_durable;
};

// The state of an open store; KeyStore::Impl is this under the name the header declares.
struct StoreState {
  std::filesystem::path dir;
  UniqueFd dir_fd;  // also holds the exclusive flock: one process per store
  UniqueFd journal_fd;
  SecretBuffer sealing_key;
  std::uint64_t generation = 0;
  std::uint64_t journal_entries = 0;  // the sequence number of the next journal entry
  std::uint64_t journal_size = 0;     // bytes of acknowledged journal content
  std::uint64_t journal_allocated = 0;  // file size: journal_size plus the zero fill after it
  bool journal_zero_fill = false;       // version 2 journal: preallocated (version 1 files are appended as they are)
  std::uint16_t journal_version = 0;    // group commit needs version 3 (several entries per append)
  std::array<KindMap, kKindCount> records;
  std::vector<SecretBuffer> arenas;  // decrypted plaintext that lazy slots point into
  SecretBuffer scratch;              // plaintext of the entry being sealed
  // The arena chunk that put() copies record encodings into (one of arenas; null until the first put).
  std::uint8_t* put_chunk = nullptr;
  std::size_t put_chunk_size = 0;
  std::size_t put_chunk_used = 0;
  Bytes frame_buffer;                 // ciphertext of the entry being appended
  KeyStore::SyncStats sync_stats;     // the journal fdatasyncs of append(): the disk's share of each write
  std::optional<std::string> broken;  // set when the files may disagree with memory: writes are refused
  GroupCommit group;
  std::deque<UnconfirmedPut> unconfirmed;  // queued by put_when_durable(), oldest first
  std::vector<std::pair<KeyStore::DurableHandler, Result<void>>> delivering;  // outcomes absorbed, handlers due

  StoreState() = default;
  StoreState(const StoreState&) = delete;
  StoreState& operator=(const StoreState&) = delete;
  ~StoreState() {
    // Queued writes still go to disk; their handlers are dropped (keystore.hpp).
    if (group.thread.joinable()) {
      {
        std::lock_guard lock(group.mutex);
        group.stop = true;
      }
      group.work.notify_one();
      group.thread.join();
    }
  }

  std::filesystem::path path_of(const char* name) const { return dir / name; }

  std::uint8_t* scratch_of_size(std::size_t size) {
    if (scratch.size() < size) scratch = SecretBuffer(std::max({size, kInitialScratchSize, 2 * scratch.size()}));
    return scratch.data();
  }

  // Copies a record encoding into guarded arena memory and returns where it now lives.
  const std::uint8_t* keep_encoding(ByteView encoded) {
    if (put_chunk == nullptr || put_chunk_size - put_chunk_used < encoded.size) {
      arenas.emplace_back(std::max(kPutChunkSize, encoded.size));
      put_chunk = arenas.back().data();
      put_chunk_size = arenas.back().size();
      put_chunk_used = 0;
    }
    std::uint8_t* at = put_chunk + put_chunk_used;
    std::memcpy(at, encoded.data, encoded.size);
    put_chunk_used += encoded.size;
    return at;
  }

  std::size_t record_count() const {
    std::size_t n = 0;
    for (const auto& map : records) n += map.size();
    return n;
  }

  // Whether the record stored under kind and id has exactly this encoding. Decodes nothing: a lazy slot is compared
  // as it lies in its arena.
  bool stores_encoding(RecordKind kind, const std::string& id, ByteView encoding) const {
    const KindMap& map = records[index_of(kind)];
    const auto it = map.find(id);
    if (it == map.end()) return false;
    const Slot& slot = it->second;
    if (!slot.record) {
      return slot.encoded_size == encoding.size && sodium_memcmp(slot.encoded, encoding.data, encoding.size) == 0;
    }
    if (codec::encoded_record_size(*slot.record) != encoding.size) return false;
    SecretBuffer stored(encoding.size);
    codec::write_record(*slot.record, stored.data());
    return sodium_memcmp(stored.data(), encoding.data, encoding.size) == 0;
  }

  const Record* materialise(const Slot& slot) const {
    if (!slot.record) {
      auto decoded = codec::parse_record(ByteView(slot.encoded, slot.encoded_size), codec::SecretFields::copy);
      if (!decoded) return nullptr;  // unreachable: open() checked the layout of every entry
      slot.record = std::move(decoded).value();
      slot.encoded = nullptr;  // the arena may be dropped by the next compaction
    }
    return &*slot.record;
  }

  Result<void> refuse_if_broken() const {
    if (broken) {
      return make_error(Errc::io, "key store " + dir.string() + " refuses writes: " + *broken +
                                      "; reopen the store to recover from its files");
    }
    return ok_result();
  }

  // Replaces the file so that a crash leaves either the old or the new one (docs/keystore-format.md: through
  // "<name>.tmp"). Returns the open descriptor of the new file.
  Result<UniqueFd> replace_file(const char* final_name, const Bytes& content) {
    return write_key_file_at(dir_fd.get(), dir, final_name, content, IfExists::replace);
  }

  Result<void> start_journal(std::uint64_t journal_generation) {
    Bytes journal;
    codec::append_header(journal, codec::FileKind::journal, journal_generation);
    journal.resize(kJournalFillStep, 0);
    auto fd = replace_file(kJournalName, journal);
    if (!fd) return std::move(fd).error();
    journal_fd = std::move(fd).value();
    journal_entries = 0;
    {
      // Sequence numbers start again at 0 (the flush thread is idle: callers settle() first).
      std::lock_guard lock(group.mutex);
      group.durable_end = 0;
    }
    journal_size = codec::kHeaderSize;
    journal_allocated = journal.size();
    journal_zero_fill = true;
    journal_version = codec::kJournalVersion;
    return ok_result();
  }

  // The frame to append when the file is journal_allocated bytes long and the entries start at `at`: an entry that
  // outgrows the zero fill extends it in the same write, so this append pays the one size change for the next
  // kJournalFillStep bytes of entries.
  void extend_fill(Bytes& frames, std::uint64_t at, std::uint64_t allocated) const {
    if (!journal_zero_fill || at + frames.size() <= allocated) return;
    const std::size_t end = at + frames.size();
    frames.resize((end + kJournalFillStep - 1) / kJournalFillStep * kJournalFillStep - at, 0);
  }

  // The outcome of writing `frames` (entries_size bytes of entries, then any fill extension) at journal_size.
  struct WriteOutcome {
    std::optional<Error> error;
    std::optional<std::string> breaks_store;
  };

  // Appends frames at journal_size and waits for fdatasync; on success journal_size grows by entries_size. Runs on
  // the loop thread (append()) or on the flush thread while `group.writing` (the journal state is its then).
  WriteOutcome write_and_sync(const Bytes& frames, std::size_t entries_size, std::uint64_t entries,
                              KeyStore::SyncStats& stats) {
    WriteOutcome outcome;
    const std::filesystem::path journal_path = path_of(kJournalName);
    if (const int err = files::pwrite_all(journal_fd.get(), frames.data(), frames.size(),
                                          static_cast<off_t>(journal_size));
        err != 0) {
      // Cut the partial entries off again, or the next append would land behind garbage.
      if (::ftruncate(journal_fd.get(), static_cast<off_t>(journal_size)) != 0) {
        outcome.breaks_store = "a failed append to " + journal_path.string() + " could not be undone";
      }
      journal_allocated = journal_size;  // the fill is cut off too; the next append writes a new one
      outcome.error = io_error("cannot append to", journal_path, err);
      return outcome;
    }
    const auto sync_start = std::chrono::steady_clock::now();
    const int synced = ::fdatasync(journal_fd.get());
    const int sync_errno = errno;
    ++stats.syncs;
    stats.time += std::chrono::steady_clock::now() - sync_start;
    if (synced != 0) {
      // After a failed fdatasync the kernel may have dropped the dirty pages: the file content is unknown.
      outcome.breaks_store = "fdatasync of " + journal_path.string() + " failed";
      outcome.error = io_error("cannot fdatasync", journal_path, sync_errno);
      return outcome;
    }
    stats.entries += entries;
    journal_allocated = std::max<std::uint64_t>(journal_allocated, journal_size + frames.size());
    journal_size += entries_size;
    return outcome;
  }

  // Seals plaintext as the next journal entry, appends it and waits for fdatasync. Queued group writes go first.
  Result<void> append(ByteView plaintext) {
    settle();
    if (auto ok = refuse_if_broken(); !ok) return ok;
    frame_buffer.clear();
    codec::append_sealed_entry(frame_buffer, sealing_key, codec::FileKind::journal, generation, journal_entries,
                               plaintext);
    const std::size_t entry_size = frame_buffer.size();
    extend_fill(frame_buffer, journal_size, journal_allocated);
    WriteOutcome outcome = write_and_sync(frame_buffer, entry_size, 1, sync_stats);
    if (outcome.breaks_store) broken = std::move(outcome.breaks_store);
    if (outcome.error) return std::move(*outcome.error);
    ++journal_entries;
    return ok_result();
  }

  // ---- group commit ----

  // Seals plaintext as the next journal entry and queues it for the flush thread (started on first use).
  Result<std::uint64_t> queue_entry(ByteView plaintext) {
    if (auto ok = refuse_if_broken(); !ok) return std::move(ok).error();
    Bytes frame;
    codec::append_sealed_entry(frame, sealing_key, codec::FileKind::journal, generation, journal_entries, plaintext);
    const std::uint64_t sequence = journal_entries;
    {
      std::lock_guard lock(group.mutex);
      if (group.failure) {
        // Its entries are about to be taken back; sequence numbers after them would not match the file.
        return make_error(Errc::io, "key store " + dir.string() + ": a write failed (" + group.failure->message +
                                        ") and is not delivered yet; retry");
      }
      group.queued.push_back(QueuedFrame{std::move(frame), sequence});
    }
    if (!group.thread.joinable()) group.thread = std::thread([this] { run_flush_thread(); });
    group.work.notify_one();
    ++journal_entries;
    return sequence;
  }

  void run_flush_thread() {
    std::unique_lock lock(group.mutex);
    Bytes frames;
    for (;;) {
      group.work.wait(lock, [this] { return group.stop || (!group.queued.empty() && !group.failure); });
      if (group.queued.empty() || group.failure) return;  // stop: nothing (more) to write
      // One append of everything queued, up to kMaxGroupBytes (a larger entry goes alone).
      frames.clear();
      const std::uint64_t first_sequence = group.queued.front().sequence;
      std::uint64_t count = 0;
      while (!group.queued.empty() &&
             (count == 0 || frames.size() + group.queued.front().frame.size() <= kMaxGroupBytes)) {
        const Bytes& frame = group.queued.front().frame;
        frames.insert(frames.end(), frame.begin(), frame.end());
        group.queued.pop_front();
        ++count;
      }
      const std::size_t entries_size = frames.size();
      extend_fill(frames, journal_size, journal_allocated);
      group.writing = true;
      KeyStore::SyncStats stats;
      lock.unlock();
      WriteOutcome outcome = write_and_sync(frames, entries_size, count, stats);
      lock.lock();
      group.writing = false;
      group.stats.syncs += stats.syncs;
      group.stats.entries += stats.entries;
      group.stats.time += stats.time;
      if (outcome.error) {
        group.failure = FlushFailure{first_sequence, outcome.error->message, outcome.breaks_store.has_value()};
        if (outcome.breaks_store) group.failure->message += "; " + *outcome.breaks_store;
        group.queued.clear();  // later entries: their sequence numbers follow the failed ones
      } else {
        group.durable_end = first_sequence + count;
      }
      // The eventfd before the flag: deliver_durable() clears the flag before the eventfd, so the eventfd is never
      // left readable behind a clear flag (a loop that would spin).
      const int signalled = eventfd_write(group.event.get(), 1);  // cannot block: far from counter overflow
      (void)signalled;
      group.outcome_ready.store(true, std::memory_order_release);
      group.idle.notify_all();
    }
  }

  // Moves the flush thread's results onto the loop thread: confirmed entries and failed ones (taken back, newest
  // first) become due handlers in `delivering`.
  void absorb() {
    std::uint64_t durable_end = 0;
    std::optional<FlushFailure> failure;
    {
      std::lock_guard lock(group.mutex);
      durable_end = group.durable_end;
      failure = std::move(group.failure);
      group.failure.reset();
    }
    while (!unconfirmed.empty() && unconfirmed.front().sequence < durable_end) {
      delivering.emplace_back(std::move(unconfirmed.front().on_durable), ok_result());
      unconfirmed.pop_front();
    }
    if (!failure) return;
    for (auto it = unconfirmed.rbegin(); it != unconfirmed.rend(); ++it) {
      KindMap& map = records[index_of(it->kind)];
      if (it->previous) {
        map.insert_or_assign(it->id, std::move(*it->previous));
      } else {
        map.erase(it->id);
      }
    }
    for (auto& put : unconfirmed) {
      delivering.emplace_back(std::move(put.on_durable), make_error(Errc::io, failure->message));
    }
    unconfirmed.clear();
    journal_entries = failure->first_sequence;
    if (failure->breaks_store) broken = failure->message;
  }

  // Waits until the flush thread is idle with nothing queued, then absorbs: afterwards the loop thread owns the
  // journal state again, and memory matches what the file holds.
  void settle() {
    if (!group.thread.joinable()) return;
    {
      std::unique_lock lock(group.mutex);
      group.idle.wait(lock, [this] { return !group.writing && (group.queued.empty() || group.failure); });
    }
    absorb();
  }

  // Returns whether anything was absorbed (only then can the journal have grown past the compaction threshold).
  bool deliver_durable() {
    if (!group.outcome_ready.load(std::memory_order_acquire) && delivering.empty()) return false;
    group.outcome_ready.store(false, std::memory_order_release);
    eventfd_t signalled = 0;
    const int cleared = eventfd_read(group.event.get(), &signalled);  // non-blocking: EAGAIN when already clear
    (void)cleared;
    absorb();
    auto due = std::move(delivering);
    delivering.clear();
    for (auto& [handler, outcome] : due) {
      if (handler) handler(std::move(outcome));
    }
    return true;
  }

  Result<void> compact() { return write_next_generation(nullptr); }

  // A new snapshot of generation + 1 with every live record, sealed under *new_sealing_key (a rotation, reseal())
  // or the current key (nullptr), then a new journal.
  Result<void> write_next_generation(SecretBuffer* new_sealing_key) {
    settle();
    if (auto ok = refuse_if_broken(); !ok) return ok;
    const SecretBuffer& snapshot_key = new_sealing_key != nullptr ? *new_sealing_key : sealing_key;
    const std::uint64_t new_generation = generation + 1;
    std::size_t lazy_bytes = 0;
    std::size_t estimate = codec::kHeaderSize;
    for (const auto& map : records) {
      for (const auto& [id, slot] : map) {
        if (!slot.record) lazy_bytes += slot.encoded_size;
        estimate += codec::kFrameOverhead + 1 + (slot.record ? 64 + id.size() : slot.encoded_size);
      }
    }
    Bytes snapshot;
    snapshot.reserve(estimate);
    codec::append_header(snapshot, codec::FileKind::snapshot, new_generation);
    // Lazy encodings move into one new arena so that the old arenas (with superseded plaintext) can go.
    SecretBuffer new_arena(lazy_bytes);
    std::vector<std::pair<const Slot*, const std::uint8_t*>> moved;
    std::size_t arena_used = 0;
    std::uint64_t sequence = 0;
    for (const auto& map : records) {
      for (const auto& [id, slot] : map) {
        std::size_t size = 0;
        std::uint8_t* plain = nullptr;
        if (slot.record) {
          size = 1 + codec::encoded_record_size(*slot.record);
          plain = scratch_of_size(size);
          codec::write_record(*slot.record, plain + 1);
        } else {
          size = 1 + slot.encoded_size;
          plain = scratch_of_size(size);
          std::memcpy(plain + 1, slot.encoded, slot.encoded_size);
          std::memcpy(new_arena.data() + arena_used, slot.encoded, slot.encoded_size);
          moved.emplace_back(&slot, new_arena.data() + arena_used);
          arena_used += slot.encoded_size;
        }
        plain[0] = static_cast<std::uint8_t>(codec::EntryOp::put);
        codec::append_sealed_entry(snapshot, snapshot_key, codec::FileKind::snapshot, new_generation, sequence++,
                                   ByteView(plain, size));
      }
    }
    std::uint8_t end[codec::kEndEntrySize];
    codec::write_end_entry(sequence, end);
    codec::append_sealed_entry(snapshot, snapshot_key, codec::FileKind::snapshot, new_generation, sequence,
                               ByteView(end, sizeof end));
    scratch.wipe();

    auto written = replace_file(kSnapshotName, snapshot);
    if (!written) {
      // The rename may have happened before a failing directory fsync: appending to the old journal could then
      // put acknowledged entries into a journal that the next open() discards as stale (and after a rotation's
      // snapshot, which key seals the store is unknown until it is reopened).
      broken = std::string(new_sealing_key != nullptr ? "re-sealing" : "compaction") +
               " failed: " + written.error().message;
      return std::move(written).error();
    }
    generation = new_generation;
    // The journal's entries are sealed, its header is not: from here on the new key seals everything.
    if (new_sealing_key != nullptr) sealing_key = std::move(*new_sealing_key);
    if (auto journal = start_journal(new_generation); !journal) {
      broken = "the journal of generation " + std::to_string(new_generation) +
               " could not be started: " + journal.error().message;
      return journal;
    }
    for (const auto& [slot, location] : moved) slot->encoded = location;
    arenas.clear();
    put_chunk = nullptr;
    put_chunk_size = put_chunk_used = 0;
    if (!new_arena.empty()) arenas.push_back(std::move(new_arena));
    return ok_result();
  }
};

using Impl = StoreState;

struct LoadedFile {
  UniqueFd fd;
  Bytes content;
};

// Opens a store file and checks that it is a regular file of mode 0600.
Result<LoadedFile> load_store_file(const Impl& store, const char* name, int flags) {
  const std::filesystem::path path = store.path_of(name);
  LoadedFile file;
  file.fd = UniqueFd(::openat(store.dir_fd.get(), name, flags | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY));
  if (!file.fd.valid()) return io_error("cannot open", path, errno);
  struct stat st {};
  if (::fstat(file.fd.get(), &st) != 0) return io_error("cannot stat", path, errno);
  if (!S_ISREG(st.st_mode)) return make_error(Errc::permission, path.string() + " is not a regular file");
  if ((st.st_mode & 0777) != 0600) {
    return make_error(Errc::permission, path.string() + ": mode " + mode_text(st.st_mode) +
                                            ", key-store files must be mode 0600 (chmod 600)");
  }
  file.content.resize(static_cast<std::size_t>(st.st_size));
  std::size_t done = 0;
  while (done < file.content.size()) {
    const ssize_t n =
        ::pread(file.fd.get(), file.content.data() + done, file.content.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return io_error("cannot read", path, errno);
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  file.content.resize(done);
  return file;
}

bool exists_in(const Impl& store, const char* name) {
  struct stat st {};
  return ::fstatat(store.dir_fd.get(), name, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

std::string where(const char* file_name, std::uint64_t sequence, std::size_t offset) {
  return std::string(file_name) + ": entry " + std::to_string(sequence) + " at byte offset " + std::to_string(offset);
}

Error frame_error(const char* file_name, std::uint64_t sequence, std::size_t offset, const codec::Frame& frame,
                  std::size_t file_size) {
  if (frame.status == codec::FrameStatus::bad_length) {
    return make_error(Errc::corrupt, where(file_name, sequence, offset) + ": length field " +
                                         std::to_string(frame.length) + ", must be " +
                                         std::to_string(codec::kMinCiphertextSize) + "–" +
                                         std::to_string(codec::kMaxCiphertextSize));
  }
  return make_error(Errc::corrupt, where(file_name, sequence, offset) + ": truncated (" +
                                       std::to_string(file_size - offset) + " bytes left, the entry needs " +
                                       (file_size - offset < codec::kLengthSize
                                            ? std::string("a 4-byte length")
                                            : std::to_string(codec::kLengthSize + codec::kNonceSize + frame.length)) +
                                       ")");
}

Error open_error(const char* file_name, std::uint64_t sequence, std::size_t offset, bool first_of_store) {
  if (first_of_store) {
    return make_error(Errc::crypto, where(file_name, sequence, offset) +
                                        ": does not authenticate: wrong master key or tampered file");
  }
  return make_error(Errc::corrupt, where(file_name, sequence, offset) +
                                       ": does not authenticate: the file was tampered with or corrupted");
}

Result<void> load_snapshot(Impl& store, ByteView file, OpenReport& report) {
  auto header = codec::parse_header(file, codec::FileKind::snapshot, kSnapshotName);
  if (!header) return std::move(header).error();
  store.generation = header->generation;
  SecretBuffer arena(file.size);
  std::size_t arena_used = 0;
  std::size_t offset = codec::kHeaderSize;
  std::uint64_t sequence = 0;
  while (offset < file.size) {
    const codec::Frame frame = codec::read_frame(file, offset);
    if (frame.status != codec::FrameStatus::complete) {
      return frame_error(kSnapshotName, sequence, offset, frame, file.size);
    }
    std::uint8_t* plain = arena.data() + arena_used;
    if (!codec::open_entry(store.sealing_key, codec::FileKind::snapshot, store.generation, sequence, frame, plain)) {
      return open_error(kSnapshotName, sequence, offset, sequence == 0);
    }
    const std::size_t plain_size = frame.length - codec::kTagSize;
    auto entry = codec::parse_entry(ByteView(plain, plain_size), codec::SecretFields::skip);
    if (!entry) return make_error(Errc::corrupt, where(kSnapshotName, sequence, offset) + ": " + entry.error().message);
    if (entry->op == codec::EntryOp::end) {
      if (entry->count != sequence) {
        return make_error(Errc::corrupt, where(kSnapshotName, sequence, offset) + ": end marker counts " +
                                             std::to_string(entry->count) + " records, the file holds " +
                                             std::to_string(sequence));
      }
      const std::size_t end = offset + frame.total_size;
      if (end != file.size) {
        return make_error(Errc::corrupt, std::string(kSnapshotName) + ": " + std::to_string(file.size - end) +
                                             " bytes after the end marker at byte offset " + std::to_string(end));
      }
      report.snapshot_records = static_cast<std::size_t>(sequence);
      if (arena_used > 0) store.arenas.push_back(std::move(arena));
      return ok_result();
    }
    if (entry->op != codec::EntryOp::put) {
      return make_error(Errc::corrupt, where(kSnapshotName, sequence, offset) + ": a remove entry in a snapshot");
    }
    Slot slot;
    slot.encoded = entry->record_bytes.data;
    slot.encoded_size = entry->record_bytes.size;
    const auto [it, inserted] =
        store.records[index_of(entry->kind)].emplace(std::string(id_of(*entry->record)), std::move(slot));
    if (!inserted) {
      return make_error(Errc::corrupt, where(kSnapshotName, sequence, offset) + ": second " +
                                           std::string(to_string(entry->kind)) + " record " +
                                           quote_for_error(it->first));
    }
    arena_used += plain_size;
    offset += frame.total_size;
    ++sequence;
  }
  return make_error(Errc::corrupt, std::string(kSnapshotName) + ": no end marker after entry " +
                                       std::to_string(sequence) + " (byte offset " + std::to_string(offset) +
                                       "): the file is truncated");
}

// Moves the torn bytes [good_size, torn_end) of the journal aside to keys.journal.torn-<unix time> and cuts the
// journal (zero fill included) at good_size.
Result<std::string> set_torn_tail_aside(Impl& store, const LoadedFile& journal, std::size_t good_size,
                                        std::size_t torn_end) {
  const ByteView torn(journal.content.data() + good_size, torn_end - good_size);
  const std::string stem = kTornPrefix + std::to_string(static_cast<long long>(std::time(nullptr)));
  std::string name = stem;
  UniqueFd fd;
  for (int attempt = 1; attempt < 1000 && !fd.valid(); ++attempt) {
    fd = UniqueFd(
        ::openat(store.dir_fd.get(), name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (!fd.valid() && errno != EEXIST) return io_error("cannot create", store.path_of(name.c_str()), errno);
    if (!fd.valid()) name = stem + "-" + std::to_string(attempt);
  }
  if (!fd.valid()) return io_error("cannot create", store.path_of(stem.c_str()), EEXIST);
  if (const int err = files::write_all(fd.get(), torn.data, torn.size); err != 0) {
    return io_error("cannot write", store.path_of(name.c_str()), err);
  }
  if (::fsync(fd.get()) != 0) return io_error("cannot fsync", store.path_of(name.c_str()), errno);
  if (::fsync(store.dir_fd.get()) != 0) return io_error("cannot fsync directory", store.dir, errno);
  // Only now, with the bytes safe elsewhere, is the journal shortened.
  if (::ftruncate(journal.fd.get(), static_cast<off_t>(good_size)) != 0 || ::fdatasync(journal.fd.get()) != 0) {
    return io_error("cannot truncate", store.path_of(kJournalName), errno);
  }
  return name;
}

bool all_zero(const std::uint8_t* data, std::size_t size) {
  return std::all_of(data, data + size, [](std::uint8_t b) { return b == 0; });
}

// Whether the frame [offset, offset + size), which does not authenticate and has only zero fill after it, can be an
// interrupted append into the fill: some of its sectors never reached the disk, so it holds a run of zeros no sealed
// entry has (kZeroRunOfTornEntry), or its bytes after its last sector boundary are all zero (a lost last sector that
// held fewer bytes of it than that run).
bool looks_like_torn_append(ByteView file, std::size_t offset, std::size_t size) {
  const std::uint8_t* begin = file.data + offset;
  const std::uint8_t* end = begin + size;
  const std::size_t last_sector = (offset + size - 1) / kSectorSize * kSectorSize;
  if (last_sector > offset && all_zero(file.data + last_sector, offset + size - last_sector)) return true;
  std::size_t run = 0;
  for (const std::uint8_t* p = begin; p != end; ++p) {
    run = *p == 0 ? run + 1 : 0;
    if (run >= kZeroRunOfTornEntry) return true;
  }
  return false;
}

// Whether the frame at offset lost its first sector: zeros from its start to the next sector boundary, where they
// cover the length field and kMinLostHeadBytes in all, or its whole header is zeros.
bool lost_first_sector(ByteView file, std::size_t offset) {
  const std::size_t header_end = std::min(offset + codec::kLengthSize + codec::kNonceSize, file.size);
  const std::size_t boundary = (offset / kSectorSize + 1) * kSectorSize;
  if (boundary < header_end && boundary - offset >= kMinLostHeadBytes) {
    return all_zero(file.data + offset, boundary - offset);
  }
  return all_zero(file.data + offset, header_end - offset);
}

// An interrupted final append, unless a damaged length field hides whole entries behind it: that is tampering or
// bit rot, never a crash. The entry's own encoding says how long it really is; measure it on the unauthenticated
// keystream decryption, then let the tag decide. Returns the error when the frame at offset is such a damaged one.
std::optional<Error> damaged_length(const StoreState& store, ByteView file, std::size_t offset,
                                    const codec::Frame& frame, std::uint64_t journal_generation,
                                    std::uint64_t sequence) {
  const std::size_t rest = file.size - offset;
  const std::size_t header_bytes = codec::kLengthSize + codec::kNonceSize;
  if (rest <= header_bytes) return std::nullopt;
  const ByteView nonce(file.data + offset + codec::kLengthSize, codec::kNonceSize);
  const std::size_t body = std::min(rest - header_bytes, codec::kMaxCiphertextSize);
  SecretBuffer probe(body);
  codec::decrypt_unauthenticated(store.sealing_key, nonce, ByteView(nonce.data + codec::kNonceSize, body),
                                 probe.data());
  const std::optional<std::size_t> measured = codec::measure_entry(probe.view());
  if (!measured || header_bytes + *measured + codec::kTagSize > rest) return std::nullopt;
  codec::Frame whole;
  whole.status = codec::FrameStatus::complete;
  whole.nonce = nonce;
  whole.ciphertext = ByteView(nonce.data + codec::kNonceSize, *measured + codec::kTagSize);
  if (!codec::open_entry(store.sealing_key, codec::FileKind::journal, journal_generation, sequence, whole,
                         probe.data())) {
    return std::nullopt;
  }
  return make_error(Errc::corrupt, where(kJournalName, sequence, offset) + ": length field " +
                                       std::to_string(frame.length) + " does not match the entry (" +
                                       std::to_string(whole.ciphertext.size) + " bytes): damaged");
}

struct JournalScan {
  std::size_t good_size = 0;  // end of the last entry that authenticates
  std::size_t torn_end = 0;   // end of the torn bytes to set aside (torn tail only)
};

// Reads the journal entries of generation journal_generation. apply=false only authenticates them (a stale
// journal). Returns the byte size of the well-formed part; a torn final entry is described in torn.
// A version 2 journal (zero_fill) ends where only zeros follow; version 1 ends with the file.
Result<JournalScan> load_journal(Impl& store, ByteView file, std::uint64_t journal_generation, bool zero_fill,
                                 bool group_writes, bool apply, OpenReport& report, std::string& torn) {
  SecretBuffer arena(file.size);
  std::size_t arena_used = 0;
  std::size_t offset = codec::kHeaderSize;
  std::uint64_t sequence = 0;
  // Past the last non-zero byte of a version 2 journal there is only fill. (The last entry may itself end in zero
  // bytes: the loop reads whole frames, so it still ends after that entry.)
  std::size_t content_end = file.size;
  if (zero_fill) {
    while (content_end > offset && file.data[content_end - 1] == 0) --content_end;
  }
  JournalScan scan;
  scan.torn_end = file.size;
  while (offset < content_end) {
    if (zero_fill && lost_first_sector(file, offset)) {
      // A frame header that never reached the disk, with later sectors of the same append that did: an interrupted
      // append (overwriting an acknowledged entry's header with zeros is a lost write, not covered).
      torn = where(kJournalName, sequence, offset) + ": interrupted append (" + std::to_string(content_end - offset) +
             " bytes after a frame header of zeros)";
      scan.torn_end = content_end;
      break;
    }
    const codec::Frame frame = codec::read_frame(file, offset);
    if (frame.status == codec::FrameStatus::bad_length) {
      return frame_error(kJournalName, sequence, offset, frame, file.size);
    }
    if (frame.status == codec::FrameStatus::truncated) {
      // An interrupted final append, unless a damaged length field hides whole entries behind it: that is
      // tampering or bit rot, never a crash. The entry's own encoding says how long it really is; measure it on
      // the unauthenticated keystream decryption, then let the tag decide.
      const std::size_t rest = file.size - offset;
      if (auto damaged = damaged_length(store, file, offset, frame, journal_generation, sequence)) return *damaged;
      torn =
          where(kJournalName, sequence, offset) + ": incomplete final entry (" + std::to_string(rest) + " bytes" +
          (rest >= codec::kLengthSize ? " of " + std::to_string(codec::kLengthSize + codec::kNonceSize + frame.length)
                                      : std::string()) +
          ")";
      break;
    }
    std::uint8_t* plain = arena.data() + arena_used;
    if (!codec::open_entry(store.sealing_key, codec::FileKind::journal, journal_generation, sequence, frame, plain)) {
      // A damaged length field that reaches into the zero fill looks like a torn append too; the entry's own
      // length tells them apart.
      // Version 3: more entries of the same interrupted group append may follow it, in any state.
      const bool last_of_content = offset + frame.total_size >= content_end;
      const bool within_one_group = group_writes && content_end - (offset + frame.total_size) <= kMaxGroupBytes;
      if (zero_fill && (last_of_content || within_one_group) &&
          looks_like_torn_append(file, offset, frame.total_size)) {
        if (auto damaged = damaged_length(store, file, offset, frame, journal_generation, sequence)) return *damaged;
        torn = where(kJournalName, sequence, offset) + ": interrupted append (" +
               std::to_string(frame.total_size) + "-byte entry, part of it zeros)";
        scan.torn_end = std::max(content_end, offset + frame.total_size);
        break;
      }
      return open_error(kJournalName, sequence, offset, false);
    }
    const std::size_t plain_size = frame.length - codec::kTagSize;
    auto entry = codec::parse_entry(ByteView(plain, plain_size), codec::SecretFields::skip);
    if (!entry) return make_error(Errc::corrupt, where(kJournalName, sequence, offset) + ": " + entry.error().message);
    if (apply) {
      KindMap& map = store.records[index_of(entry->kind)];
      switch (entry->op) {
        case codec::EntryOp::put: {
          Slot& slot = map[std::string(id_of(*entry->record))];
          slot.record.reset();
          slot.encoded = entry->record_bytes.data;
          slot.encoded_size = entry->record_bytes.size;
          arena_used += plain_size;
          break;
        }
        case codec::EntryOp::remove: {
          auto it = map.find(entry->id);
          if (it == map.end() && entry->kind == RecordKind::session_key) it = legacy_session_key(map, entry->id);
          if (it == map.end()) {
            return make_error(Errc::corrupt, where(kJournalName, sequence, offset) + ": removes " +
                                                 std::string(to_string(entry->kind)) + " record " +
                                                 quote_for_error(entry->id) + ", which does not exist");
          }
          map.erase(it);
          break;
        }
        case codec::EntryOp::end:
          return make_error(Errc::corrupt, where(kJournalName, sequence, offset) + ": an end marker in a journal");
      }
    } else if (entry->op == codec::EntryOp::end) {
      return make_error(Errc::corrupt, where(kJournalName, sequence, offset) + ": an end marker in a journal");
    }
    offset += frame.total_size;
    ++sequence;
  }
  if (apply) {
    report.journal_entries = static_cast<std::size_t>(sequence);
    store.journal_entries = sequence;
    if (arena_used > 0) store.arenas.push_back(std::move(arena));
  }
  scan.good_size = offset;
  return scan;
}

}  // namespace

Result<void> check_store_directory_mode(mode_t mode, const std::string& what) {
  if ((mode & (S_IWGRP | S_IWOTH)) == 0) return ok_result();
  return make_error(Errc::permission, what + ": mode " + mode_text(mode) +
                                          " is writable by group or others; must not be (chmod 700, or 750 to let "
                                          "the group read)");
}

namespace {

// Opens the store directory and checks the mode of what was opened (fstat on the descriptor: no window in which the
// path could be swapped between the check and the use).
Result<UniqueFd> open_directory(const std::filesystem::path& dir) {
  UniqueFd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) {
    const int err = errno;
    if (err == ENOENT) return make_error(Errc::not_found, "key store directory " + dir.string() + " does not exist");
    if (err == ENOTDIR) return make_error(Errc::invalid_argument, dir.string() + " is not a directory");
    return io_error("cannot open key store directory", dir, err);
  }
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return io_error("cannot stat key store directory", dir, errno);
  if (auto mode = check_store_directory_mode(st.st_mode, "key store directory " + dir.string()); !mode) {
    return std::move(mode).error();
  }
  return fd;
}

Result<void> create_store(Impl& store, OpenReport&) {
  constexpr std::uint64_t kFirstGeneration = 1;
  Bytes snapshot;
  codec::append_header(snapshot, codec::FileKind::snapshot, kFirstGeneration);
  std::uint8_t end[codec::kEndEntrySize];
  codec::write_end_entry(0, end);
  codec::append_sealed_entry(snapshot, store.sealing_key, codec::FileKind::snapshot, kFirstGeneration, 0,
                             ByteView(end, sizeof end));
  auto written = store.replace_file(kSnapshotName, snapshot);
  if (!written) return std::move(written).error();
  store.generation = kFirstGeneration;
  return store.start_journal(kFirstGeneration);
}

// Loads the snapshot with the first candidate sealing key that authenticates its first entry (the others fail there,
// before anything is kept) and makes it the store's.
Result<void> load_snapshot_with_any(Impl& store, ByteView file, std::vector<SecretBuffer>& sealing_keys,
                                    OpenReport& report) {
  for (std::size_t i = 0; i < sealing_keys.size(); ++i) {
    store.sealing_key = std::move(sealing_keys[i]);
    auto loaded = load_snapshot(store, file, report);
    if (loaded || loaded.error().code != Errc::crypto) {
      report.master_key_index = i;
      return loaded;
    }
    if (i + 1 == sealing_keys.size()) {
      if (sealing_keys.size() == 1) return loaded;
      Error error = std::move(loaded).error();
      error.message += " (tried " + std::to_string(sealing_keys.size()) + " master keys)";
      return error;
    }
  }
  return make_error(Errc::invalid_argument, "no master key given");
}

Result<void> open_existing(Impl& store, std::vector<SecretBuffer>& sealing_keys, OpenReport& report) {
  auto snapshot = load_store_file(store, kSnapshotName, O_RDONLY);
  if (!snapshot) return std::move(snapshot).error();
  if (auto ok = load_snapshot_with_any(store, snapshot->content, sealing_keys, report); !ok) return ok;

  if (!exists_in(store, kJournalName)) {
    // The one legitimate way to get here: a crash between the two files of create_store().
    if (store.generation == 1 && report.snapshot_records == 0) return store.start_journal(store.generation);
    return make_error(Errc::corrupt, store.path_of(kJournalName).string() + " is missing while " + kSnapshotName +
                                         " of generation " + std::to_string(store.generation) + " holds " +
                                         std::to_string(report.snapshot_records) + " records; refusing to guess");
  }
  auto journal = load_store_file(store, kJournalName, O_RDWR);
  if (!journal) return std::move(journal).error();
  auto header = codec::parse_header(journal->content, codec::FileKind::journal, kJournalName);
  if (!header) return std::move(header).error();
  if (header->generation > store.generation) {
    return make_error(Errc::corrupt, std::string(kJournalName) + ": generation " + std::to_string(header->generation) +
                                         " is newer than " + kSnapshotName + " (generation " +
                                         std::to_string(store.generation) + ")");
  }
  std::string torn;
  const bool zero_fill = header->version >= codec::kFirstZeroFillJournalVersion;
  const bool group_writes = header->version >= codec::kJournalVersion;
  if (header->generation < store.generation) {
    // A crash during compaction, after the new snapshot and before the new journal: the snapshot already holds
    // everything in this journal. Its entries must still authenticate, or a damaged generation field could
    // throw acknowledged entries away.
    auto checked =
        load_journal(store, journal->content, header->generation, zero_fill, group_writes, /*apply=*/false, report,
                     torn);
    if (!checked) return std::move(checked).error();
    return store.start_journal(store.generation);
  }
  auto scan =
      load_journal(store, journal->content, store.generation, zero_fill, group_writes, /*apply=*/true, report, torn);
  if (!scan) return std::move(scan).error();
  store.journal_allocated = journal->content.size();
  if (!torn.empty()) {
    auto aside = set_torn_tail_aside(store, *journal, scan->good_size, scan->torn_end);
    if (!aside) return std::move(aside).error();
    report.torn_tail = torn + ", moved to " + (store.dir / *aside).string();
    store.journal_allocated = scan->good_size;
  }
  store.journal_size = scan->good_size;
  store.journal_zero_fill = zero_fill;
  store.journal_version = header->version;
  store.journal_fd = std::move(journal->fd);
  return ok_result();
}

}  // namespace

struct KeyStore::Impl : StoreState {};

namespace {

// The master key only ever keys HKDF; the sealing key is bound to this format by the info string.
Result<SecretBuffer> sealing_key_of(const SecretBuffer& master_key) {
  if (master_key.size() != kMasterKeySize) {
    return make_error(Errc::invalid_argument, "master key is " + std::to_string(master_key.size()) +
                                                  " bytes, must be " + std::to_string(kMasterKeySize));
  }
  return hkdf_sha256(master_key, ByteView(), ByteView::of(kSealingInfo), codec::kSealingKeySize);
}

}  // namespace

Result<KeyStore> KeyStore::open(const std::filesystem::path& dir, SecretBuffer master_key, OpenReport* report) {
  std::vector<SecretBuffer> keys;
  keys.push_back(std::move(master_key));
  return open(dir, std::move(keys), report);
}

Result<KeyStore> KeyStore::open(const std::filesystem::path& dir, std::vector<SecretBuffer> master_keys,
                                OpenReport* report) {
  ensure_sodium_initialised();
  if (master_keys.empty()) return make_error(Errc::invalid_argument, "no master key given");
  std::vector<SecretBuffer> sealing_keys;
  for (SecretBuffer& master_key : master_keys) {
    auto sealing_key = sealing_key_of(master_key);
    if (!sealing_key) return std::move(sealing_key).error();
    sealing_keys.push_back(std::move(sealing_key).value());
    master_key.wipe();
  }
  auto dir_fd = open_directory(dir);
  if (!dir_fd) return std::move(dir_fd).error();
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->dir_fd = std::move(dir_fd).value();
  impl->group.event = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!impl->group.event.valid()) return io_error("cannot create the flush eventfd of key store", dir, errno);
  // flock(2) locks belong to the open file description: a second KeyStore on the same directory is refused whether
  // it is in another process or in this one (keystore.hpp).
  if (::flock(impl->dir_fd.get(), LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    if (err == EWOULDBLOCK) {
      return make_error(Errc::io, "key store " + dir.string() +
                                      " is already open (another process, or another KeyStore in this one; flock)");
    }
    return io_error("cannot lock key store directory", dir, err);
  }
  impl->sealing_key = sealing_keys.front().clone();  // a new store's; an existing one's is tried below
  OpenReport local_report;
  OpenReport& out = report != nullptr ? *report : local_report;
  out = OpenReport{};
  const bool have_snapshot = exists_in(*impl, kSnapshotName);
  const bool have_journal = exists_in(*impl, kJournalName);
  Result<void> opened = ok_result();
  if (!have_snapshot && !have_journal) {
    opened = create_store(*impl, out);
  } else if (!have_snapshot) {
    opened = make_error(Errc::corrupt, impl->path_of(kJournalName).string() + " exists without " + kSnapshotName +
                                           "; refusing to start a new store over it");
  } else {
    opened = open_existing(*impl, sealing_keys, out);
  }
  if (!opened) {
    Error error = std::move(opened).error();
    // Messages about entries name the file alone ("keys.journal: entry 3 at byte offset ..."); give them the path.
    if (error.message.rfind("keys.", 0) == 0) error.message = (dir / error.message).string();
    return error;
  }
  return KeyStore(std::move(impl));
}

KeyStore::KeyStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KeyStore::KeyStore(KeyStore&&) noexcept = default;
KeyStore& KeyStore::operator=(KeyStore&&) noexcept = default;
KeyStore::~KeyStore() = default;

namespace {

// The put entry's plaintext (op byte, record encoding) in the store's scratch buffer; the caller wipes it.
ByteView encode_put(Impl& store, const Record& record) {
  const std::size_t size = 1 + codec::encoded_record_size(record);
  std::uint8_t* plain = store.scratch_of_size(size);
  plain[0] = static_cast<std::uint8_t>(codec::EntryOp::put);
  codec::write_record(record, plain + 1);
  return ByteView(plain, size);
}

// Shows a written (or queued) put in memory, kept encoded like the records open() loads; the caller's record (and
// its SecretBuffers) goes away afterwards. Returns what was there before.
std::optional<Slot> show_put(Impl& store, const Record& record, ByteView plain) {
  Slot slot;
  slot.encoded_size = plain.size - 1;
  slot.encoded = store.keep_encoding(ByteView(plain.data + 1, plain.size - 1));
  KindMap& map = store.records[index_of(kind_of(record))];
  std::string id = id_of(record);
  std::optional<Slot> previous;
  if (auto it = map.find(id); it != map.end()) previous = std::move(it->second);
  map.insert_or_assign(std::move(id), std::move(slot));
  return previous;
}

// put() compacts when the journal holds more than max(kMinCompactionThreshold, records) entries. The entries are
// durable already: a failed compaction is retried later rather than reported as a failed put. It does mark the store
// broken when the files may no longer match memory.
void compact_if_due(Impl& store) {
  const std::uint64_t threshold = std::max<std::uint64_t>(kMinCompactionThreshold, store.record_count());
  if (store.journal_entries > threshold) (void)store.compact();
}

}  // namespace

Result<void> KeyStore::put(Record record) {
  if (auto ok = validate(record); !ok) return ok;
  if (auto ok = impl_->refuse_if_broken(); !ok) return ok;
  const ByteView plain = encode_put(*impl_, record);
  // Exactly what is stored already: nothing to write, and it is durable (unless a queued group write holds it; then
  // it goes the usual way, which waits for that write). dauthd puts every configured row at each start: one
  // fdatasync per unchanged row made a 10,000-row MEF take 10-40 s to start.
  if (impl_->unconfirmed.empty() &&
      impl_->stores_encoding(kind_of(record), id_of(record), ByteView(plain.data + 1, plain.size - 1))) {
    sodium_memzero(const_cast<std::uint8_t*>(plain.data), plain.size);
    return ok_result();
  }
  auto appended = impl_->append(plain);
  if (appended) (void)show_put(*impl_, record, plain);
  sodium_memzero(const_cast<std::uint8_t*>(plain.data), plain.size);
  if (!appended) return appended;
  compact_if_due(*impl_);
  return ok_result();
}

Result<void> KeyStore::put_when_durable(Record record, DurableHandler on_durable) {
  if (auto ok = validate(record); !ok) return ok;
  if (auto ok = impl_->refuse_if_broken(); !ok) return ok;
  if (impl_->journal_version < codec::kJournalVersion) {
    // An older journal allows one torn entry only (docs/keystore-format.md): start a version 3 one first.
    if (auto compacted = impl_->compact(); !compacted) return compacted;
  }
  const ByteView plain = encode_put(*impl_, record);
  auto queued = impl_->queue_entry(plain);
  if (queued) {
    UnconfirmedPut put;
    put.sequence = *queued;
    put.kind = kind_of(record);
    put.id = id_of(record);
    put.previous = show_put(*impl_, record, plain);
    put.on_durable = std::move(on_durable);
    impl_->unconfirmed.push_back(std::move(put));
  }
  sodium_memzero(const_cast<std::uint8_t*>(plain.data), plain.size);
  if (!queued) return std::move(queued).error();
  return ok_result();
}

int KeyStore::durable_fd() const noexcept { return impl_->group.event.get(); }

void KeyStore::deliver_durable() {
  // Called every loop round: the threshold is checked only after a delivery, not on the idle path.
  if (impl_->deliver_durable()) compact_if_due(*impl_);
}

void KeyStore::finish_queued_writes() {
  impl_->settle();
  deliver_durable();
}

Result<void> KeyStore::remove(RecordKind kind, std::string_view id) {
  if (!known_kind(kind)) {
    return make_error(Errc::invalid_argument, "record kind " + std::to_string(static_cast<int>(kind)) + " is unknown");
  }
  impl_->settle();  // a failed queued put of this id may be taken back: look afterwards
  KindMap& map = impl_->records[index_of(kind)];
  const auto it = map.find(id);
  if (it == map.end()) {
    return make_error(Errc::not_found, "no " + std::string(to_string(kind)) + " record " + quote_for_error(id));
  }
  const std::size_t size = codec::remove_entry_size(id);
  std::uint8_t* plain = impl_->scratch_of_size(size);
  codec::write_remove_entry(kind, id, plain);
  auto appended = impl_->append(ByteView(plain, size));
  if (!appended) return appended;
  map.erase(it);
  return ok_result();
}

bool KeyStore::holds(const Record& record) const {
  const std::size_t size = codec::encoded_record_size(record);
  SecretBuffer encoding(size);
  codec::write_record(record, encoding.data());
  return impl_->stores_encoding(kind_of(record), id_of(record), ByteView(encoding.data(), size));
}

const Record* KeyStore::find(RecordKind kind, std::string_view id) const {
  if (!known_kind(kind)) return nullptr;
  const KindMap& map = impl_->records[index_of(kind)];
  const auto it = map.find(id);
  return it == map.end() ? nullptr : impl_->materialise(it->second);
}

void KeyStore::for_each(RecordKind kind, const std::function<void(const Record&)>& visit) const {
  if (!known_kind(kind)) return;
  for (const auto& [id, slot] : impl_->records[index_of(kind)]) {
    if (const Record* record = impl_->materialise(slot)) visit(*record);
  }
}

std::size_t KeyStore::size() const { return impl_->record_count(); }

std::size_t KeyStore::size(RecordKind kind) const {
  return known_kind(kind) ? impl_->records[index_of(kind)].size() : 0;
}

Result<void> KeyStore::compact() { return impl_->compact(); }

Result<void> KeyStore::reseal(SecretBuffer new_master_key) {
  auto new_sealing_key = sealing_key_of(new_master_key);
  new_master_key.wipe();
  if (!new_sealing_key) return std::move(new_sealing_key).error();
  if (new_sealing_key->equals(impl_->sealing_key)) return ok_result();
  // First an empty journal under the old key: after the switch below, the next open() checks the journal it finds
  // stale with the new key, which authenticates no entry of the old one (docs/keystore-format.md "Re-sealing").
  if (auto compacted = impl_->compact(); !compacted) return compacted;
  return impl_->write_next_generation(&*new_sealing_key);
}

bool KeyStore::sealed_with(const SecretBuffer& master_key) const {
  auto sealing_key = sealing_key_of(master_key);
  return sealing_key && sealing_key->equals(impl_->sealing_key);
}

const std::filesystem::path& KeyStore::directory() const { return impl_->dir; }

KeyStore::SyncStats KeyStore::sync_stats() const {
  KeyStore::SyncStats stats = impl_->sync_stats;
  std::lock_guard lock(impl_->group.mutex);
  stats.syncs += impl_->group.stats.syncs;
  stats.entries += impl_->group.stats.entries;
  stats.time += impl_->group.stats.time;
  return stats;
}

}  // namespace dauth::crypto

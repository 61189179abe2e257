// A POSIX shared-memory segment with two snapshot slots, a commit word and two
// lock words (docs/INTERNALS.md section 2). All shared words are std::atomic and
// accessed with acquire/release ordering; processes map the same bytes.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <tuple>

namespace ckpt {

constexpr uint64_t kSegHeaderBytes = 4096;
constexpr uint32_t kSegVersion = 1;

enum SlotState : uint32_t { kEmpty = 0, kWriting = 1, kSealed = 2, kInvalid = 3 /* reported only */ };
enum LockMode : uint64_t { kWriteLock = 1, kReadLock = 2 };

// Byte layout of [0, 4096). Offsets are part of the on-shm contract.
struct SlotHeader {                   // 40 bytes
  std::atomic<uint32_t> state;        // +0  SlotState
  uint32_t payload_crc;               // +4
  int64_t step;                       // +8
  uint64_t seq;                       // +16
  uint64_t payload_bytes;             // +24
  uint64_t reserved;                  // +32
};

struct SegHeader {
  char magic[8];                      // +0   "CKPTSEG1"
  uint32_t version;                   // +8
  uint32_t header_bytes;              // +12  4096
  uint64_t slot_bytes;                // +16
  uint64_t size_bytes;                // +24  4096 + 2 * slot_bytes
  std::atomic<uint64_t> commit;       // +32  0 none, else seq << 1 | slot
  std::atomic<uint64_t> next_seq;     // +40  last seq handed out by seal
  std::atomic<uint64_t> lock[2];      // +48  0 free, else mode << 62 | pid
  SlotHeader slot[2];                 // +64
};
static_assert(sizeof(SlotHeader) == 40, "slot header layout is part of the shm contract");
static_assert(offsetof(SegHeader, commit) == 32 && offsetof(SegHeader, next_seq) == 40 &&
                  offsetof(SegHeader, lock) == 48 && offsetof(SegHeader, slot) == 64,
              "segment header offsets are part of the shm contract (INTERNALS.md section 2)");
static_assert(sizeof(SegHeader) <= kSegHeaderBytes, "segment header must fit in one page");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "u64 atomics must be lock free");

// The mapping; shared by the Segment and every memoryview of a slot, so that a
// view never outlives the pages it points to.
struct Mapping {
  void* addr = nullptr;
  uint64_t size = 0;
  int fd = -1;  // the segment's file, open as long as the mapping: pread without faulting pages in
  ~Mapping();
};

struct SlotInfo {
  uint32_t state;
  int64_t step;
  uint64_t seq;
  uint64_t payload_bytes;
  uint32_t payload_crc;
};

class Segment {
 public:
  static Segment create(const std::string& name, uint64_t slot_bytes);
  // populate: pre-fault the whole mapping (writers); readers of one slot pass false.
  static Segment open(const std::string& name, bool populate = true);
  static void unlink(const std::string& name);
  static bool exists(const std::string& name);

  const std::string& name() const { return name_; }
  // Sizes as checked when the segment was created or opened: never re-read from the
  // header, which every process mapping the segment can write.
  uint64_t slot_bytes() const;
  uint64_t size_bytes() const;
  uint64_t slot_address(int i) const;
  uint64_t base_address() const;             // byte 0 of the mapping (the header); size_bytes() long
  std::shared_ptr<Mapping> mapping() const;  // throws when closed
  // The segment's file (open read-write, close-on-exec), valid until close(): reading a
  // slot with pread() costs no page faults in this process, and nothing to unmap later.
  int fileno() const;

  bool try_lock(int i, uint64_t owner_pid, const std::string& mode);
  std::optional<std::pair<std::string, uint64_t>> lock_owner(int i) const;
  void unlock(int i, uint64_t owner_pid);
  // Clears the lock only while it is still held by `owner_pid` (0: by anyone), so a
  // breaker that checked a dead owner never clears a lock a live process took since.
  // True when this call cleared it.
  bool break_lock(int i, uint64_t owner_pid = 0);
  uint64_t seal(int i, int64_t step, uint64_t payload_bytes, uint32_t payload_crc);
  void mark_writing(int i);
  std::optional<std::tuple<int, int64_t, uint64_t>> committed() const;
  // A payload_bytes larger than the slot (a damaged header) reads as state INVALID.
  SlotInfo slot_info(int i) const;
  bool pin();
  void close();
  // Takes the mapping out of this Segment (now closed) and hands it to the caller, whose
  // release of it unmaps: the binding detaches under the GIL, then unmaps without it.
  std::shared_ptr<Mapping> detach();
  bool closed() const { return !map_; }

 private:
  Segment(std::string name, std::shared_ptr<Mapping> map, uint64_t slot_bytes)
      : name_(std::move(name)), map_(std::move(map)), slot_bytes_(slot_bytes) {}
  SegHeader* hdr(const char* call) const;
  void check_slot(const char* call, int i) const;

  std::string name_;
  std::shared_ptr<Mapping> map_;
  uint64_t slot_bytes_ = 0;
};

const char* slot_state_name(uint32_t state);

}  // namespace ckpt

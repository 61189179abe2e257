#include "segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "native_error.h"

namespace ckpt {
namespace {

constexpr char kMagic[8] = {'C', 'K', 'P', 'T', 'S', 'E', 'G', '1'};
constexpr uint64_t kPidMask = (1ull << 62) - 1;
constexpr uint64_t kPage = 4096;

void check_name(const char* call, const std::string& name) {
  bool ok = name.size() >= 2 && name.size() <= 255 && name[0] == '/' &&
            name.find('/', 1) == std::string::npos && name.find('\0') == std::string::npos;
  if (!ok)
    throw NativeErrorCpp(std::string(call) + "('" + name +
                         "'): a segment name must start with '/', contain no other '/', and be "
                         "at most 255 characters (e.g. '/ckpt-1000-job-r0-g0')");
}

// Closes an fd on scope exit.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

std::shared_ptr<Mapping> map_fd(const char* call, const std::string& name, int fd, uint64_t size,
                                bool populate) {
  int flags = MAP_SHARED | (populate ? MAP_POPULATE : 0);
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (p == MAP_FAILED) throw NativeErrorCpp(errno_message(std::string(call) + "('" + name + "')", "mmap", errno));
  auto m = std::make_shared<Mapping>();
  m->addr = p;
  m->size = size;
  m->fd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (m->fd < 0) throw NativeErrorCpp(errno_message(std::string(call) + "('" + name + "')", "dup of the segment fd", errno));
  return m;
}

}  // namespace

std::string errno_message(const std::string& call, const std::string& what, int err) {
  return call + ": " + what + " failed: " + std::strerror(err) + " (errno " + std::to_string(err) + ")";
}

const char* slot_state_name(uint32_t state) {
  switch (state) {
    case kEmpty: return "EMPTY";
    case kWriting: return "WRITING";
    case kSealed: return "SEALED";
    default: return "INVALID";
  }
}

Mapping::~Mapping() {
  if (addr) ::munmap(addr, size);
  if (fd >= 0) ::close(fd);
}

Segment Segment::create(const std::string& name, uint64_t slot_bytes) {
  const char* call = "Segment.create";
  check_name(call, name);
  std::string where = std::string(call) + "('" + name + "')";
  if (slot_bytes == 0 || slot_bytes % kPage != 0)
    throw NativeErrorCpp(where + ": slot_bytes=" + std::to_string(slot_bytes) +
                         " must be a positive multiple of 4096; round it up");
  if (slot_bytes > (1ull << 46)) throw NativeErrorCpp(where + ": slot_bytes is absurdly large");
  uint64_t size = kSegHeaderBytes + 2 * slot_bytes;
  Fd fd{::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600)};
  if (fd.fd < 0) {
    int err = errno;
    std::string hint = err == EEXIST ? " (a segment with this name exists: open it, or unlink it "
                                       "after checking that no process uses it)"
                                     : "";
    throw NativeErrorCpp(errno_message(where, "shm_open(O_CREAT|O_EXCL)", err) + hint);
  }
  // From here on a failure must remove the half-made segment.
  try {
    if (::fchmod(fd.fd, 0600) != 0) throw NativeErrorCpp(errno_message(where, "fchmod(0600)", errno));
    if (::ftruncate(fd.fd, static_cast<off_t>(size)) != 0)
      throw NativeErrorCpp(errno_message(where, "ftruncate to " + std::to_string(size) + " bytes", errno));
    // Reserve the pages now so a full /dev/shm fails here, not as SIGBUS mid-snapshot.
    int err = ::posix_fallocate(fd.fd, 0, static_cast<off_t>(size));
    if (err != 0 && err != EOPNOTSUPP && err != EINVAL)
      throw NativeErrorCpp(errno_message(where, "reserving " + std::to_string(size) +
                                                    " bytes in /dev/shm (posix_fallocate)", err) +
                           "; free shared memory or use smaller slots");
    auto map = map_fd(call, name, fd.fd, size, /*populate=*/true);
    // Touch every page with a write so the first snapshot takes no page faults.
    auto* base = static_cast<volatile unsigned char*>(map->addr);
    for (uint64_t off = 0; off < size; off += kPage) base[off] = 0;
    auto* h = static_cast<SegHeader*>(map->addr);
    h->version = kSegVersion;
    h->header_bytes = static_cast<uint32_t>(kSegHeaderBytes);
    h->slot_bytes = slot_bytes;
    h->size_bytes = size;
    h->commit.store(0, std::memory_order_relaxed);
    h->next_seq.store(0, std::memory_order_relaxed);
    for (int i = 0; i < 2; i++) {
      h->lock[i].store(0, std::memory_order_relaxed);
      h->slot[i].state.store(kEmpty, std::memory_order_relaxed);
    }
    std::atomic_thread_fence(std::memory_order_release);
    std::memcpy(h->magic, kMagic, sizeof(kMagic));  // last: a complete header is now visible
    return Segment(name, std::move(map), slot_bytes);
  } catch (...) {
    ::shm_unlink(name.c_str());
    throw;
  }
}

Segment Segment::open(const std::string& name, bool populate) {
  const char* call = "Segment.open";
  check_name(call, name);
  std::string where = std::string(call) + "('" + name + "')";
  Fd fd{::shm_open(name.c_str(), O_RDWR, 0)};
  if (fd.fd < 0) {
    int err = errno;
    std::string hint = err == ENOENT ? " (no such segment: the daemon may not have created it yet)" : "";
    throw NativeErrorCpp(errno_message(where, "shm_open", err) + hint);
  }
  struct stat st;
  if (::fstat(fd.fd, &st) != 0) throw NativeErrorCpp(errno_message(where, "fstat", errno));
  if (st.st_uid != ::geteuid() || (st.st_mode & 077) != 0)
  {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%03o", static_cast<unsigned>(st.st_mode & 0777));
    throw NativeErrorCpp(where + ": refusing a segment owned by uid " + std::to_string(st.st_uid) +
                         " with mode " + mode +
                         "; ckpt segments are owner-only (0600) and belong to this user; unlink it");
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < kSegHeaderBytes)
    throw NativeErrorCpp(where + ": segment is " + std::to_string(size) +
                         " bytes, smaller than its 4096-byte header: truncated or not a ckpt segment; unlink it");
  auto map = map_fd(call, name, fd.fd, size, populate);
  auto* h = static_cast<SegHeader*>(map->addr);
  if (std::memcmp(h->magic, kMagic, sizeof(kMagic)) != 0)
    throw NativeErrorCpp(where + ": bad magic (expected \"CKPTSEG1\"): not a ckpt segment, or one "
                         "still being created; unlink it if it is stale");
  std::atomic_thread_fence(std::memory_order_acquire);
  if (h->version != kSegVersion)
    throw NativeErrorCpp(where + ": segment version " + std::to_string(h->version) +
                         ", this build reads version " + std::to_string(kSegVersion) +
                         "; use a matching ckpt version or unlink it");
  // Read once: another process may write the header meanwhile. Bounded before the
  // multiplication, so a huge value cannot wrap the size check around.
  const uint64_t slot_bytes = h->slot_bytes, size_in_header = h->size_bytes;
  const bool fits = slot_bytes != 0 && slot_bytes % kPage == 0 && slot_bytes <= (size - kSegHeaderBytes) / 2;
  if (!fits || size != kSegHeaderBytes + 2 * slot_bytes || size_in_header != size)
    throw NativeErrorCpp(where + ": segment is " + std::to_string(size) + " bytes but its header says slot_bytes=" +
                         std::to_string(slot_bytes) + " and size_bytes=" + std::to_string(size_in_header) +
                         " (a segment is 4096 + 2 * slot_bytes): truncated or corrupt; unlink it");
  return Segment(name, std::move(map), slot_bytes);
}

void Segment::unlink(const std::string& name) {
  check_name("Segment.unlink", name);
  if (::shm_unlink(name.c_str()) != 0 && errno != ENOENT)
    throw NativeErrorCpp(errno_message("Segment.unlink('" + name + "')", "shm_unlink", errno));
}

bool Segment::exists(const std::string& name) {
  check_name("Segment.exists", name);
  int fd = ::shm_open(name.c_str(), O_RDONLY, 0);
  if (fd >= 0) {
    ::close(fd);
    return true;
  }
  if (errno == ENOENT) return false;
  if (errno == EACCES) return true;  // exists, but not ours
  throw NativeErrorCpp(errno_message("Segment.exists('" + name + "')", "shm_open", errno));
}

SegHeader* Segment::hdr(const char* call) const {
  if (!map_) throw NativeErrorCpp(std::string("Segment.") + call + "('" + name_ + "'): the segment is closed; open it again");
  return static_cast<SegHeader*>(map_->addr);
}

void Segment::check_slot(const char* call, int i) const {
  hdr(call);
  if (i != 0 && i != 1)
    throw NativeErrorCpp(std::string("Segment.") + call + "('" + name_ + "'): slot " + std::to_string(i) +
                         " does not exist; slots are 0 and 1");
}

std::shared_ptr<Mapping> Segment::mapping() const {
  hdr("slot_view");
  return map_;
}

int Segment::fileno() const {
  hdr("fileno");
  return map_->fd;
}

uint64_t Segment::slot_bytes() const {
  hdr("slot_bytes");
  return slot_bytes_;
}
uint64_t Segment::size_bytes() const {
  hdr("size_bytes");
  return map_->size;
}

uint64_t Segment::base_address() const {
  hdr("base_address");
  return reinterpret_cast<uint64_t>(map_->addr);
}

uint64_t Segment::slot_address(int i) const {
  check_slot("slot_address", i);
  return reinterpret_cast<uint64_t>(map_->addr) + kSegHeaderBytes + static_cast<uint64_t>(i) * slot_bytes();
}

bool Segment::try_lock(int i, uint64_t owner_pid, const std::string& mode) {
  check_slot("try_lock", i);
  uint64_t m;
  if (mode == "write") m = kWriteLock;
  else if (mode == "read") m = kReadLock;
  else throw NativeErrorCpp("Segment.try_lock: mode must be \"write\" or \"read\", got \"" + mode + "\"");
  if (owner_pid == 0 || owner_pid > kPidMask)
    throw NativeErrorCpp("Segment.try_lock: owner_pid must be a positive pid, got " + std::to_string(owner_pid));
  uint64_t expected = 0;
  return map_ && hdr("try_lock")->lock[i].compare_exchange_strong(
                     expected, (m << 62) | owner_pid, std::memory_order_acq_rel, std::memory_order_acquire);
}

std::optional<std::pair<std::string, uint64_t>> Segment::lock_owner(int i) const {
  check_slot("lock_owner", i);
  uint64_t w = hdr("lock_owner")->lock[i].load(std::memory_order_acquire);
  if (w == 0) return std::nullopt;
  return std::make_pair(std::string((w >> 62) == kWriteLock ? "write" : "read"), w & kPidMask);
}

void Segment::unlock(int i, uint64_t owner_pid) {
  check_slot("unlock", i);
  auto& word = hdr("unlock")->lock[i];
  uint64_t w = word.load(std::memory_order_acquire);
  for (;;) {
    if (w == 0 || (w & kPidMask) != owner_pid)
      throw NativeErrorCpp("Segment.unlock('" + name_ + "', slot " + std::to_string(i) + ", pid " +
                           std::to_string(owner_pid) + "): the lock is " +
                           (w == 0 ? std::string("not held") : "held by pid " + std::to_string(w & kPidMask)) +
                           "; only the owner may unlock (use break_lock after checking the owner is dead)");
    if (word.compare_exchange_weak(w, 0, std::memory_order_acq_rel, std::memory_order_acquire)) return;
  }
}

bool Segment::break_lock(int i, uint64_t owner_pid) {
  check_slot("break_lock", i);
  auto& word = hdr("break_lock")->lock[i];
  uint64_t w = word.load(std::memory_order_acquire);
  while (w != 0 && (owner_pid == 0 || (w & kPidMask) == owner_pid)) {
    if (word.compare_exchange_weak(w, 0, std::memory_order_acq_rel, std::memory_order_acquire)) return true;
  }
  return false;
}

void Segment::mark_writing(int i) {
  check_slot("mark_writing", i);
  hdr("mark_writing")->slot[i].state.store(kWriting, std::memory_order_release);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

uint64_t Segment::seal(int i, int64_t step, uint64_t payload_bytes, uint32_t payload_crc) {
  check_slot("seal", i);
  SegHeader* h = hdr("seal");
  uint64_t lw = h->lock[i].load(std::memory_order_acquire);
  if ((lw >> 62) != kWriteLock)
    throw NativeErrorCpp("Segment.seal('" + name_ + "', slot " + std::to_string(i) +
                         "): the caller must hold the slot's write lock (take it with try_lock(i, pid, \"write\"))");
  if (payload_bytes > slot_bytes_)
    throw NativeErrorCpp("Segment.seal: payload_bytes=" + std::to_string(payload_bytes) +
                         " exceeds slot_bytes=" + std::to_string(slot_bytes_));
  SlotHeader& s = h->slot[i];
  s.state.store(kWriting, std::memory_order_release);
  uint64_t seq = h->next_seq.fetch_add(1, std::memory_order_acq_rel) + 1;
  s.step = step;
  s.seq = seq;
  s.payload_bytes = payload_bytes;
  s.payload_crc = payload_crc;
  s.state.store(kSealed, std::memory_order_release);  // header complete before SEALED
  // Publish last; never move the commit word backwards if a newer seal raced us.
  uint64_t want = (seq << 1) | static_cast<uint64_t>(i);
  uint64_t cur = h->commit.load(std::memory_order_acquire);
  while ((cur >> 1) < seq &&
         !h->commit.compare_exchange_weak(cur, want, std::memory_order_acq_rel, std::memory_order_acquire)) {
  }
  return seq;
}

SlotInfo Segment::slot_info(int i) const {
  check_slot("slot_info", i);
  const SlotHeader& s = hdr("slot_info")->slot[i];
  SlotInfo info;
  info.state = s.state.load(std::memory_order_acquire);
  info.step = s.step;
  info.seq = s.seq;
  info.payload_bytes = s.payload_bytes;
  info.payload_crc = s.payload_crc;
  if (info.payload_bytes > slot_bytes_) info.state = kInvalid;  // damaged: never read past the slot
  return info;
}

std::optional<std::tuple<int, int64_t, uint64_t>> Segment::committed() const {
  SegHeader* h = hdr("committed");
  uint64_t w = h->commit.load(std::memory_order_acquire);
  if (w != 0) {
    int slot = static_cast<int>(w & 1);
    SlotInfo info = slot_info(slot);
    if (info.state == kSealed && info.seq == (w >> 1))
      return std::make_tuple(slot, info.step, info.seq);
  }
  // The committed slot is being rewritten (or never was): the newest other SEALED slot.
  std::optional<std::tuple<int, int64_t, uint64_t>> best;
  for (int i = 0; i < 2; i++) {
    SlotInfo info = slot_info(i);
    if (info.state == kSealed && (!best || info.seq > std::get<2>(*best)))
      best = std::make_tuple(i, info.step, info.seq);
  }
  return best;
}

bool Segment::pin() {
  SegHeader* h = hdr("pin");
  return ::mlock(h, map_->size) == 0;
}

void Segment::close() { map_.reset(); }

std::shared_ptr<Mapping> Segment::detach() {
  std::shared_ptr<Mapping> m;
  m.swap(map_);
  return m;
}

}  // namespace ckpt

#include "copy_engine.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "copy_bytes.h"
#include "crc32c.h"
#include "native_error.h"

namespace ckpt {
namespace {

// Big chunks are split into pieces of this size so that two workers can share
// one chunk; small enough to balance, big enough that the per-piece lock and
// combine cost nothing (1 MiB copies in ~100 us).
constexpr uint64_t kPieceBytes = 1ull << 20;

// kReadFile reads through a per-worker buffer of this size: well inside L2.
constexpr uint64_t kBounceBytes = 256ull << 10;

// pread() all of [offset, offset + nbytes) of fd into dst; a file that ends first is an error.
void read_fully(int fd, unsigned char* dst, uint64_t offset, uint64_t nbytes) {
  uint64_t done = 0;
  while (done < nbytes) {
    ssize_t n = ::pread(fd, dst + done, nbytes - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw NativeErrorCpp(errno_message("CopyEngine.read_file", "pread at offset " + std::to_string(offset + done), errno));
    if (n == 0)
      throw NativeErrorCpp("CopyEngine.read_file: the file ends at byte " + std::to_string(offset + done) +
                           ", before the " + std::to_string(nbytes) + "-byte piece at offset " +
                           std::to_string(offset) + " (truncated?)");
    done += static_cast<uint64_t>(n);
  }
}

void run_piece(Piece& p, const Batch& b) {
  switch (b.mode) {
    case BatchMode::kReadFile: {
      // The kernel copies from the page cache (no page of the source is mapped here) into
      // a small buffer that stays in L2; the fused copy + crc then streams it to dst.
      // Reading into dst directly would cost a read of each dst line before its write.
      thread_local std::unique_ptr<unsigned char, decltype(&std::free)> bounce(
          static_cast<unsigned char*>(std::aligned_alloc(4096, kBounceBytes)), &std::free);
      if (!bounce) throw NativeErrorCpp("CopyEngine.read_file: out of memory for a read buffer");
      uint32_t crc = 0;
      for (uint64_t done = 0; done < p.nbytes; done += kBounceBytes) {
        uint64_t n = p.nbytes - done < kBounceBytes ? p.nbytes - done : kBounceBytes;
        read_fully(b.fd, bounce.get(), p.offset + done, n);
        if (b.crc_out != nullptr) {
          crc = crc32c_copy(p.dst + done, bounce.get(), n, crc);
        } else {
          copy_bytes(p.dst + done, bounce.get(), n);
        }
      }
      p.crc = crc;
      return;
    }
    case BatchMode::kCrcOnly:
      p.crc = crc32c(p.src, p.nbytes, 0);
      return;
    case BatchMode::kVerifiedCopy: {
      // The whole chunk is one piece: crc it (it is then in L3), compare, copy from cache.
      p.crc = crc32c(p.src, p.nbytes, 0);
      const unsigned char* e = b.expected + 4 * p.chunk;
      uint32_t want = static_cast<uint32_t>(e[0]) | static_cast<uint32_t>(e[1]) << 8 |
                      static_cast<uint32_t>(e[2]) << 16 | static_cast<uint32_t>(e[3]) << 24;
      if (p.crc == want) copy_bytes(p.dst, p.src, p.nbytes);
      return;
    }
    case BatchMode::kCopy:
      if (b.crc_out != nullptr) {
        p.crc = crc32c_copy(p.dst, p.src, p.nbytes, 0);
      } else {
        copy_bytes(p.dst, p.src, p.nbytes);
      }
      return;
  }
}

}  // namespace

uint64_t count_chunks(const std::vector<uint64_t>& sizes, uint64_t chunk_bytes) {
  if (chunk_bytes == 0) throw NativeErrorCpp("num_chunks: chunk_bytes must be > 0");
  uint64_t total = 0;
  for (uint64_t n : sizes) total += (n + chunk_bytes - 1) / chunk_bytes;
  return total;
}

bool CopyTicket::wait(double timeout_s) {
  std::unique_lock<std::mutex> lk(batch_->mu);
  auto ready = [&] { return batch_->done; };
  if (timeout_s < 0) {
    batch_->cv.wait(lk, ready);
  } else if (!batch_->cv.wait_for(lk, std::chrono::duration<double>(timeout_s), ready)) {
    return false;
  }
  if (!batch_->error.empty()) throw NativeErrorCpp(batch_->error);
  return true;
}

bool CopyTicket::done() const {
  std::lock_guard<std::mutex> lk(batch_->mu);
  return batch_->done;
}

CopyEngine::CopyEngine(int threads, int nice) : threads_(threads), owner_pid_(::getpid()) {
  if (threads < 1 || threads > 1024)
    throw NativeErrorCpp("CopyEngine(threads=" + std::to_string(threads) +
                         "): threads must be between 1 and 1024");
  if (nice < 0 || nice > 19)
    throw NativeErrorCpp("CopyEngine(nice=" + std::to_string(nice) +
                         "): nice must be between 0 (normal) and 19 (lowest priority)");
  workers_.reserve(threads);
  for (int i = 0; i < threads; i++)
    workers_.emplace_back([this, nice] {
      // Linux: a thread's nice value is per thread (its tid). Best effort: a failure
      // leaves the worker at normal priority.
      if (nice > 0) (void)setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), nice);
      worker_loop();
    });
}

CopyEngine::~CopyEngine() { close(); }

bool CopyEngine::forked() const { return ::getpid() != owner_pid_; }

void CopyEngine::close() {
  if (forked()) {
    // The workers (and whoever held mu_ at fork) live in the parent: joining would wait
    // forever and mu_ may be locked. Leak the thread handles on purpose.
    if (!workers_.empty()) new std::vector<std::thread>(std::move(workers_));
    workers_.clear();
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  workers_.clear();
}

CopyTicket CopyEngine::submit(const std::vector<CopyJob>& jobs, uint64_t chunk_bytes,
                              uint64_t crc_out, BatchMode mode, uint64_t expected_crc, int fd) {
  const char* call = mode == BatchMode::kCopy        ? "CopyEngine.submit"
                     : mode == BatchMode::kCrcOnly   ? "CopyEngine.crc_chunks"
                     : mode == BatchMode::kReadFile  ? "CopyEngine.read_file"
                                                     : "CopyEngine.verified_copy";
  if (chunk_bytes == 0) throw NativeErrorCpp(std::string(call) + ": chunk_bytes must be > 0");
  if (forked())
    throw NativeErrorCpp(std::string(call) + ": this CopyEngine was made in process " + std::to_string(owner_pid_) +
                         " and its workers did not survive fork(); create a new CopyEngine in this process");
  const bool copy = mode != BatchMode::kCrcOnly;
  // A verified chunk is checked whole before any of it is copied: one piece per chunk.
  const uint64_t piece_bytes = mode == BatchMode::kVerifiedCopy ? chunk_bytes : kPieceBytes;
  auto batch = std::make_shared<Batch>();
  batch->crc_out = reinterpret_cast<uint32_t*>(crc_out);
  batch->mode = mode;
  batch->expected = reinterpret_cast<const unsigned char*>(expected_crc);
  if (mode == BatchMode::kReadFile && fd < 0) throw NativeErrorCpp(std::string(call) + ": fd must be an open file");
  batch->fd = fd;
  const bool from_file = mode == BatchMode::kReadFile;
  uint64_t chunk = 0;
  for (const CopyJob& j : jobs) {
    for (uint64_t off = 0; off < j.nbytes; off += chunk_bytes, chunk++) {
      uint64_t clen = j.nbytes - off < chunk_bytes ? j.nbytes - off : chunk_bytes;
      for (uint64_t poff = 0; poff < clen; poff += piece_bytes) {
        uint64_t plen = clen - poff < piece_bytes ? clen - poff : piece_bytes;
        Piece p;
        p.src = from_file ? nullptr : reinterpret_cast<const unsigned char*>(j.src + off + poff);
        p.offset = from_file ? j.src + off + poff : 0;
        p.dst = copy ? reinterpret_cast<unsigned char*>(j.dst + off + poff) : nullptr;
        p.nbytes = plen;
        p.chunk = chunk;
        p.crc = 0;
        batch->pieces.push_back(p);
      }
    }
    batch->bytes_total += j.nbytes;
  }
  batch->num_chunks = chunk;
  if (batch->pieces.empty()) {
    batch->done = true;  // nothing to do (no jobs, or only empty ones)
    return CopyTicket(batch);
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stopping_) throw NativeErrorCpp(std::string(call) + ": the CopyEngine is closed; create a new one");
    queue_.push_back(batch);
  }
  cv_.notify_all();
  return CopyTicket(batch);
}

void CopyEngine::finish(Batch& b) {
  if (b.crc_out != nullptr) {
    // Pieces are in chunk order; combine each chunk's pieces left to right.
    size_t i = 0;
    while (i < b.pieces.size()) {
      uint64_t chunk = b.pieces[i].chunk;
      uint32_t crc = b.pieces[i].crc;
      for (i++; i < b.pieces.size() && b.pieces[i].chunk == chunk; i++)
        crc = crc32c_combine(crc, b.pieces[i].crc, b.pieces[i].nbytes);
      unsigned char le[4] = {static_cast<unsigned char>(crc), static_cast<unsigned char>(crc >> 8),
                             static_cast<unsigned char>(crc >> 16),
                             static_cast<unsigned char>(crc >> 24)};
      std::memcpy(reinterpret_cast<unsigned char*>(b.crc_out) + 4 * chunk, le, 4);
    }
  }
  {
    std::lock_guard<std::mutex> lk(b.mu);
    b.done = true;
  }
  b.cv.notify_all();
}

void CopyEngine::worker_loop() {
  for (;;) {
    std::shared_ptr<Batch> batch;
    size_t index = 0;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and all submitted work handed out
      batch = queue_.front();
      index = batch->next++;
      if (batch->next >= batch->pieces.size()) queue_.pop_front();
    }
    Piece& p = batch->pieces[index];
    try {
      run_piece(p, *batch);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lk(batch->mu);
      if (batch->error.empty()) batch->error = std::string("copy worker failed: ") + e.what();
    }
    if (batch->finished.fetch_add(1, std::memory_order_acq_rel) + 1 == batch->pieces.size())
      finish(*batch);
  }
}

}  // namespace ckpt

// A persistent worker pool that copies (and crc32c's) lists of byte ranges.
// Jobs are cut into chunks of <= chunk_bytes (never straddling two jobs); each
// chunk may be further cut into pieces so that several workers share one big
// chunk; piece crcs are combined into chunk crcs by the worker that finishes last.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ckpt {

struct CopyJob {
  uint64_t src = 0;  // an address; kReadFile: an offset in the batch's file
  uint64_t dst = 0;
  uint64_t nbytes = 0;
};

struct Piece {
  const unsigned char* src;  // kReadFile: nullptr (the bytes are at `offset` in the file)
  uint64_t offset;           // kReadFile only
  unsigned char* dst;  // nullptr: crc only
  uint64_t nbytes;
  uint64_t chunk;  // chunk index
  uint32_t crc;
};

// What a batch does with each piece.
enum class BatchMode {
  kCopy,          // copy (and crc the bytes when crc_out is set)
  kCrcOnly,       // crc only
  kVerifiedCopy,  // crc the source chunk; copy it only if it equals the expected crc
  kReadFile,      // pread() from the batch's file into dst (and crc what landed, when crc_out is set)
};

// Shared state of one submit(); outlives the engine (tickets hold a shared_ptr).
struct Batch {
  std::vector<Piece> pieces;
  uint64_t num_chunks = 0;
  uint32_t* crc_out = nullptr;  // nullptr: no crc
  const unsigned char* expected = nullptr;  // kVerifiedCopy: expected crc32c per chunk (u32 LE)
  BatchMode mode = BatchMode::kCopy;
  int fd = -1;                           // kReadFile: the file read from (the caller keeps it open)
  uint64_t bytes_total = 0;
  size_t next = 0;                       // guarded by the engine mutex
  std::atomic<size_t> finished{0};
  std::mutex mu;                         // guards done/error below
  std::condition_variable cv;
  bool done = false;
  std::string error;
};

class CopyTicket {
 public:
  explicit CopyTicket(std::shared_ptr<Batch> b) : batch_(std::move(b)) {}
  // Waits up to timeout_s (<0: forever). True when done; throws NativeErrorCpp
  // carrying a worker's error.
  bool wait(double timeout_s);
  bool done() const;
  uint64_t bytes_total() const { return batch_->bytes_total; }

 private:
  std::shared_ptr<Batch> batch_;
};

class CopyEngine {
 public:
  // nice: the workers' priority (0 normal .. 19 lowest); they yield to training threads.
  explicit CopyEngine(int threads, int nice = 0);
  ~CopyEngine();
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  // Validated jobs in; a ticket out. kCrcOnly ignores dst. kVerifiedCopy needs
  // expected_crc (the crc array the chunks were sealed with): a chunk whose source
  // does not match is not copied, so damaged bytes never reach the destination;
  // crc_out receives every chunk's actual crc for the caller to compare.
  // kReadFile reads each job's src as an offset in file `fd`, which must stay open until
  // the ticket is done; a file that ends before a job does fails the batch.
  CopyTicket submit(const std::vector<CopyJob>& jobs, uint64_t chunk_bytes, uint64_t crc_out,
                    BatchMode mode, uint64_t expected_crc = 0, int fd = -1);
  // Finishes the work already submitted, then stops the workers. Idempotent. In a
  // child of fork() (which has none of the workers) it only forgets them.
  void close();
  int threads() const { return threads_; }
  // True in a child of fork(): the workers belong to the parent.
  bool forked() const;

 private:
  void worker_loop();
  static void finish(Batch& b);

  int threads_;
  long owner_pid_;  // the process whose workers these are
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Batch>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

uint64_t count_chunks(const std::vector<uint64_t>& sizes, uint64_t chunk_bytes);

}  // namespace ckpt

// See plan.h.
#include "plan.h"

#include <algorithm>

#include "pool.h"

namespace ckpt_ec {
namespace {

// Below this many bytes touched (read + written) per thread, a wake-up of a
// worker costs more than it saves.
constexpr size_t kMinBytesPerThread = size_t(1) << 20;
// Pieces per thread: a few, so a thread slowed by a neighbour does not hold up the call.
constexpr size_t kPiecesPerThread = 4;
// When a matrix needs several passes over the sources, each pass covers one
// block of every source in turn, so that the later passes read it from L2.
constexpr size_t kL2Budget = 256 * 1024;

size_t round_up64(size_t v) { return (v + 63) & ~size_t(63); }

}  // namespace

Plan::Plan(const uint8_t* coefs, int rows, int cols, const IsaKernels* kern)
    : rows_(rows), cols_(cols), kern_(kern), coefs_(coefs, coefs + size_t(rows) * cols) {
  for (int r = 0; r < rows; r++) {
    const uint8_t* row = coefs + size_t(r) * cols;
    if (std::all_of(row, row + cols, [](uint8_t c) { return c <= 1; })) {
      XorRow x{r, {}};
      for (int j = 0; j < cols; j++)
        if (row[j]) x.srcs.push_back(j);
      xor_rows_.push_back(std::move(x));
    } else {
      gen_rows_.push_back(r);
      gen_coefs_.insert(gen_coefs_.end(), row, row + cols);
    }
  }
  if (kern_->table_bytes) {
    gen_tables_.resize(gen_coefs_.size() * kern_->table_bytes);
    for (size_t i = 0; i < gen_coefs_.size(); i++)
      kern_->make_table(gen_coefs_[i], &gen_tables_[i * kern_->table_bytes]);
  }
  size_t groups = (gen_rows_.size() + kern_->max_rows - 1) / kern_->max_rows;
  if (groups + xor_rows_.size() <= 1)
    block_bytes_ = ~size_t(0);
  else
    block_bytes_ = std::min<size_t>(64 * 1024, std::max<size_t>(4096, round_up64(kL2Budget / cols) & ~size_t(63)));
}

void Plan::run_range(const uint8_t* const* src, uint8_t* const* dst, size_t off, size_t len,
                     bool accumulate) const {
  const uint8_t* s[256];
  const uint8_t* xs[256];
  uint8_t* d[256];
  const size_t tb = kern_->table_bytes;
  const int ngen = int(gen_rows_.size());
  for (size_t done = 0; done < len;) {
    const size_t b = off + done, bl = std::min(block_bytes_, len - done);
    done += bl;
    for (int j = 0; j < cols_; j++) s[j] = src[j] + b;
    for (int g = 0; g < ngen; g += kern_->max_rows) {
      int nr = std::min(kern_->max_rows, ngen - g);
      for (int r = 0; r < nr; r++) d[r] = dst[gen_rows_[g + r]] + b;
      DotCall call{bl,
                   cols_,
                   nr,
                   s,
                   d,
                   gen_coefs_.data() + size_t(g) * cols_,
                   size_t(cols_),
                   tb ? gen_tables_.data() + size_t(g) * cols_ * tb : nullptr,
                   size_t(cols_) * tb,
                   accumulate};
      kern_->dot(call);
    }
    for (const XorRow& x : xor_rows_) {
      for (size_t i = 0; i < x.srcs.size(); i++) xs[i] = src[x.srcs[i]] + b;
      kern_->xor_sum(bl, int(x.srcs.size()), xs, dst[x.row] + b, accumulate);
    }
  }
}

void Plan::apply(const uint8_t* const* src, uint8_t* const* dst, size_t len, bool accumulate,
                 int threads) const {
  if (len == 0 || rows_ == 0) return;
  size_t touched = len * size_t(cols_ + rows_);
  size_t by_size = std::max<size_t>(1, touched / kMinBytesPerThread);
  int nthreads = int(std::min<size_t>(std::max(threads, 1), by_size));
  if (nthreads <= 1) {
    run_range(src, dst, 0, len, accumulate);
    return;
  }
  size_t piece = round_up64((len + nthreads * kPiecesPerThread - 1) / (nthreads * kPiecesPerThread));
  piece = std::max<size_t>(piece, 16 * 1024);
  size_t pieces = (len + piece - 1) / piece;
  parallel_for(pieces, nthreads, [&](size_t i) {
    size_t o = i * piece;
    run_range(src, dst, o, std::min(piece, len - o), accumulate);
  });
}

}  // namespace ckpt_ec

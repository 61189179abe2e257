// A coefficient matrix prepared for one kernel level: rows grouped into
// passes of at most max_rows, rows of only 0/1 coefficients set apart as
// plain XOR, and the per-coefficient tables built once. apply() is the one
// entry point of the byte work: dst[r] (^)= XOR_j coef[r][j] * src[j].
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace ckpt_ec {

class Plan {
 public:
  // coefs: rows x cols, row-major. kern: a usable level (cpu.h: kernels_for).
  Plan(const uint8_t* coefs, int rows, int cols, const IsaKernels* kern);

  int rows() const { return rows_; }
  int cols() const { return cols_; }
  int isa() const { return kern_->isa; }
  const std::vector<uint8_t>& coefs() const { return coefs_; }

  // src: cols pointers, dst: rows pointers, len bytes each; no dst may overlap
  // a src or another dst (the caller checks). Splits the bytes into 64-byte
  // aligned ranges over up to `threads` threads when the call is big enough.
  void apply(const uint8_t* const* src, uint8_t* const* dst, size_t len, bool accumulate,
             int threads) const;

 private:
  struct XorRow {
    int row;
    std::vector<int> srcs;
  };
  void run_range(const uint8_t* const* src, uint8_t* const* dst, size_t off, size_t len,
                 bool accumulate) const;

  int rows_, cols_;
  const IsaKernels* kern_;
  std::vector<uint8_t> coefs_;         // as given
  std::vector<int> gen_rows_;          // rows with a coefficient > 1, in order
  std::vector<uint8_t> gen_coefs_;     // their coefficients, gen_rows_.size() x cols
  std::vector<uint8_t> gen_tables_;    // their tables, [r][j] table_bytes each
  std::vector<XorRow> xor_rows_;
  size_t block_bytes_;                 // bytes per source handled by all passes in turn
};

}  // namespace ckpt_ec

// GF(2^8) arithmetic under the polynomial x^8+x^4+x^3+x^2+1 (0x11d), and the
// small matrix algebra of the Reed-Solomon codec: the Cauchy generator,
// inversion, the MDS check, and the per-coefficient tables the kernels use.
// Plain functions returning status codes; nothing here throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace ckpt_ec {

constexpr unsigned kPoly = 0x11d;

struct GfTables {
  uint8_t mul[256][256];  // mul[a][b] = a * b
  uint8_t inv[256];       // inv[0] = 0 (no inverse)
  uint8_t log[256];       // log[0] unused
  uint8_t exp[512];       // exp[i] = 2^i, doubled so log[a] + log[b] needs no mod
};

// Built once, on first use (thread-safe static).
const GfTables& gf();

inline uint8_t gf_mul(uint8_t a, uint8_t b) { return gf().mul[a][b]; }
inline uint8_t gf_inv(uint8_t a) { return gf().inv[a]; }

// Parity matrix C (m rows x k columns, row-major) of the systematic Cauchy code:
// C[i][j] = inv((k + i) XOR j). MDS for every k + m <= 256 (same bytes as ISA-L's
// gf_gen_cauchy1_matrix below its identity rows).
std::vector<uint8_t> cauchy_matrix(int k, int m);

// Inverts the n x n matrix `a` (row-major) into `out`. Returns false when singular.
bool invert_matrix(const uint8_t* a, int n, uint8_t* out);

// Whether every k x k submatrix of [I_k; C] is invertible, i.e. every square
// submatrix of C is nonsingular. Checks at most `max_dets` determinants.
// Returns 1 (MDS), 0 (not MDS: *bad_rows / *bad_cols name one singular square
// submatrix of C) or -1 (too many submatrices to check within max_dets).
int check_mds(const uint8_t* c, int k, int m, uint64_t max_dets, std::vector<int>* bad_rows,
              std::vector<int>* bad_cols);

// Rows that rebuild shards `wanted` (indices into [0, k+m)) from the k shards
// `survivors` (same indexing) of the code [I_k; C]: out is wanted.size() x k,
// row-major, and shard w = sum_j out[w][j] * shard survivors[j]. Returns false
// when the survivors' k x k submatrix is singular (the matrix is not MDS).
bool recovery_matrix(const uint8_t* c, int k, int m, const std::vector<int>& survivors,
                     const std::vector<int>& wanted, std::vector<uint8_t>* out);

// Split-nibble tables for PSHUFB kernels: out[0..15] = c * x for x in 0..15,
// out[16..31] = c * (x << 4). 32 bytes.
void nibble_table(uint8_t c, uint8_t* out);

// The 8x8 bit matrix A with gf2p8affineqb(x, A, 0) == c * x under 0x11d: byte
// 7 - i of A holds the bits b for which bit i of c * 2^b is set.
uint64_t gfni_matrix(uint8_t c);

}  // namespace ckpt_ec

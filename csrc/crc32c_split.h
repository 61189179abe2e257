// crc32c (Castagnoli, reflected 0x82F63B78) of one chunk computed as the combination
// of its pieces: each of `parts` threads takes a 4-byte-aligned slice of the chunk,
// the slices' crcs are joined with crc(A||B) = x^(8|B|) * crc(A) + crc(B) (mod P).
// The same code runs on the host (crc32c.cc's combine and shift tables use it; tests
// compare the split crc with crc32c.h) and on a GPU, where cuda_crc.cu checksums device
// tensors before they are copied to the host.
// Header-only, no CUDA headers needed by the host compiler.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define CKPT_HD __host__ __device__
#else
#define CKPT_HD
#endif

namespace ckpt_crc {

constexpr uint32_t kPoly = 0x82F63B78u;

// Slice-by-4 tables: t[s][b] = crc of byte b followed by s zero bytes (no pre/post inversion).
struct Tables {
  uint32_t t[4][256];
};

CKPT_HD constexpr Tables make_tables() {
  Tables x{};
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    x.t[0][i] = c;
  }
  for (int s = 1; s < 4; s++)
    for (uint32_t i = 0; i < 256; i++) x.t[s][i] = (x.t[s - 1][i] >> 8) ^ x.t[0][x.t[s - 1][i] & 0xff];
  return x;
}

// a * b modulo P, both polynomials in the reflected representation (bit 31 = x^0).
CKPT_HD constexpr uint32_t multmodp(uint32_t a, uint32_t b) {
  uint32_t p = 0;
  uint32_t m = 1u << 31;
  for (int i = 0; i < 32; i++, m >>= 1) {
    if (a & m) p ^= b;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// x2n[k] = x^(2^k) mod P.
struct Powers {
  uint32_t x2n[32];
};

CKPT_HD constexpr Powers make_powers() {
  Powers w{};
  uint32_t p = 1u << 30;  // x^1
  w.x2n[0] = p;
  for (int k = 1; k < 32; k++) w.x2n[k] = p = multmodp(p, p);
  return w;
}

// x^(8 * nbytes) mod P: the operator that shifts a crc past nbytes zero bytes.
CKPT_HD inline uint32_t shift_op(const Powers& w, uint64_t nbytes) {
  uint32_t p = 1u << 31;  // x^0
  for (unsigned k = 3; nbytes; nbytes >>= 1, k++)
    if (nbytes & 1) p = multmodp(w.x2n[k & 31], p);
  return p;
}

// crc of A||B from crc(A), crc(B) and the shift operator for |B| (shift_op).
CKPT_HD inline uint32_t combine(uint32_t crc_a, uint32_t crc_b, uint32_t op_b) {
  return multmodp(op_b, crc_a) ^ crc_b;
}

// Standard crc32c of n bytes (fresh: pre- and post-inverted). Reads 4-byte words once p is
// 4-byte aligned.
CKPT_HD inline uint32_t crc_bytes(const Tables& T, const uint8_t* p, uint64_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (; n && (reinterpret_cast<uintptr_t>(p) & 3); n--) c = (c >> 8) ^ T.t[0][(c ^ *p++) & 0xff];
  for (; n >= 4; n -= 4, p += 4) {
    uint32_t w = *reinterpret_cast<const uint32_t*>(p);  // little-endian (x86-64, CUDA)
    c ^= w;
    c = T.t[3][c & 0xff] ^ T.t[2][(c >> 8) & 0xff] ^ T.t[1][(c >> 16) & 0xff] ^ T.t[0][c >> 24];
  }
  for (; n; n--) c = (c >> 8) ^ T.t[0][(c ^ *p++) & 0xff];
  return ~c;
}

// Piece i of `parts` of a len-byte chunk: [begin, end). Pieces are 4-byte multiples (the
// last takes the rest); some trailing pieces are empty when len is small.
struct Piece {
  uint64_t begin, end;
};

CKPT_HD inline uint64_t piece_bytes(uint64_t len, unsigned parts) {
  return ((len + parts - 1) / parts + 3) & ~uint64_t(3);
}

CKPT_HD inline Piece piece_of(uint64_t len, unsigned parts, unsigned i) {
  uint64_t size = piece_bytes(len, parts);
  uint64_t b = size * i < len ? size * i : len;
  uint64_t e = b + size < len ? b + size : len;
  return {b, e};
}

// Joins the crcs of the pieces of a len-byte chunk (in order), as one thread does on a GPU.
CKPT_HD inline uint32_t join_pieces(const Powers& w, const uint32_t* piece_crcs, uint64_t len,
                                    unsigned parts) {
  const uint64_t size = piece_bytes(len, parts);
  const uint32_t full_op = shift_op(w, size);
  uint32_t crc = piece_crcs[0];
  for (unsigned i = 1; i < parts; i++) {
    Piece pc = piece_of(len, parts, i);
    if (pc.end == pc.begin) break;
    uint64_t n = pc.end - pc.begin;
    crc = combine(crc, piece_crcs[i], n == size ? full_op : shift_op(w, n));
  }
  return crc;
}

}  // namespace ckpt_crc

// See gf.h.
#include "gf.h"

#include <cstring>
#include <utility>

namespace ckpt_ec {
namespace {

struct Builder {
  GfTables t;
  Builder() {
    unsigned x = 1;
    for (int i = 0; i < 255; i++) {
      t.exp[i] = t.exp[i + 255] = static_cast<uint8_t>(x);
      t.log[x] = static_cast<uint8_t>(i);
      x <<= 1;
      if (x & 0x100) x ^= kPoly;
    }
    t.exp[510] = t.exp[511] = 0;  // never read: log sums are <= 508
    t.log[0] = 0;
    for (int a = 0; a < 256; a++)
      for (int b = 0; b < 256; b++)
        t.mul[a][b] = (a && b) ? t.exp[t.log[a] + t.log[b]] : 0;
    t.inv[0] = 0;
    for (int a = 1; a < 256; a++) t.inv[a] = t.exp[255 - t.log[a]];
  }
};

// Determinant of the s x s submatrix of c (row stride k) on rows/cols is nonzero.
bool nonsingular(const uint8_t* c, int k, const int* rows, const int* cols, int s) {
  uint8_t a[64 * 64];
  std::vector<uint8_t> big;
  uint8_t* m = a;
  if (s > 64) {
    big.resize(size_t(s) * s);
    m = big.data();
  }
  for (int i = 0; i < s; i++)
    for (int j = 0; j < s; j++) m[i * s + j] = c[rows[i] * k + cols[j]];
  const GfTables& g = gf();
  for (int col = 0; col < s; col++) {
    int piv = col;
    while (piv < s && m[piv * s + col] == 0) piv++;
    if (piv == s) return false;
    if (piv != col)
      for (int j = 0; j < s; j++) {
        uint8_t tmp = m[col * s + j];
        m[col * s + j] = m[piv * s + j];
        m[piv * s + j] = tmp;
      }
    const uint8_t* inv_row = g.mul[g.inv[m[col * s + col]]];
    for (int r = col + 1; r < s; r++) {
      uint8_t f = inv_row[m[r * s + col]];
      if (!f) continue;
      const uint8_t* fm = g.mul[f];
      for (int j = col; j < s; j++) m[r * s + j] ^= fm[m[col * s + j]];
    }
  }
  return true;
}

// Advances the s-subset `idx` of [0, n) in lexicographic order; false at the end.
bool next_subset(int* idx, int s, int n) {
  int i = s - 1;
  while (i >= 0 && idx[i] == n - s + i) i--;
  if (i < 0) return false;
  idx[i]++;
  for (int j = i + 1; j < s; j++) idx[j] = idx[j - 1] + 1;
  return true;
}

double binomial(int n, int r) {
  double v = 1;
  for (int i = 1; i <= r; i++) v = v * (n - r + i) / i;
  return v;
}

}  // namespace

const GfTables& gf() {
  static const Builder b;
  return b.t;
}

std::vector<uint8_t> cauchy_matrix(int k, int m) {
  std::vector<uint8_t> c(size_t(k) * m);
  for (int i = 0; i < m; i++)
    for (int j = 0; j < k; j++) c[size_t(i) * k + j] = gf_inv(static_cast<uint8_t>((k + i) ^ j));
  return c;
}

bool invert_matrix(const uint8_t* a, int n, uint8_t* out) {
  const GfTables& g = gf();
  std::vector<uint8_t> m(a, a + size_t(n) * n);
  std::memset(out, 0, size_t(n) * n);
  for (int i = 0; i < n; i++) out[i * n + i] = 1;
  for (int col = 0; col < n; col++) {
    int piv = col;
    while (piv < n && m[size_t(piv) * n + col] == 0) piv++;
    if (piv == n) return false;
    if (piv != col)
      for (int j = 0; j < n; j++) {
        std::swap(m[size_t(col) * n + j], m[size_t(piv) * n + j]);
        std::swap(out[size_t(col) * n + j], out[size_t(piv) * n + j]);
      }
    const uint8_t* scale = g.mul[g.inv[m[size_t(col) * n + col]]];
    for (int j = 0; j < n; j++) {
      m[size_t(col) * n + j] = scale[m[size_t(col) * n + j]];
      out[size_t(col) * n + j] = scale[out[size_t(col) * n + j]];
    }
    for (int r = 0; r < n; r++) {
      uint8_t f = m[size_t(r) * n + col];
      if (r == col || !f) continue;
      const uint8_t* fm = g.mul[f];
      for (int j = 0; j < n; j++) {
        m[size_t(r) * n + j] ^= fm[m[size_t(col) * n + j]];
        out[size_t(r) * n + j] ^= fm[out[size_t(col) * n + j]];
      }
    }
  }
  return true;
}

int check_mds(const uint8_t* c, int k, int m, uint64_t max_dets, std::vector<int>* bad_rows,
              std::vector<int>* bad_cols) {
  int smax = k < m ? k : m;
  double total = 0;
  for (int s = 1; s <= smax; s++) total += binomial(m, s) * binomial(k, s);
  if (total > double(max_dets)) {
    // Still catch the cheapest defect (a zero coefficient) before giving up.
    for (int i = 0; i < m; i++)
      for (int j = 0; j < k; j++)
        if (c[i * k + j] == 0) {
          *bad_rows = {i};
          *bad_cols = {j};
          return 0;
        }
    return -1;
  }
  std::vector<int> rows(smax), cols(smax);
  for (int s = 1; s <= smax; s++) {
    for (int i = 0; i < s; i++) rows[i] = i;
    do {
      for (int j = 0; j < s; j++) cols[j] = j;
      do {
        if (!nonsingular(c, k, rows.data(), cols.data(), s)) {
          bad_rows->assign(rows.begin(), rows.begin() + s);
          bad_cols->assign(cols.begin(), cols.begin() + s);
          return 0;
        }
      } while (next_subset(cols.data(), s, k));
    } while (next_subset(rows.data(), s, m));
  }
  return 1;
}

bool recovery_matrix(const uint8_t* c, int k, int m, const std::vector<int>& survivors,
                     const std::vector<int>& wanted, std::vector<uint8_t>* out) {
  const GfTables& g = gf();
  // B: the survivors' rows of [I_k; C]; D = B^-1 maps survivors to data shards.
  std::vector<uint8_t> b(size_t(k) * k, 0), d(size_t(k) * k);
  for (int r = 0; r < k; r++) {
    int s = survivors[r];
    if (s < k)
      b[size_t(r) * k + s] = 1;
    else
      std::memcpy(&b[size_t(r) * k], c + size_t(s - k) * k, k);
  }
  if (!invert_matrix(b.data(), k, d.data())) return false;
  out->assign(wanted.size() * size_t(k), 0);
  for (size_t w = 0; w < wanted.size(); w++) {
    uint8_t* row = out->data() + w * k;
    int idx = wanted[w];
    if (idx < k) {
      std::memcpy(row, &d[size_t(idx) * k], k);
      continue;
    }
    // Parity p = C[p] . data = C[p] . D . survivors.
    const uint8_t* cp = c + size_t(idx - k) * k;
    for (int i = 0; i < k; i++) {
      if (!cp[i]) continue;
      const uint8_t* fm = g.mul[cp[i]];
      for (int j = 0; j < k; j++) row[j] ^= fm[d[size_t(i) * k + j]];
    }
  }
  (void)m;
  return true;
}

void nibble_table(uint8_t c, uint8_t* out) {
  for (int x = 0; x < 16; x++) {
    out[x] = gf_mul(c, static_cast<uint8_t>(x));
    out[16 + x] = gf_mul(c, static_cast<uint8_t>(x << 4));
  }
}

uint64_t gfni_matrix(uint8_t c) {
  uint64_t a = 0;
  for (int b = 0; b < 8; b++) {
    uint8_t col = gf_mul(c, static_cast<uint8_t>(1u << b));  // c * 2^b
    for (int i = 0; i < 8; i++)
      if (col & (1u << i)) a |= uint64_t(1) << (8 * (7 - i) + b);
  }
  return a;
}

}  // namespace ckpt_ec

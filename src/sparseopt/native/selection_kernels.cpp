// One-pass kernels of a mask update (float32 scores, int64 flat indices), built on first use by
// sparseopt/native/__init__.py and called from sparseopt/native/selection.py. Why: in torch ops each of these is
// several full-size passes (compare to float, to bool, AND-NOT, nonzero; or a scalar index loop that measured
// ~15-20 ns per entry for index_fill_/index_select on 1 thread), and the mask update is a handful of such passes.
//
// Every kernel computes exactly what its torch counterpart in selection.py computes, in the same order (indices
// ascending), so the two paths give identical results. Output lists are written up to a capacity and counted
// beyond it: a caller that sees count > capacity reruns with a larger list or takes the torch path.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

inline float magnitude(float v) {  // |v| by clearing the sign bit, as torch.abs does for float (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0x7fffffffu;
  std::memcpy(&v, &u, 4);
  return v;
}

// The hits of one 32-entry block: bit j set when entry base + j qualifies; appended in ascending order.
inline int64_t append_hits(uint32_t bits, int64_t base, const float* x, bool absolute, int64_t count,
                           int64_t cap, int64_t* idx, float* val) {
  while (bits) {
    const int j = __builtin_ctz(bits);
    bits &= bits - 1;
    if (count < cap) {
      idx[count] = base + j;
      val[count] = absolute ? magnitude(x[base + j]) : x[base + j];
    }
    ++count;
  }
  return count;
}

// A float's order as an unsigned key: ascending keys are ascending floats, -0 and +0 one key (they compare equal).
inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (u == 0x80000000u) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float from_key(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The key of the entry at 0-based rank `rank` of x[0, n) in ascending order, by a radix select on order_key:
// three histogram passes (11, 11 and 10 bits), each counting the entries that match the digits found so far.
// False when x holds a NaN (no total order).
bool radix_select(const float* x, int64_t n, int64_t rank, uint32_t* found) {
  uint32_t prefix = 0, known = 0;          // the key bits found so far, and which
  static const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
  std::vector<int64_t> hist((1 << 11) + 1);  // the last bin counts the entries that do not match the prefix
  for (int level = 0; level < 3; ++level) {
    const int shift = shifts[level];
    const uint32_t digit_mask = (1u << widths[level]) - 1, miss = 1u << 11;
    std::fill(hist.begin(), hist.end(), 0);
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) {  // branch-free: a mispredicted branch per entry costs more than the count
      const uint32_t key = order_key(x[i]);
      nan |= x[i] != x[i];
      ++hist[(key & known) == prefix ? (key >> shift) & digit_mask : miss];
    }
    if (nan) return false;
    uint32_t d = 0;
    while (rank >= hist[d]) rank -= hist[d++];
    prefix |= d << shift;
    known |= digit_mask << shift;
  }
  *found = prefix;
  return true;
}

}  // namespace

extern "C" {

// The entries i with s_i > t and not excluded[i] (excluded may be null), s = |x| when absolute else x; NaN never
// qualifies (the comparison is false, as torch.gt). Writes their flat indices and scores (up to cap); returns how
// many qualify. torch: (s > t) & ~excluded, then nonzero and index_select.
int64_t sparseopt_above_f32(const float* x, const bool* excluded, int64_t n, float t, int absolute, int64_t cap,
                            int64_t* idx, float* val) {
  int64_t count = 0, i = 0;
#if defined(__AVX2__)
  const __m256 tv = _mm256_set1_ps(t);
  const __m256 sign_off = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i zero = _mm256_setzero_si256();
  for (; i + 32 <= n; i += 32) {
    uint32_t bits = 0;
    for (int q = 0; q < 4; ++q) {
      __m256 v = _mm256_loadu_ps(x + i + 8 * q);
      if (absolute) v = _mm256_and_ps(v, sign_off);
      bits |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, tv, _CMP_GT_OQ))) << (8 * q);
    }
    if (bits && excluded) {
      const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(excluded + i));
      bits &= static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(e, zero)));
    }
    count = append_hits(bits, i, x, absolute, count, cap, idx, val);
  }
#endif
  for (; i < n; i += 32) {
    const int64_t width = n - i < 32 ? n - i : 32;
    uint32_t bits = 0;
    for (int64_t j = 0; j < width; ++j) {
      const float s = absolute ? magnitude(x[i + j]) : x[i + j];
      bits |= static_cast<uint32_t>(s > t && !(excluded && excluded[i + j])) << j;
    }
    count = append_hits(bits, i, x, absolute, count, cap, idx, val);
  }
  return count;
}

// The grow selection's strided sample: out[j] = s(x[start + j * stride]), -inf where excluded, for the m1 entries
// of x, then also_val[start + j * stride] for the m2 of also_val; s = |.| when absolute. Returns how many of the
// first m1 are not excluded. torch: a strided slice, abs, masked_fill, a sum over the strided mask and a cat.
int64_t sparseopt_sample_f32(const float* x, const bool* excluded, int64_t m1, int64_t start, int64_t stride,
                             int absolute, const float* also_val, int64_t m2, float* out) {
  int64_t valid = 0;
  for (int64_t j = 0; j < m1; ++j) {
    const int64_t i = start + j * stride;
    const float v = absolute ? magnitude(x[i]) : x[i];
    out[j] = excluded[i] ? -std::numeric_limits<float>::infinity() : v;
    valid += !excluded[i];
  }
  for (int64_t j = 0; j < m2; ++j) out[m1 + j] = also_val[start + j * stride];
  return valid;
}

// The entries of arrays[0 .. n_arrays) (each n int64) where flags is false, moved to the front in place: the
// flagged positions below keep (the unflagged count), ascending, take the unflagged entries at or above keep,
// ascending. Returns keep. torch: selection._without_flagged (two nonzero, an index_select and index_copy_ each).
int64_t sparseopt_without_flagged(const bool* flags, int64_t n, int64_t** arrays, int n_arrays) {
  int64_t flagged = 0;
  for (int64_t i = 0; i < n; ++i) flagged += flags[i];
  const int64_t keep = n - flagged;
  int64_t mover = keep;
  for (int64_t hole = 0; hole < keep; ++hole) {
    if (!flags[hole]) continue;
    while (flags[mover]) ++mover;  // as many unflagged at or above keep as flagged below it
    for (int a = 0; a < n_arrays; ++a) arrays[a][hole] = arrays[a][mover];
    ++mover;
  }
  return keep;
}

// The bracket of a sampled top-k (selection.topk_indices): "sure" entries strictly beyond inner (x > inner when
// largest, x < inner otherwise) and "band" entries between the two thresholds (outer <= x <= inner, resp.
// inner <= x <= outer); NaN is in neither. Writes sure indices (up to sure_cap), band indices and scores (up to
// band_cap; each list has room for one entry more, a scratch slot); counts[0], counts[1] get the full counts.
// torch: two comparisons, an XOR and two nonzero.
void sparseopt_bracket_f32(const float* x, int64_t n, float inner, float outer, int largest, int64_t sure_cap,
                           int64_t* sure, int64_t band_cap, int64_t* band, float* band_val, int64_t* counts) {
  int64_t cs = 0, cb = 0;
  const float lo = largest ? outer : inner, hi = largest ? inner : outer;  // the band is [lo, hi]
  for (int64_t i = 0; i < n; ++i) {  // branch-free (about a third are sure): slot cap of each list is a sink
    const float v = x[i];
    const bool s = largest ? v > hi : v < lo;
    const bool b = v >= lo && v <= hi;
    sure[cs < sure_cap ? cs : sure_cap] = i;
    const int64_t at = cb < band_cap ? cb : band_cap;
    band[at] = i;
    band_val[at] = v;
    cs += s;
    cb += b;
  }
  counts[0] = cs;
  counts[1] = cb;
}


// The value at 0-based rank `rank` (0 <= rank < n) of x[0, n) in ascending order (-0 and +0 as +0), into *value;
// returns 0, or -1 when x holds a NaN. torch: kthvalue(x, rank + 1).
int sparseopt_kth_f32(const float* x, int64_t n, int64_t rank, float* value) {
  uint32_t key;
  if (!radix_select(x, n, rank, &key)) return -1;
  *value = from_key(key);
  return 0;
}

// Positions of the k best of x[0, n) (largest, or smallest when !largest; 0 < k <= n): every entry strictly better
// than the k-th best value v (ascending positions), then the entries equal to v (ascending) until there are k.
// v by radix_select, then one pass writes the positions. Returns 0, or -1 when x holds a NaN (no total order; the
// caller ranks on torch). torch: selection._pick (kthvalue, two comparisons, two nonzero).
int sparseopt_pick_f32(const float* x, int64_t n, int64_t k, int largest, int64_t* out) {
  uint32_t key;
  if (!radix_select(x, n, largest ? n - k : k - 1, &key)) return -1;
  const float v = from_key(key);
  int64_t c = 0;
  std::vector<int64_t> tied;
  for (int64_t i = 0; i < n; ++i) {
    const float s = x[i];
    out[c] = i;                        // c < k here: fewer than k entries are strictly better than v
    c += largest ? s > v : s < v;
    if (s == v) tied.push_back(i);
  }
  for (size_t j = 0; c < k; ++j) out[c++] = tied[j];  // at least k - c tied entries: v is the k-th best
  return 0;
}

// out[j] = x[idx[j]] (|x[idx[j]]| when absolute). torch: index_select (then abs_).
void sparseopt_gather_f32(const float* x, const int64_t* idx, int64_t m, int absolute, float* out) {
  if (absolute) {
    for (int64_t j = 0; j < m; ++j) out[j] = magnitude(x[idx[j]]);
  } else {
    for (int64_t j = 0; j < m; ++j) out[j] = x[idx[j]];
  }
}

// p[idx[j]] = value for 4-byte (float32) or 1-byte (bool) entries. torch: index_fill_.
void sparseopt_fill_f32(float* p, const int64_t* idx, int64_t m, float value) {
  for (int64_t j = 0; j < m; ++j) p[idx[j]] = value;
}

// packed[j] |= the bits of mask[8j, 8j + 8), least significant first (sparseopt.bits' packing). torch:
// PackedMasks.merge_ (a multiply per 8 entries, then a bitwise OR).
void sparseopt_or_bits(uint8_t* packed, const uint8_t* mask, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 32 <= n; i += 32) {  // bool bytes are 0/1: shifting bit 0 to bit 7 lets movemask read them
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(mask + i));
    const uint32_t bits = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(v, 7)));
    uint32_t old;
    std::memcpy(&old, packed + i / 8, 4);
    old |= bits;                   // little-endian: byte j of the word holds entries 8j..8j+7
    std::memcpy(packed + i / 8, &old, 4);
  }
#endif
  for (; i < n; ++i) packed[i >> 3] |= static_cast<uint8_t>((mask[i] & 1) << (i & 7));
}

void sparseopt_fill_u8(uint8_t* p, const int64_t* idx, int64_t m, uint8_t value) {
  for (int64_t j = 0; j < m; ++j) p[idx[j]] = value;
}

}

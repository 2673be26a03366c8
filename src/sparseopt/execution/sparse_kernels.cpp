// Hand-written CSR kernels of sparseopt.execution.kernels (float32, int32 indices), built on first use by
// sparseopt/execution/native.py. Why: on the AMD EPYC Zen4 development machine MKL's CSR x dense product (as torch
// calls it) ran 2.5-3x slower than these loops, and torch's sampled_addmm 1.3-1.5x slower (benchmarks/README).
//
// Both work on feature-major dense operands (each row of xt / dyt is one feature over the batch, contiguous):
//   spmm:  yt[r, :] = sum_k val[k] * xt[col[k], :]        (y.T = W @ x.T), rows r of the CSR matrix
//   sddmm: out[k]   = dot(dyt[r, :], xt[col[k], :])       (dy.T @ x at the non-zeros), row r of non-zero k
// spmm keeps a slice of four vectors of the output row in registers (64 columns with AVX-512) and walks the row's
// non-zeros once per slice: that measured faster than a whole 256-column row (register pressure) and than
// slicing the batch outside the row loop (the slices of xt rows break the hardware prefetcher).
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

// One vector is the target's widest float register: 16 floats with AVX-512, else 8 (AVX2), else 4. Wider generic
// vectors than the target has compile into spills: 64-byte vectors on an AVX2-only AMD EPYC ran these loops
// 2.3-2.8x slower than torch's kernels (benchmarks/README).
#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
typedef float v16 __attribute__((vector_size(VW * 4)));
typedef float v16u __attribute__((vector_size(VW * 4), aligned(4)));  // unaligned loads/stores

template <int NV>
inline void spmm_slice(const int32_t* __restrict col, const float* __restrict val, int64_t k0, int64_t k1,
                       const float* __restrict xt, int64_t ld, float* __restrict out) {
  v16 acc[NV];
#pragma GCC unroll 4
  for (int n = 0; n < NV; ++n) acc[n] = v16{};
  for (int64_t k = k0; k < k1; ++k) {
    const v16 v = v16{} + val[k];
    const v16u* x = reinterpret_cast<const v16u*>(xt + static_cast<int64_t>(col[k]) * ld);
#pragma GCC unroll 4
    for (int n = 0; n < NV; ++n) acc[n] += v * x[n];
  }
#pragma GCC unroll 4
  for (int n = 0; n < NV; ++n) reinterpret_cast<v16u*>(out)[n] = acc[n];
}

inline void spmm_tail(const int32_t* __restrict col, const float* __restrict val, int64_t k0, int64_t k1,
                      const float* __restrict xt, int64_t ld, float* __restrict out, int64_t width) {
  float acc[VW] = {};
  for (int64_t k = k0; k < k1; ++k) {
    const float v = val[k];
    const float* x = xt + static_cast<int64_t>(col[k]) * ld;
    for (int64_t j = 0; j < width; ++j) acc[j] += v * x[j];
  }
  for (int64_t j = 0; j < width; ++j) out[j] = acc[j];
}

void spmm_rows(const int32_t* crow, const int32_t* col, const float* val, const float* xt, float* yt, int64_t batch,
               int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t k0 = crow[r], k1 = crow[r + 1];
    float* y = yt + r * batch;
    int64_t c = 0;
    for (; c + 4 * VW <= batch; c += 4 * VW) spmm_slice<4>(col, val, k0, k1, xt + c, batch, y + c);
    switch ((batch - c) / VW) {
      case 3: spmm_slice<3>(col, val, k0, k1, xt + c, batch, y + c); c += 3 * VW; break;
      case 2: spmm_slice<2>(col, val, k0, k1, xt + c, batch, y + c); c += 2 * VW; break;
      case 1: spmm_slice<1>(col, val, k0, k1, xt + c, batch, y + c); c += VW; break;
      default: break;
    }
    if (c < batch) spmm_tail(col, val, k0, k1, xt + c, batch, y + c, batch - c);
  }
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  v16 acc[4] = {};
  int64_t j = 0;
  for (; j + 4 * VW <= n; j += 4 * VW) {
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m)
      acc[m] += reinterpret_cast<const v16u*>(a + j)[m] * reinterpret_cast<const v16u*>(b + j)[m];
  }
  for (; j + VW <= n; j += VW) acc[0] += *reinterpret_cast<const v16u*>(a + j) * *reinterpret_cast<const v16u*>(b + j);
  const v16 s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float t = 0;
  for (int m = 0; m < VW; ++m) t += s[m];
  for (; j < n; ++j) t += a[j] * b[j];
  return t;
}

void sddmm_rows(const int32_t* crow, const int32_t* col, const float* dyt, const float* xt, float* out,
                int64_t batch, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* a = dyt + r * batch;
    for (int64_t k = crow[r]; k < crow[r + 1]; ++k) out[k] = dot(a, xt + static_cast<int64_t>(col[k]) * batch, batch);
  }
}

// Rows [0, rows) cut into `threads` ranges of about equal non-zeros, one std::thread each (the calling thread
// takes the last); one thread when the work is too small to pay for starting threads.
template <typename F>
void parallel_rows(const int32_t* crow, int64_t rows, int64_t batch, int threads, F&& f) {
  const int64_t nnz = crow[rows];
  if (threads <= 1 || rows < 2 || nnz * batch < (int64_t{1} << 18)) { f(0, rows); return; }
  std::vector<int64_t> cut(threads + 1, rows);
  cut[0] = 0;
  for (int t = 1; t < threads; ++t)
    cut[t] = std::lower_bound(crow, crow + rows + 1, static_cast<int32_t>(nnz * t / threads)) - crow;
  std::vector<std::thread> pool;
  for (int t = 0; t + 1 < threads; ++t) pool.emplace_back([&f, &cut, t] { f(cut[t], std::max(cut[t], cut[t + 1])); });
  f(cut[threads - 1], rows);
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

void sparseopt_spmm_f32(const int32_t* crow, const int32_t* col, const float* val, const float* xt, float* yt,
                        int64_t rows, int64_t batch, int threads) {
  parallel_rows(crow, rows, batch, threads, [&](int64_t a, int64_t b) { spmm_rows(crow, col, val, xt, yt, batch, a, b); });
}

void sparseopt_sddmm_f32(const int32_t* crow, const int32_t* col, const float* dyt, const float* xt, float* out,
                         int64_t rows, int64_t batch, int threads) {
  parallel_rows(crow, rows, batch, threads, [&](int64_t a, int64_t b) { sddmm_rows(crow, col, dyt, xt, out, batch, a, b); });
}

}

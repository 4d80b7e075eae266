// rms_norm.cu -- CUDA kernels of trm's weightless post-norm RMSNorm (torch.ops.trm.rms_norm_*).
//
// What it computes (same as csrc/cpu/rms_norm.cpp; tensors addressed as [outer, N, inner] with
// per-tensor strides, csrc/common.h "Row plan"; row r = o * inner + i):
//   fwd:      s = x + residual (fp32), r = 1 / sqrt(mean(s^2) + eps), y = s * r; rstd[row] = r
//   fwd_only: the same y; no rstd store (the no-grad cycles)
//   bwd:      ds = r * (dy - y * mean(dy * y))
//   fp32 math with compensated (Kahan) sums, float32 / float16 / bfloat16 storage.
// Two kernels:
//   rows    (normalised axis innermost, inner == 1): a group of TPR threads (4..32, from N) per
//           row, 256 threads = 256/TPR rows per block, so narrow rows still fill the block;
//           butterfly shuffle reduction inside the group; the second pass re-reads (L1/L2 hit).
//   columns (other axes inside the normalised one: the mlp_t transposed view (B, D, L) of a
//           (B, L, D) tensor): one thread per row, neighbouring threads take neighbouring inner
//           indices, so every load of the N-loop is coalesced without a transpose copy.
//
// Test: python -m pytest tests/test_ops_cuda_build.py -q       (GPU: the `gpu`-marked tests)
// Time: python -m trm.ops.native --bench                         (on a CUDA machine: the CUDA rows)
//       ncu --kernel-name regex:rms_ python -m trm.ops.native --bench --device cuda

#include "common.cuh"

namespace trm_cuda {
namespace {

constexpr int kThreads = 256;

// Compensated (Kahan) fp32 sum: the error stays a few ulp however long the row (the columns
// kernel sums N = sequence length terms in one thread), at 3 extra flops per memory-bound term.
struct KahanSum {
  float sum = 0.f, c = 0.f;
  __device__ __forceinline__ void add(float v) {
    const float y = v - c;
    const float t = sum + y;
    c = (t - sum) - y;
    sum = t;
  }
  __device__ __forceinline__ float value() const { return sum - c; }
};

template <typename T, int TPR, bool HAS_RES>
__global__ void __launch_bounds__(kThreads)
    rms_fwd_rows(const T* __restrict__ x, Strides3 xs, const T* __restrict__ r, Strides3 rs, T* __restrict__ y,
                 Strides3 ys, float* __restrict__ rstd, int64_t rows, int64_t inner, int64_t N, float eps) {
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / TPR) + threadIdx.x / TPR;
  const bool valid = row < rows;  // no early return: every lane takes part in the shuffles
  const int64_t o = valid ? row / inner : 0;
  const int64_t i = valid ? row - o * inner : 0;
  const T* xr = x + o * xs.o + i * xs.i;
  const T* rr = HAS_RES ? r + o * rs.o + i * rs.i : nullptr;
  KahanSum acc;
  if (valid) {
#pragma unroll 4
    for (int64_t n = lane; n < N; n += TPR) {
      float v = load_f(xr + n * xs.n);
      if (HAS_RES) v += load_f(rr + n * rs.n);
      acc.add(v * v);
    }
  }
  float ss = acc.value();
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, offset, TPR);
  if (!valid) return;
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(N) + eps);
  if (rstd != nullptr && lane == 0) rstd[row] = inv;
  T* yr = y + o * ys.o + i * ys.i;
#pragma unroll 4
  for (int64_t n = lane; n < N; n += TPR) {
    float v = load_f(xr + n * xs.n);
    if (HAS_RES) v += load_f(rr + n * rs.n);
    store_f(yr + n * ys.n, v * inv);
  }
}

template <typename T, bool HAS_RES>
__global__ void __launch_bounds__(kThreads)
    rms_fwd_cols(const T* __restrict__ x, Strides3 xs, const T* __restrict__ r, Strides3 rs, T* __restrict__ y,
                 Strides3 ys, float* __restrict__ rstd, int64_t rows, int64_t inner, int64_t N, float eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  const int64_t o = row / inner;
  const int64_t i = row - o * inner;
  const T* xr = x + o * xs.o + i * xs.i;
  const T* rr = HAS_RES ? r + o * rs.o + i * rs.i : nullptr;
  KahanSum acc;
#pragma unroll 4
  for (int64_t n = 0; n < N; ++n) {
    float v = load_f(xr + n * xs.n);
    if (HAS_RES) v += load_f(rr + n * rs.n);
    acc.add(v * v);
  }
  const float ss = acc.value();
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(N) + eps);
  if (rstd != nullptr) rstd[row] = inv;
  T* yr = y + o * ys.o + i * ys.i;
#pragma unroll 4
  for (int64_t n = 0; n < N; ++n) {
    float v = load_f(xr + n * xs.n);
    if (HAS_RES) v += load_f(rr + n * rs.n);
    store_f(yr + n * ys.n, v * inv);
  }
}

template <typename T, int TPR>
__global__ void __launch_bounds__(kThreads)
    rms_bwd_rows(const T* __restrict__ dy, Strides3 dys, const T* __restrict__ y, Strides3 ys,
                 const float* __restrict__ rstd, T* __restrict__ dx, Strides3 dxs, int64_t rows, int64_t inner,
                 int64_t N) {
  const int lane = threadIdx.x % TPR;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / TPR) + threadIdx.x / TPR;
  const bool valid = row < rows;
  const int64_t o = valid ? row / inner : 0;
  const int64_t i = valid ? row - o * inner : 0;
  const T* dyr = dy + o * dys.o + i * dys.i;
  const T* yr = y + o * ys.o + i * ys.i;
  KahanSum acc;
  if (valid) {
#pragma unroll 4
    for (int64_t n = lane; n < N; n += TPR) acc.add(load_f(dyr + n * dys.n) * load_f(yr + n * ys.n));
  }
  float dot = acc.value();
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset, TPR);
  if (!valid) return;
  const float mean_dot = dot / static_cast<float>(N);
  const float inv = rstd[row];
  T* dxr = dx + o * dxs.o + i * dxs.i;
#pragma unroll 4
  for (int64_t n = lane; n < N; n += TPR) {
    store_f(dxr + n * dxs.n, inv * (load_f(dyr + n * dys.n) - load_f(yr + n * ys.n) * mean_dot));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_bwd_cols(const T* __restrict__ dy, Strides3 dys, const T* __restrict__ y, Strides3 ys,
                 const float* __restrict__ rstd, T* __restrict__ dx, Strides3 dxs, int64_t rows, int64_t inner,
                 int64_t N) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= rows) return;
  const int64_t o = row / inner;
  const int64_t i = row - o * inner;
  const T* dyr = dy + o * dys.o + i * dys.i;
  const T* yr = y + o * ys.o + i * ys.i;
  KahanSum acc;
#pragma unroll 4
  for (int64_t n = 0; n < N; ++n) acc.add(load_f(dyr + n * dys.n) * load_f(yr + n * ys.n));
  const float mean_dot = acc.value() / static_cast<float>(N);
  const float inv = rstd[row];
  T* dxr = dx + o * dxs.o + i * dxs.i;
#pragma unroll 4
  for (int64_t n = 0; n < N; ++n) {
    store_f(dxr + n * dxs.n, inv * (load_f(dyr + n * dys.n) - load_f(yr + n * ys.n) * mean_dot));
  }
}

// threads per row for the rows kernels: about 8+ elements per thread, 4..32 threads
inline int threads_per_row(int64_t N) { return N > 256 ? 32 : N > 64 ? 16 : N > 16 ? 8 : 4; }

template <typename T, bool HAS_RES>
void launch_fwd(const T* x, Strides3 xs, const T* r, Strides3 rs, T* y, Strides3 ys, float* rstd, RowShape sh,
                float eps, cudaStream_t stream) {
  const int64_t rows = sh.outer * sh.inner;
  if (sh.inner > 1) {
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, kThreads)));
    rms_fwd_cols<T, HAS_RES><<<grid, kThreads, 0, stream>>>(x, xs, r, rs, y, ys, rstd, rows, sh.inner, sh.n, eps);
    return;
  }
  const int tpr = threads_per_row(sh.n);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kThreads / tpr)));
#define TRM_RMS_FWD_ROWS(TPR) \
  rms_fwd_rows<T, TPR, HAS_RES><<<grid, kThreads, 0, stream>>>(x, xs, r, rs, y, ys, rstd, rows, sh.inner, sh.n, eps)
  switch (tpr) {
    case 32: TRM_RMS_FWD_ROWS(32); break;
    case 16: TRM_RMS_FWD_ROWS(16); break;
    case 8: TRM_RMS_FWD_ROWS(8); break;
    default: TRM_RMS_FWD_ROWS(4); break;
  }
#undef TRM_RMS_FWD_ROWS
}

template <typename T>
void launch_bwd(const T* dy, Strides3 dys, const T* y, Strides3 ys, const float* rstd, T* dx, Strides3 dxs,
                RowShape sh, cudaStream_t stream) {
  const int64_t rows = sh.outer * sh.inner;
  if (sh.inner > 1) {
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, kThreads)));
    rms_bwd_cols<T><<<grid, kThreads, 0, stream>>>(dy, dys, y, ys, rstd, dx, dxs, rows, sh.inner, sh.n);
    return;
  }
  const int tpr = threads_per_row(sh.n);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows, kThreads / tpr)));
#define TRM_RMS_BWD_ROWS(TPR) \
  rms_bwd_rows<T, TPR><<<grid, kThreads, 0, stream>>>(dy, dys, y, ys, rstd, dx, dxs, rows, sh.inner, sh.n)
  switch (tpr) {
    case 32: TRM_RMS_BWD_ROWS(32); break;
    case 16: TRM_RMS_BWD_ROWS(16); break;
    case 8: TRM_RMS_BWD_ROWS(8); break;
    default: TRM_RMS_BWD_ROWS(4); break;
  }
#undef TRM_RMS_BWD_ROWS
}

}  // namespace

cudaError_t rms_norm_fwd(DType dtype, const void* x, Strides3 xs, const void* residual, Strides3 rs, void* y,
                         Strides3 ys, float* rstd, RowShape shape, float eps, cudaStream_t stream) {
  if (shape.outer * shape.inner == 0 || shape.n == 0) return cudaSuccess;
  TRM_CUDA_DISPATCH(dtype, T, {
    if (residual != nullptr) {
      launch_fwd<T, true>(static_cast<const T*>(x), xs, static_cast<const T*>(residual), rs, static_cast<T*>(y), ys,
                          rstd, shape, eps, stream);
    } else {
      launch_fwd<T, false>(static_cast<const T*>(x), xs, nullptr, rs, static_cast<T*>(y), ys, rstd, shape, eps,
                           stream);
    }
  });
  return cudaGetLastError();
}

cudaError_t rms_norm_bwd(DType dtype, const void* dy, Strides3 dys, const void* y, Strides3 ys, const float* rstd,
                         void* dx, Strides3 dxs, RowShape shape, cudaStream_t stream) {
  if (shape.outer * shape.inner == 0 || shape.n == 0) return cudaSuccess;
  TRM_CUDA_DISPATCH(dtype, T, {
    launch_bwd<T>(static_cast<const T*>(dy), dys, static_cast<const T*>(y), ys, rstd, static_cast<T*>(dx), dxs,
                  shape, stream);
  });
  return cudaGetLastError();
}

}  // namespace trm_cuda

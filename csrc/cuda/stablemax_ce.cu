// stablemax_ce.cu -- CUDA kernels of trm's stablemax cross-entropy (torch.ops.trm.stablemax_ce_*).
//
// What it computes (same as csrc/cpu/stablemax_ce.cpp, float64 math per row):
//   s(v) = v + 1 (v >= 0) else 1 / (1 - v);  S = sum_j s(v_j);  y = label
//   fwd: loss = log1p(sum_{j != y} s_j / s_y) = -log(s_y / S), stored float32; 0 if y == ignore_index
//   bwd: d/dv_j = grad_loss * (s'(v_j) / S - [j == y] s'(v_y) / s_y),  s'(v) = 1 (v >= 0) else s(v)^2
//   The vocabulary is 6-12 wide in TRM, so one thread owns one row and a 256-thread block packs
//   256 rows (its 256 * V contiguous logits are read through L1). float64 keeps the loss within
//   1e-6 relative of the float64 formula; it is a handful of flops per byte here.
//   A label out of [0, V) that is not ignore_index is never read through: its loss and
//   gradients are NaN (the Python wrapper raises first in eager mode).
//
// Test: python -m pytest tests/test_ops_cuda_build.py -q -k stablemax   (GPU: `gpu`-marked tests)
// Time: python -m trm.ops.native --bench --device cuda

#include "common.cuh"

namespace trm_cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ double smax_s(double v) { return v >= 0.0 ? v + 1.0 : 1.0 / (1.0 - v); }

template <typename T, typename L>
__global__ void __launch_bounds__(kThreads)
    smce_fwd_kernel(const T* __restrict__ logits, const L* __restrict__ labels, float* __restrict__ loss,
                    int64_t rows, int64_t V, int64_t ignore_index) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < rows; row += step) {
    const int64_t y = static_cast<int64_t>(labels[row]);
    if (y == ignore_index) {
      loss[row] = 0.f;
      continue;
    }
    if (y < 0 || y >= V) {
      loss[row] = __int_as_float(0x7fc00000);  // NaN
      continue;
    }
    const T* v = logits + row * V;
    double others = 0.0, s_y = 1.0;
    for (int64_t j = 0; j < V; ++j) {
      const double s = smax_s(static_cast<double>(load_f(v + j)));
      if (j == y) {
        s_y = s;
      } else {
        others += s;
      }
    }
    loss[row] = static_cast<float>(log1p(others / s_y));
  }
}

template <typename T, typename L>
__global__ void __launch_bounds__(kThreads)
    smce_bwd_kernel(const float* __restrict__ grad_loss, const T* __restrict__ logits, const L* __restrict__ labels,
                    T* __restrict__ grad, int64_t rows, int64_t V, int64_t ignore_index) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < rows; row += step) {
    const int64_t y = static_cast<int64_t>(labels[row]);
    const T* v = logits + row * V;
    T* g = grad + row * V;
    if (y == ignore_index || y < 0 || y >= V) {
      const float fill = y == ignore_index ? 0.f : __int_as_float(0x7fc00000);
      for (int64_t j = 0; j < V; ++j) store_f(g + j, fill);
      continue;
    }
    double others = 0.0, s_y = 1.0;
    for (int64_t j = 0; j < V; ++j) {
      const double s = smax_s(static_cast<double>(load_f(v + j)));
      if (j == y) {
        s_y = s;
      } else {
        others += s;
      }
    }
    const double inv_total = 1.0 / (others + s_y);
    const double gl = static_cast<double>(grad_loss[row]);
    for (int64_t j = 0; j < V; ++j) {
      const double vj = static_cast<double>(load_f(v + j));
      double ds, ds_over_s;  // s'(v_j), s'(v_j) / s(v_j)
      if (vj >= 0.0) {
        ds = 1.0;
        ds_over_s = 1.0 / (vj + 1.0);
      } else {
        const double s = 1.0 / (1.0 - vj);
        ds = s * s;
        ds_over_s = s;
      }
      const double d = j == y ? -ds_over_s * others * inv_total : ds * inv_total;
      store_f(g + j, static_cast<float>(gl * d));
    }
  }
}

inline dim3 grid_for(int64_t rows) {
  const int64_t blocks = ceil_div(rows, kThreads);
  return dim3(static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20)));
}

}  // namespace

cudaError_t stablemax_ce_fwd(DType dtype, const void* logits, const void* labels, bool labels_int64, float* loss,
                             int64_t rows, int64_t V, int64_t ignore_index, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  TRM_CUDA_DISPATCH(dtype, T, {
    if (labels_int64) {
      smce_fwd_kernel<T, int64_t><<<grid_for(rows), kThreads, 0, stream>>>(
          static_cast<const T*>(logits), static_cast<const int64_t*>(labels), loss, rows, V, ignore_index);
    } else {
      smce_fwd_kernel<T, int32_t><<<grid_for(rows), kThreads, 0, stream>>>(
          static_cast<const T*>(logits), static_cast<const int32_t*>(labels), loss, rows, V, ignore_index);
    }
  });
  return cudaGetLastError();
}

cudaError_t stablemax_ce_bwd(DType dtype, const float* grad_loss, const void* logits, const void* labels,
                             bool labels_int64, void* grad_logits, int64_t rows, int64_t V, int64_t ignore_index,
                             cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  TRM_CUDA_DISPATCH(dtype, T, {
    if (labels_int64) {
      smce_bwd_kernel<T, int64_t><<<grid_for(rows), kThreads, 0, stream>>>(
          grad_loss, static_cast<const T*>(logits), static_cast<const int64_t*>(labels), static_cast<T*>(grad_logits),
          rows, V, ignore_index);
    } else {
      smce_bwd_kernel<T, int32_t><<<grid_for(rows), kThreads, 0, stream>>>(
          grad_loss, static_cast<const T*>(logits), static_cast<const int32_t*>(labels), static_cast<T*>(grad_logits),
          rows, V, ignore_index);
    }
  });
  return cudaGetLastError();
}

}  // namespace trm_cuda

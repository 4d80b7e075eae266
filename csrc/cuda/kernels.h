// kernels.h -- the plain-C++ interface between the torch bindings (ops_cuda.cpp, compiled by the
// host compiler with ATen) and the device code (*.cu, compiled by nvcc WITHOUT any torch header,
// which keeps each .cu file a few seconds to build). Launchers take raw pointers, strides and the
// stream, launch, and return cudaGetLastError(); they never allocate or synchronise.
// Test: python -m pytest tests/test_ops_cuda_build.py -q  (registration; numerics under the `gpu` marker)
// Time: python -m trm.ops.native --bench --device cuda
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace trm_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct Strides3 {  // a tensor seen as [outer, N, inner] (csrc/common.h, "Row plan")
  int64_t o, n, i;
};

struct RowShape {
  int64_t outer, n, inner;
};

// rstd == nullptr: the forward-only variant (nothing saved). residual may be nullptr.
cudaError_t rms_norm_fwd(DType dtype, const void* x, Strides3 xs, const void* residual, Strides3 rs, void* y,
                         Strides3 ys, float* rstd, RowShape shape, float eps, cudaStream_t stream);
cudaError_t rms_norm_bwd(DType dtype, const void* dy, Strides3 dys, const void* y, Strides3 ys, const float* rstd,
                         void* dx, Strides3 dxs, RowShape shape, cudaStream_t stream);

// gate_up: contiguous [rows, 2H]; out / grad_out: contiguous [rows, H]; grad_gate_up: [rows, 2H]
cudaError_t swiglu_fwd(DType dtype, const void* gate_up, void* out, int64_t rows, int64_t H, cudaStream_t stream);
cudaError_t swiglu_bwd(DType dtype, const void* grad_out, const void* gate_up, void* grad_gate_up, int64_t rows,
                       int64_t H, cudaStream_t stream);

// logits: contiguous [rows, V]; labels: contiguous [rows] int64 (labels_int64) or int32.
// Out-of-range labels (not ignore_index) give NaN loss / gradients and are never read from.
cudaError_t stablemax_ce_fwd(DType dtype, const void* logits, const void* labels, bool labels_int64, float* loss,
                             int64_t rows, int64_t V, int64_t ignore_index, cudaStream_t stream);
cudaError_t stablemax_ce_bwd(DType dtype, const float* grad_loss, const void* logits, const void* labels,
                             bool labels_int64, void* grad_logits, int64_t rows, int64_t V, int64_t ignore_index,
                             cudaStream_t stream);

struct AdamTensor {  // float32, contiguous, n elements each
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t n;
};

struct AdamScalars {
  int apply_decay;     // weight_decay != 0
  float decay_factor;  // 1 - lr * weight_decay
  float w1, w2;        // 1 - beta1, 1 - beta2
  float bc2_sqrt;      // sqrt(1 - beta2^t)
  float step_size;     // lr / (1 - beta1^t)
};

cudaError_t adam_atan2(const AdamTensor* tensors, int64_t count, AdamScalars scalars, cudaStream_t stream);

}  // namespace trm_cuda

// swiglu.cu -- CUDA kernels of trm's SwiGLU activation (torch.ops.trm.swiglu_*).
//
// What it computes (same as csrc/cpu/swiglu.cpp; gate_up contiguous [rows, 2H], gate first):
//   fwd: out = silu(g) * u,  silu(g) = g * sigmoid(g)                      fp32 math
//   bwd: dg = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))),  du = dout * silu(g)
//   One thread per output element (grid-stride loop); loads of gate and up are each coalesced.
//
// Test: python -m pytest tests/test_ops_cuda_build.py -q -k swiglu   (GPU: `gpu`-marked tests)
// Time: python -m trm.ops.native --bench --device cuda

#include "common.cuh"

namespace trm_cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_kernel(const T* __restrict__ gate_up, T* __restrict__ out, int64_t rows, int64_t H) {
  const int64_t total = rows * H;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t row = idx / H;
    const int64_t j = idx - row * H;
    const T* g = gate_up + row * 2 * H + j;
    const float gv = load_f(g);
    store_f(out + idx, gv * sigmoid(gv) * load_f(g + H));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ gate_up, T* __restrict__ grad,
                      int64_t rows, int64_t H) {
  const int64_t total = rows * H;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total; idx += step) {
    const int64_t row = idx / H;
    const int64_t j = idx - row * H;
    const int64_t at = row * 2 * H + j;
    const float gv = load_f(gate_up + at);
    const float uv = load_f(gate_up + at + H);
    const float dv = load_f(grad_out + idx);
    const float sig = sigmoid(gv);
    store_f(grad + at, dv * uv * sig * (1.0f + gv * (1.0f - sig)));
    store_f(grad + at + H, dv * gv * sig);
  }
}

inline dim3 grid_for(int64_t total) {
  const int64_t blocks = ceil_div(total, kThreads);
  return dim3(static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20)));  // grid-stride beyond
}

}  // namespace

cudaError_t swiglu_fwd(DType dtype, const void* gate_up, void* out, int64_t rows, int64_t H, cudaStream_t stream) {
  if (rows * H == 0) return cudaSuccess;
  TRM_CUDA_DISPATCH(dtype, T, {
    swiglu_fwd_kernel<T><<<grid_for(rows * H), kThreads, 0, stream>>>(static_cast<const T*>(gate_up),
                                                                      static_cast<T*>(out), rows, H);
  });
  return cudaGetLastError();
}

cudaError_t swiglu_bwd(DType dtype, const void* grad_out, const void* gate_up, void* grad_gate_up, int64_t rows,
                       int64_t H, cudaStream_t stream) {
  if (rows * H == 0) return cudaSuccess;
  TRM_CUDA_DISPATCH(dtype, T, {
    swiglu_bwd_kernel<T><<<grid_for(rows * H), kThreads, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(gate_up), static_cast<T*>(grad_gate_up), rows, H);
  });
  return cudaGetLastError();
}

}  // namespace trm_cuda

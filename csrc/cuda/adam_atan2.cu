// adam_atan2.cu -- CUDA kernel of trm's fused multi-tensor AdamATan2 step (torch.ops.trm.adam_atan2).
//
// What it computes, in place, elementwise over every tensor of the lists (float32, contiguous),
// t = step >= 1 (same as csrc/cpu/adam_atan2.cpp and trm.ops.reference.adam_atan2):
//   p *= 1 - lr * wd;  m = lerp(m, g, 1 - beta1);  v = lerp(v, g * g, 1 - beta2)
//   p -= lr / (1 - beta1^t) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))
// Multi-tensor: up to kMaxTensors tensor addresses and kMaxBlocks (tensor, chunk) block
// assignments travel BY VALUE in the kernel's parameter block (< 4 KiB), so a whole optimizer
// step is a few launches, no device-side pointer table, nothing to copy host->device, and it
// can be captured in a CUDA graph. Each block updates one kChunk-element chunk of one tensor;
// one pass over p, g, m, v (16 B read + 12 B written per element).
//
// Test: python -m pytest tests/test_ops_cuda_build.py -q -k adam   (GPU: `gpu`-marked tests)
// Time: python -m trm.ops.native --bench --device cuda

#include "common.cuh"

namespace trm_cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kMaxTensors = 32;
constexpr int kMaxBlocks = 256;
constexpr int64_t kChunk = 16384;

struct AdamLaunch {
  float* param[kMaxTensors];
  const float* grad[kMaxTensors];
  float* exp_avg[kMaxTensors];
  float* exp_avg_sq[kMaxTensors];
  int64_t n[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(AdamLaunch) + sizeof(AdamScalars) < 4000, "kernel parameters must stay under 4 KiB");

__device__ __forceinline__ float lerp_torch(float a, float b, float w) {
  return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

__global__ void __launch_bounds__(kThreads) adam_atan2_kernel(AdamLaunch L, AdamScalars s) {
  const int t = L.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(L.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(L.n[t], begin + kChunk);
  float* __restrict__ p = L.param[t];
  const float* __restrict__ g = L.grad[t];
  float* __restrict__ m = L.exp_avg[t];
  float* __restrict__ v = L.exp_avg_sq[t];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float pi = p[i];
    if (s.apply_decay) pi *= s.decay_factor;
    const float gi = g[i];
    const float mi = lerp_torch(m[i], gi, s.w1);
    const float vi = lerp_torch(v[i], gi * gi, s.w2);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - atan2f(mi, sqrtf(vi) / s.bc2_sqrt) * s.step_size;
  }
}

}  // namespace

cudaError_t adam_atan2(const AdamTensor* tensors, int64_t count, AdamScalars scalars, cudaStream_t stream) {
  AdamLaunch L;
  int slots = 0, blocks = 0;
  auto flush = [&]() {
    if (blocks > 0) adam_atan2_kernel<<<blocks, kThreads, 0, stream>>>(L, scalars);
    blocks = 0;
  };
  for (int64_t k = 0; k < count; ++k) {
    const AdamTensor& T = tensors[k];
    if (T.n == 0) continue;
    if (slots == kMaxTensors) {
      flush();
      slots = 0;
    }
    L.param[slots] = T.param;
    L.grad[slots] = T.grad;
    L.exp_avg[slots] = T.exp_avg;
    L.exp_avg_sq[slots] = T.exp_avg_sq;
    L.n[slots] = T.n;
    const int64_t chunks = ceil_div(T.n, kChunk);
    for (int64_t c = 0; c < chunks; ++c) {
      if (blocks == kMaxBlocks) {
        flush();
        if (slots != 0) {  // the tensor being chunked moves to slot 0 of the next launch
          L.param[0] = L.param[slots];
          L.grad[0] = L.grad[slots];
          L.exp_avg[0] = L.exp_avg[slots];
          L.exp_avg_sq[0] = L.exp_avg_sq[slots];
          L.n[0] = L.n[slots];
          slots = 0;
        }
      }
      L.block_tensor[blocks] = static_cast<unsigned char>(slots);
      L.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
    }
    ++slots;
  }
  flush();
  return cudaGetLastError();  // the first failed launch, if any (errors stay until read)
}

}  // namespace trm_cuda

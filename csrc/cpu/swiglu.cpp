// swiglu.cpp -- C++ CPU kernels of trm's SwiGLU activation (torch.ops.trm.swiglu_*).
//
// What it computes (gate_up [..., 2H], gate = first half, up = second half; fp32 math inside):
//   swiglu_fwd(gate_up) -> out [..., H] = silu(gate) * up,  silu(g) = g * sigmoid(g)
//   swiglu_bwd(grad_out, gate_up) -> [..., 2H]:
//       d gate = grad_out * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//       d up   = grad_out * silu(g)
//   Outputs are contiguous; a non-contiguous gate_up is copied once (contiguous() is free for the
//   model's packed linear output). The backward writes d gate and d up into ONE [..., 2H] buffer
//   (no chunk/cat copy on the autograd side).
//
// float32 runs vectorised loops: sigmoid(g) = 1 / (1 + exp(-g)) with a branch-free exp (Cody-Waite
// range reduction, Cephes' degree-6 polynomial, 2^n from the exponent bits; about 1 ulp), which
// the compiler vectorises. The loops are built for AVX-512, AVX2 and baseline x86-64 and the
// loader picks the best the CPU has (target_clones, GNU/Linux only; elsewhere the baseline build), so one
// binary runs on every x86-64 CPU; GCC 12
// vectorises the AVX-512 build (check: g++ -O3 -fopt-info-vec), the others run scalar.
// bfloat16 runs the float32 loops themselves, over float blocks of 256: a row's bits widen to float
// by a 16-bit shift, the float loop runs, and the result narrows back rounding to nearest even (NaN
// kept a quiet NaN), as c10::BFloat16 does, branch-free (4x faster than the scalar loop it replaces).
// float16 uses the scalar loop (std::exp).
//
// Test: python -m pytest tests/test_ops_cpu.py -q -k swiglu
// Time: python -m trm.ops.native --bench

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"

// The row loops live outside the anonymous namespace: target_clones needs external linkage (an
// ifunc resolver picks the clone at load time).
namespace trm::swiglu_loops {

// target_clones needs an ifunc resolver: GNU/Linux's loader (glibc) has one; macOS, Windows and
// musl do not, and there the loops build once for the baseline ISA.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__)
#define TRM_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TRM_VECTOR_CLONES
#endif

// e^x for float, branch-free so that loops over it vectorise. x is clamped to [-87.3, 88.3]
// (e^x then stays a normal float: below, sigmoid is 0 to float precision anyway; above, 1).
inline float exp_vectorisable(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds x / ln 2 to nearest
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;   // x - n ln 2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;                       // n sits in shifted's low bits: 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return er * scale;
}

TRM_VECTOR_CLONES
void swiglu_fwd_rows_f32(const float* __restrict in, float* __restrict out, int64_t rows, int64_t H) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict g = in + r * 2 * H;
    const float* __restrict u = g + H;
    float* __restrict o = out + r * H;
    for (int64_t j = 0; j < H; ++j) {
      const float gv = g[j];
      o[j] = gv / (1.0f + exp_vectorisable(-gv)) * u[j];
    }
  }
}

TRM_VECTOR_CLONES
void swiglu_bwd_rows_f32(const float* __restrict in, const float* __restrict dout, float* __restrict grad,
                         int64_t rows, int64_t H) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict g = in + r * 2 * H;
    const float* __restrict u = g + H;
    const float* __restrict d = dout + r * H;
    float* __restrict dg = grad + r * 2 * H;
    float* __restrict du = dg + H;
    for (int64_t j = 0; j < H; ++j) {
      const float gv = g[j];
      const float sig = 1.0f / (1.0f + exp_vectorisable(-gv));
      const float dsilu = d[j] * sig;
      dg[j] = dsilu * u[j] * (1.0f + gv * (1.0f - sig));
      du[j] = dsilu * gv;
    }
  }
}

// bfloat16 <-> float on the bits (c10::BFloat16's conversions, written so that loops vectorise).
inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;   // round to nearest even
  const uint32_t nan = static_cast<uint32_t>(-static_cast<int32_t>((bits & 0x7FFFFFFFu) > 0x7F800000u));
  return static_cast<uint16_t>((rounded & ~nan) | (0x7FC0u & nan));
}

constexpr int64_t kBlock = 256;   // bfloat16 rows go through float blocks of this many elements

TRM_VECTOR_CLONES
void widen_bf16(const uint16_t* __restrict in, float* __restrict out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = bf16_to_float(in[j]);
}

TRM_VECTOR_CLONES
void narrow_bf16(const float* __restrict in, uint16_t* __restrict out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = float_to_bf16(in[j]);
}

// A block of n gate and n up values, widened into one float buffer [gate | up], is a one-row input
// of width n of the float32 loops above, so bfloat16 runs exactly their math.
void swiglu_fwd_rows_bf16(const uint16_t* in, uint16_t* out, int64_t rows, int64_t H) {
  float gu[2 * kBlock], o[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < H; j += kBlock) {
      const int64_t n = std::min(kBlock, H - j);
      widen_bf16(in + r * 2 * H + j, gu, n);
      widen_bf16(in + r * 2 * H + H + j, gu + n, n);
      swiglu_fwd_rows_f32(gu, o, 1, n);
      narrow_bf16(o, out + r * H + j, n);
    }
  }
}

void swiglu_bwd_rows_bf16(const uint16_t* in, const uint16_t* dout, uint16_t* grad, int64_t rows, int64_t H) {
  float gu[2 * kBlock], d[kBlock], g[2 * kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < H; j += kBlock) {
      const int64_t n = std::min(kBlock, H - j);
      widen_bf16(in + r * 2 * H + j, gu, n);
      widen_bf16(in + r * 2 * H + H + j, gu + n, n);
      widen_bf16(dout + r * H + j, d, n);
      swiglu_bwd_rows_f32(gu, d, g, 1, n);
      narrow_bf16(g, grad + r * 2 * H + j, n);
      narrow_bf16(g + n, grad + r * 2 * H + H + j, n);
    }
  }
}

}  // namespace trm::swiglu_loops

namespace {

using trm::swiglu_loops::swiglu_bwd_rows_bf16;
using trm::swiglu_loops::swiglu_bwd_rows_f32;
using trm::swiglu_loops::swiglu_fwd_rows_bf16;
using trm::swiglu_loops::swiglu_fwd_rows_f32;


constexpr int64_t kGrainElems = 16384;

inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(-g)); }

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate_up) {
  const char* op = "swiglu_fwd";
  trm::check_device(gate_up, c10::DeviceType::CPU, op, "gate_up");
  trm::check_float(gate_up, op, "gate_up");
  const int64_t H = trm::swiglu_half_width(gate_up, op);
  const at::Tensor gu = gate_up.contiguous();
  at::Tensor out = at::empty(trm::with_last(gu.sizes(), H), gu.options());
  const int64_t rows = H == 0 ? 0 : out.numel() / H;
  if (rows == 0) return out;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / H);
  if (gu.scalar_type() == at::kFloat) {
    const float* in = gu.const_data_ptr<float>();
    float* o = out.mutable_data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      swiglu_fwd_rows_f32(in + begin * 2 * H, o + begin * H, end - begin, H);
    });
    return out;
  }
  if (gu.scalar_type() == at::kBFloat16) {
    const auto* in = reinterpret_cast<const uint16_t*>(gu.const_data_ptr<at::BFloat16>());
    auto* o = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::BFloat16>());
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      swiglu_fwd_rows_bf16(in + begin * 2 * H, o + begin * H, end - begin, H);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kHalf, gu.scalar_type(), "trm_swiglu_fwd_cpu", [&] {
    const scalar_t* in = gu.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = in + r * 2 * H;
        const scalar_t* u = g + H;
        scalar_t* orow = o + r * H;
        for (int64_t j = 0; j < H; ++j) {
          const float gv = static_cast<float>(g[j]);
          orow[j] = static_cast<scalar_t>(gv * sigmoid(gv) * static_cast<float>(u[j]));
        }
      }
    });
  });
  return out;
}

at::Tensor swiglu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& gate_up) {
  const char* op = "swiglu_bwd";
  trm::check_device(gate_up, c10::DeviceType::CPU, op, "gate_up");
  trm::check_same_device(gate_up, grad_out, op, "grad_out");
  trm::check_float(gate_up, op, "gate_up");
  const int64_t H = trm::swiglu_half_width(gate_up, op);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(trm::with_last(gate_up.sizes(), H)), "trm::", op, ": grad_out ",
              grad_out.sizes(), " must have gate_up's shape with the last dim halved (gate_up ", gate_up.sizes(), ")");
  const at::Tensor gu = gate_up.contiguous();
  const at::Tensor dout = grad_out.to(gu.scalar_type()).contiguous();
  at::Tensor grad = at::empty(gu.sizes(), gu.options());
  const int64_t rows = H == 0 ? 0 : dout.numel() / H;
  if (rows == 0) return grad;
  if (gu.scalar_type() == at::kFloat) {
    const float* in = gu.const_data_ptr<float>();
    const float* d = dout.const_data_ptr<float>();
    float* gr = grad.mutable_data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / H), [&](int64_t begin, int64_t end) {
      swiglu_bwd_rows_f32(in + begin * 2 * H, d + begin * H, gr + begin * 2 * H, end - begin, H);
    });
    return grad;
  }
  if (gu.scalar_type() == at::kBFloat16) {
    const auto* in = reinterpret_cast<const uint16_t*>(gu.const_data_ptr<at::BFloat16>());
    const auto* d = reinterpret_cast<const uint16_t*>(dout.const_data_ptr<at::BFloat16>());
    auto* gr = reinterpret_cast<uint16_t*>(grad.mutable_data_ptr<at::BFloat16>());
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / H), [&](int64_t begin, int64_t end) {
      swiglu_bwd_rows_bf16(in + begin * 2 * H, d + begin * H, gr + begin * 2 * H, end - begin, H);
    });
    return grad;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kHalf, gu.scalar_type(), "trm_swiglu_bwd_cpu", [&] {
    const scalar_t* in = gu.const_data_ptr<scalar_t>();
    const scalar_t* d = dout.const_data_ptr<scalar_t>();
    scalar_t* gr = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = in + r * 2 * H;
        const scalar_t* u = g + H;
        const scalar_t* drow = d + r * H;
        scalar_t* dg = gr + r * 2 * H;
        scalar_t* du = dg + H;
        for (int64_t j = 0; j < H; ++j) {
          const float gv = static_cast<float>(g[j]);
          const float uv = static_cast<float>(u[j]);
          const float dv = static_cast<float>(drow[j]);
          const float sig = sigmoid(gv);
          dg[j] = static_cast<scalar_t>(dv * uv * sig * (1.0f + gv * (1.0f - sig)));
          du[j] = static_cast<scalar_t>(dv * gv * sig);
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(trm, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &swiglu_bwd_cpu);
}

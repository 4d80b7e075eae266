// swiglu.cpp -- C++ CPU kernels of trm's SwiGLU activation (torch.ops.trm.swiglu_*).
//
// What it computes (gate_up [..., 2H], gate = first half, up = second half; fp32 math inside):
//   swiglu_fwd(gate_up) -> out [..., H] = silu(gate) * up,  silu(g) = g * sigmoid(g)
//   swiglu_bwd(grad_out, gate_up) -> [..., 2H]:
//       d gate = grad_out * up * sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//       d up   = grad_out * silu(g)
//   Outputs are contiguous; a non-contiguous gate_up is copied once (contiguous() is free for the
//   model's packed linear output).
//
// Test: python -m pytest tests/test_ops_cpu.py -q -k swiglu
// Time: python -m trm.ops.native --bench

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"

namespace {

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gu.scalar_type(), "trm_swiglu_fwd_cpu", [&] {
    const scalar_t* in = gu.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / H), [&](int64_t begin, int64_t end) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gu.scalar_type(), "trm_swiglu_bwd_cpu", [&] {
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

// trm_ops_cpu.cpp -- C++ CPU kernels of trm's fused ops, registered as torch.ops.trm.<name>.
//
// What it computes (see /work/shared/TRM_SPEC.md and DESIGN.md, "Ops"):
//   rms_norm_fwd(Tensor x, float eps) -> (Tensor y, Tensor rstd)
//       Weightless RMSNorm over the last dim: r = 1 / sqrt(mean(x^2) + eps), y = x * r.
//       fp32 accumulation; y in x's dtype (float32, float16, bfloat16); rstd float32, shape x.shape[:-1].
//   rms_norm_bwd(Tensor grad_y, Tensor y, Tensor rstd) -> Tensor grad_x
//       From the output and the saved 1/rms only: dx = r * (dy - y * mean(dy * y)).
//       (y_i = x_i r, dr/dx_j = -r^3 x_j / D, so dx_j = r dy_j - r^3 x_j/D sum_i dy_i x_i
//        = r (dy_j - y_j mean(dy * y)); eps is inside r and needs no extra term.)
//   stablemax_ce_fwd(Tensor logits, Tensor labels, int ignore_index) -> Tensor loss
//       Per-token -log(s(v_label) / sum_j s(v_j)), s(v) = v + 1 (v >= 0) else 1 / (1 - v);
//       float64 math, float32 output of shape logits.shape[:-1]; 0 where label == ignore_index.
//   stablemax_ce_bwd(Tensor grad_loss, Tensor logits, Tensor labels, int ignore_index) -> Tensor
//       d loss / d v_i = s'(v_i) / S - [i == label] s'(v_label) / s(v_label), with S = sum_j s(v_j),
//       s'(v) = 1 (v >= 0) else 1 / (1 - v)^2 = s(v)^2; float64 math, output in logits' dtype;
//       0 on every logit of an ignored token. Only the selected branch of s is ever evaluated.
//   Rows are independent: at::parallel_for over rows (the loss packs thousands of its tiny
//   6-12 wide rows per chunk). Inputs of any strides are made contiguous first.
//
// Build: JIT, on first use, by trm/ops/native.py (torch.utils.cpp_extension.load, -O3,
//   cached in torch's extension dir, ~/.cache/torch_extensions by default):
//     python -c "from trm.ops import native; print(native.load(), native.status())"
// Test: python -m pytest tests/test_ops_cpu.py -q   (native vs reference, fwd + bwd, opcheck,
//   whole-model equality of backend cpu vs torch).
// Time: python -c "from trm.ops import native; native.main(['--bench'])"  (median of repeats,
//   fwd+bwd, native vs the PyTorch reference, same process).
//
// Autograd and fake (meta) implementations are registered from Python (trm/ops/native.py).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kGrainElems = 32768;  // elements per parallel chunk (approximate)

int64_t row_grain(int64_t width) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(width, 1)); }

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

template <typename scalar_t>
void rms_norm_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, float* __restrict__ rstd,
                         int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * D;
      scalar_t* yr = y + r * D;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t i = 0;
      for (; i + 8 <= D; i += 8) {
        for (int k = 0; k < 8; ++k) {
          const float v = static_cast<float>(xr[i + k]);
          acc[k] += v * v;
        }
      }
      float tail = 0.f;
      for (; i < D; ++i) {
        const float v = static_cast<float>(xr[i]);
        tail += v * v;
      }
      const float ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
      const float rs = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
      rstd[r] = rs;
      for (int64_t j = 0; j < D; ++j) yr[j] = static_cast<scalar_t>(static_cast<float>(xr[j]) * rs);
    }
  });
}

template <typename scalar_t>
void rms_norm_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ y,
                         const float* __restrict__ rstd, scalar_t* __restrict__ dx, int64_t rows, int64_t D) {
  at::parallel_for(0, rows, row_grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* dyr = dy + r * D;
      const scalar_t* yr = y + r * D;
      scalar_t* dxr = dx + r * D;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      int64_t i = 0;
      for (; i + 8 <= D; i += 8) {
        for (int k = 0; k < 8; ++k) acc[k] += static_cast<float>(dyr[i + k]) * static_cast<float>(yr[i + k]);
      }
      float tail = 0.f;
      for (; i < D; ++i) tail += static_cast<float>(dyr[i]) * static_cast<float>(yr[i]);
      const float dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail;
      const float mean_dot = dot / static_cast<float>(D);
      const float rs = rstd[r];
      for (int64_t j = 0; j < D; ++j) {
        dxr[j] = static_cast<scalar_t>(rs * (static_cast<float>(dyr[j]) - static_cast<float>(yr[j]) * mean_dot));
      }
    }
  });
}

void check_float_dtype(const at::Tensor& t, const char* what) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "trm::", what, ": expected a float32, float16 or bfloat16 tensor, got ", st);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "trm::rms_norm_fwd (CPU kernel): x must be a CPU tensor");
  TORCH_CHECK(x.dim() >= 1, "trm::rms_norm_fwd: x must have at least one dimension");
  check_float_dtype(x, "rms_norm_fwd");
  const at::Tensor xc = x.contiguous();
  const int64_t D = xc.size(-1);
  const int64_t rows = D == 0 ? 0 : xc.numel() / D;
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  at::Tensor rstd = at::empty(xc.sizes().slice(0, xc.dim() - 1), xc.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "trm_rms_norm_fwd", [&] {
    rms_norm_fwd_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                                  rstd.mutable_data_ptr<float>(), rows, D, static_cast<float>(eps));
  });
  return {y, rstd};
}

at::Tensor rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rstd) {
  TORCH_CHECK(grad_y.device().is_cpu() && y.device().is_cpu() && rstd.device().is_cpu(),
              "trm::rms_norm_bwd (CPU kernel): all tensors must be on the CPU");
  check_float_dtype(y, "rms_norm_bwd");
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "trm::rms_norm_bwd: grad_y ", grad_y.sizes(), " and y ", y.sizes(),
              " differ in shape");
  TORCH_CHECK(y.dim() >= 1 && rstd.sizes() == y.sizes().slice(0, y.dim() - 1),
              "trm::rms_norm_bwd: rstd must have shape y.shape[:-1]");
  const at::Tensor yc = y.contiguous();
  const at::Tensor dyc = grad_y.to(y.scalar_type()).contiguous();
  const at::Tensor rc = rstd.to(at::kFloat).contiguous();
  const int64_t D = yc.size(-1);
  const int64_t rows = D == 0 ? 0 : yc.numel() / D;
  at::Tensor dx = at::empty(yc.sizes(), yc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, yc.scalar_type(), "trm_rms_norm_bwd", [&] {
    rms_norm_bwd_kernel<scalar_t>(dyc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
                                  rc.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(), rows, D);
  });
  return dx;
}

// ---------------------------------------------------------------------------------------------
// Stablemax cross-entropy
// ---------------------------------------------------------------------------------------------

inline double stablemax_s(double v) { return v >= 0.0 ? v + 1.0 : 1.0 / (1.0 - v); }

template <typename scalar_t>
void stablemax_ce_fwd_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                             float* __restrict__ loss, int64_t rows, int64_t V, int64_t ignore_index) {
  at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      if (label == ignore_index) {
        loss[r] = 0.f;
        continue;
      }
      TORCH_CHECK(label >= 0 && label < V, "trm::stablemax_ce_fwd: label ", label, " out of range [0, ", V, ")");
      const scalar_t* v = logits + r * V;
      double total = 0.0;
      for (int64_t j = 0; j < V; ++j) total += stablemax_s(static_cast<double>(v[j]));
      const double s_y = stablemax_s(static_cast<double>(v[label]));
      loss[r] = static_cast<float>(-(std::log(s_y) - std::log(total)));
    }
  });
}

template <typename scalar_t>
void stablemax_ce_bwd_kernel(const float* __restrict__ grad_loss, const scalar_t* __restrict__ logits,
                             const int64_t* __restrict__ labels, scalar_t* __restrict__ grad,
                             int64_t rows, int64_t V, int64_t ignore_index) {
  at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t label = labels[r];
      scalar_t* g = grad + r * V;
      if (label == ignore_index) {
        for (int64_t j = 0; j < V; ++j) g[j] = static_cast<scalar_t>(0);
        continue;
      }
      TORCH_CHECK(label >= 0 && label < V, "trm::stablemax_ce_bwd: label ", label, " out of range [0, ", V, ")");
      const scalar_t* v = logits + r * V;
      double total = 0.0;
      for (int64_t j = 0; j < V; ++j) total += stablemax_s(static_cast<double>(v[j]));
      const double gl = static_cast<double>(grad_loss[r]);
      const double inv_total = 1.0 / total;
      for (int64_t j = 0; j < V; ++j) {
        const double vj = static_cast<double>(v[j]);
        double ds;  // s'(v_j)
        double ds_over_s;  // s'(v_j) / s(v_j)
        if (vj >= 0.0) {
          ds = 1.0;
          ds_over_s = 1.0 / (vj + 1.0);
        } else {
          const double s = 1.0 / (1.0 - vj);
          ds = s * s;
          ds_over_s = s;
        }
        double d = ds * inv_total;
        if (j == label) d -= ds_over_s;
        g[j] = static_cast<scalar_t>(gl * d);
      }
    }
  });
}

void check_loss_args(const at::Tensor& logits, const at::Tensor& labels, const char* what) {
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu(), "trm::", what,
              " (CPU kernel): tensors must be on the CPU");
  TORCH_CHECK(logits.dim() >= 1, "trm::", what, ": logits must have at least one dimension");
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), "trm::", what, ": labels ",
              labels.sizes(), " must have shape logits.shape[:-1] (logits ", logits.sizes(), ")");
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()) &&
                  labels.scalar_type() != at::kBool,
              "trm::", what, ": labels must be an integer tensor");
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "trm::", what,
              ": logits must be float64, float32, float16 or bfloat16, got ", st);
}

at::Tensor stablemax_ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  check_loss_args(logits, labels, "stablemax_ce_fwd");
  const at::Tensor lc = logits.contiguous();
  const at::Tensor yc = labels.to(at::kLong).contiguous();
  const int64_t V = lc.size(-1);
  const int64_t rows = yc.numel();
  TORCH_CHECK(V > 0 || rows == 0, "trm::stablemax_ce_fwd: empty vocabulary");
  at::Tensor loss = at::empty(yc.sizes(), lc.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "trm_stablemax_ce_fwd", [&] {
    stablemax_ce_fwd_kernel<scalar_t>(lc.const_data_ptr<scalar_t>(), yc.const_data_ptr<int64_t>(),
                                      loss.mutable_data_ptr<float>(), rows, V, ignore_index);
  });
  return loss;
}

at::Tensor stablemax_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                int64_t ignore_index) {
  check_loss_args(logits, labels, "stablemax_ce_bwd");
  TORCH_CHECK(grad_loss.device().is_cpu(), "trm::stablemax_ce_bwd (CPU kernel): grad_loss must be on the CPU");
  TORCH_CHECK(grad_loss.sizes() == labels.sizes(), "trm::stablemax_ce_bwd: grad_loss ", grad_loss.sizes(),
              " must have the labels' shape ", labels.sizes());
  const at::Tensor lc = logits.contiguous();
  const at::Tensor yc = labels.to(at::kLong).contiguous();
  const at::Tensor gc = grad_loss.to(at::kFloat).contiguous();
  const int64_t V = lc.size(-1);
  const int64_t rows = yc.numel();
  at::Tensor grad = at::empty(lc.sizes(), lc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "trm_stablemax_ce_bwd", [&] {
    stablemax_ce_bwd_kernel<scalar_t>(gc.const_data_ptr<float>(), lc.const_data_ptr<scalar_t>(),
                                      yc.const_data_ptr<int64_t>(), grad.mutable_data_ptr<scalar_t>(), rows, V,
                                      ignore_index);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY(trm, m) {
  m.def("rms_norm_fwd(Tensor x, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor grad_y, Tensor y, Tensor rstd) -> Tensor grad_x");
  m.def("stablemax_ce_fwd(Tensor logits, Tensor labels, int ignore_index) -> Tensor loss");
  m.def("stablemax_ce_bwd(Tensor grad_loss, Tensor logits, Tensor labels, int ignore_index) -> Tensor grad_logits");
}

TORCH_LIBRARY_IMPL(trm, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
  m.impl("stablemax_ce_fwd", &stablemax_ce_fwd_cpu);
  m.impl("stablemax_ce_bwd", &stablemax_ce_bwd_cpu);
}

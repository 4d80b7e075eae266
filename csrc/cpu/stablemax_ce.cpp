// stablemax_ce.cpp -- C++ CPU kernels of trm's stablemax cross-entropy (torch.ops.trm.stablemax_ce_*).
//
// What it computes, per token (row of V logits, label y):
//   s(v) = v + 1 (v >= 0) else 1 / (1 - v);  S = sum_j s(v_j)
//   stablemax_ce_fwd(logits, labels, ignore_index) -> loss = -log(s(v_y) / S), float32, shape
//       logits.shape[:-1]; 0 where label == ignore_index. Evaluated as log1p(sum_{j!=y} s_j / s_y)
//       in float64 (no cancellation when the loss is small), so it is within 1e-6 relative of the
//       float64 formula before the float32 store.
//   stablemax_ce_bwd(grad_loss, logits, labels, ignore_index) -> grad_logits (logits' dtype):
//       d loss / d v_j = s'(v_j) / S - [j == y] s'(v_y) / s(v_y),  s'(v) = 1 (v >= 0) else s(v)^2;
//       the j == y term is -s'(v_y)/s(v_y) * (S - s_y)/S. float64 math; 0 on ignored tokens.
//   Labels out of [0, V) that are not ignore_index raise IndexError (checked, never read).
//   Only the selected branch of s is evaluated, so no inf/NaN from the other one.
//   Rows are independent: at::parallel_for packs thousands of the 6-12-wide rows per task.
//
// Test: python -m pytest tests/test_ops_cpu.py -q -k stablemax
// Time: python -m trm.ops.native --bench

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"

namespace {

constexpr int64_t kGrainElems = 32768;

inline double smax_s(double v) { return v >= 0.0 ? v + 1.0 : 1.0 / (1.0 - v); }

template <typename L>
inline void check_label(L label, int64_t row, int64_t V, int64_t ignore_index, const char* op) {
  TORCH_CHECK_INDEX(label >= 0 && label < V, "trm::", op, ": label ", static_cast<int64_t>(label),
                    " of token ", row, " (flattened) is out of range [0, ", V,
                    ") and is not ignore_index (", ignore_index,
                    "); fix the labels, or pass the ignore_index that marks padding");
}

at::Tensor stablemax_ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  const char* op = "stablemax_ce_fwd";
  const int64_t V = trm::check_ce_args(logits, labels, c10::DeviceType::CPU, op);
  const at::Tensor lc = logits.contiguous();
  const at::Tensor yc = labels.contiguous();
  at::Tensor loss = at::empty(labels.sizes(), logits.options().dtype(at::kFloat));
  const int64_t rows = yc.numel();
  if (rows == 0) return loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "trm_stablemax_ce_fwd_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(yc.scalar_type(), "trm_stablemax_ce_fwd_cpu_labels", [&] {
      const scalar_t* lg = lc.const_data_ptr<scalar_t>();
      const index_t* lab = yc.const_data_ptr<index_t>();
      float* out = loss.mutable_data_ptr<float>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / V), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const index_t y = lab[r];
          if (static_cast<int64_t>(y) == ignore_index) {
            out[r] = 0.f;
            continue;
          }
          check_label(y, r, V, ignore_index, op);
          const scalar_t* v = lg + r * V;
          double others = 0.0;
          for (int64_t j = 0; j < V; ++j) {
            if (j != static_cast<int64_t>(y)) others += smax_s(static_cast<double>(v[j]));
          }
          out[r] = static_cast<float>(std::log1p(others / smax_s(static_cast<double>(v[y]))));
        }
      });
    });
  });
  return loss;
}

at::Tensor stablemax_ce_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                int64_t ignore_index) {
  const char* op = "stablemax_ce_bwd";
  const int64_t V = trm::check_ce_args(logits, labels, c10::DeviceType::CPU, op);
  trm::check_same_device(logits, grad_loss, op, "grad_loss");
  TORCH_CHECK(grad_loss.sizes() == labels.sizes(), "trm::", op, ": grad_loss ", grad_loss.sizes(),
              " must have the labels' shape ", labels.sizes());
  const at::Tensor lc = logits.contiguous();
  const at::Tensor yc = labels.contiguous();
  const at::Tensor gc = grad_loss.to(at::kFloat).contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const int64_t rows = yc.numel();
  if (rows == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lc.scalar_type(), "trm_stablemax_ce_bwd_cpu", [&] {
    AT_DISPATCH_INDEX_TYPES(yc.scalar_type(), "trm_stablemax_ce_bwd_cpu_labels", [&] {
      const scalar_t* lg = lc.const_data_ptr<scalar_t>();
      const index_t* lab = yc.const_data_ptr<index_t>();
      const float* gl = gc.const_data_ptr<float>();
      scalar_t* out = grad.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / V), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t y = static_cast<int64_t>(lab[r]);
          scalar_t* g = out + r * V;
          if (y == ignore_index) {
            for (int64_t j = 0; j < V; ++j) g[j] = static_cast<scalar_t>(0);
            continue;
          }
          check_label(lab[r], r, V, ignore_index, op);
          const scalar_t* v = lg + r * V;
          double others = 0.0;
          for (int64_t j = 0; j < V; ++j) {
            if (j != y) others += smax_s(static_cast<double>(v[j]));
          }
          const double s_y = smax_s(static_cast<double>(v[y]));
          const double inv_total = 1.0 / (others + s_y);
          const double gr = static_cast<double>(gl[r]);
          for (int64_t j = 0; j < V; ++j) {
            const double vj = static_cast<double>(v[j]);
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
            g[j] = static_cast<scalar_t>(gr * d);
          }
        }
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(trm, CPU, m) {
  m.impl("stablemax_ce_fwd", &stablemax_ce_fwd_cpu);
  m.impl("stablemax_ce_bwd", &stablemax_ce_bwd_cpu);
}

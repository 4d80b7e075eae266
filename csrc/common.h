// common.h -- host-side helpers shared by the CPU and CUDA bindings of torch.ops.trm.* (ATen only,
// no device code): dtype/device checks and the "row plan" that lets the RMSNorm kernels run over
// any axis of any dense layout without a transpose copy.
//
// Row plan. RMSNorm over axis `dim` treats every other index as a row. The plan is built from
// the OUTPUT y = empty_like(x) (always dense): the other non-unit dims are sorted by y's
// stride, largest first; those with a stride above y.stride(dim) form the "outer" group, the
// rest the "inner" group. Every tensor of the op (x, residual, dy, dx) is then addressed as a
// 3-d view [outer, N, inner] with its OWN strides (so, sn, si), and row r = o * inner + i.
// For the model's mlp_t block (x = a (B, L, D) tensor transposed to (B, D, L), dim = -1) this
// gives outer = B, N = L (stride D), inner = D (stride 1): the kernels read the transposed view
// in place. A tensor whose groups do not fold into one stride each (a non-dense slice, or a
// residual in an unrelated layout) is first copied into y's layout -- the only copy, and only
// for such inputs. rstd is stored one float per row, in row order (an opaque buffer that only
// rms_norm_bwd reads, with the plan rebuilt from y, which has the same layout).
//
// Test: python -m pytest tests/test_ops_cpu.py -q -k rms_norm (the transposed-view cases).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/WrapDimMinimal.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <vector>

namespace trm {

struct Strides3 {
  int64_t o = 0, n = 0, i = 0;
};

struct RowPlan {
  int64_t dim = 0;
  std::vector<int64_t> outer_dims, inner_dims;  // non-unit dims, largest stride first
  int64_t outer = 1, n = 1, inner = 1;
  int64_t rows() const { return outer * inner; }
};

inline bool is_low_or_single_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

inline void check_float(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK(is_low_or_single_float(t.scalar_type()), "trm::", op, ": ", what,
              " must be float32, float16 or bfloat16, got ", t.scalar_type(),
              " (trm.ops routes other dtypes to the PyTorch reference)");
}

inline void check_device(const at::Tensor& t, c10::DeviceType dev, const char* op, const char* what) {
  TORCH_CHECK(t.device().type() == dev, "trm::", op, " (", c10::DeviceTypeName(dev), " kernel): ", what,
              " is on ", t.device(), "; move it to ", c10::DeviceTypeName(dev, /*lower_case=*/true),
              " or call trm.ops.<op>, which picks the backend for the tensor's device");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* what) {
  TORCH_CHECK(a.device() == b.device(), "trm::", op, ": ", what, " is on ", b.device(), " but the input is on ",
              a.device(), "; put both on the same device");
}

inline RowPlan make_row_plan(const at::Tensor& ref, int64_t dim) {
  RowPlan p;
  p.dim = dim;
  p.n = ref.size(dim);
  const int64_t sn = ref.stride(dim);
  std::vector<int64_t> others;
  for (int64_t d = 0; d < ref.dim(); ++d) {
    if (d != dim && ref.size(d) != 1) others.push_back(d);
  }
  std::stable_sort(others.begin(), others.end(),
                   [&](int64_t a, int64_t b) { return ref.stride(a) > ref.stride(b); });
  for (int64_t d : others) {
    if (p.n > 1 && ref.stride(d) < sn) {
      p.inner_dims.push_back(d);
      p.inner *= ref.size(d);
    } else {
      p.outer_dims.push_back(d);
      p.outer *= ref.size(d);
    }
  }
  return p;
}

// The strides of t seen as [outer, N, inner] under plan p, or nullopt when a group does not fold.
inline std::optional<Strides3> fold_strides(const at::Tensor& t, const RowPlan& p) {
  auto fold = [&](const std::vector<int64_t>& dims, int64_t& stride) {
    stride = 0;
    for (size_t j = 0; j + 1 < dims.size(); ++j) {
      if (t.stride(dims[j]) != t.stride(dims[j + 1]) * t.size(dims[j + 1])) return false;
    }
    if (!dims.empty()) stride = t.stride(dims.back());
    return true;
  };
  Strides3 s;
  s.n = t.stride(p.dim);
  if (!fold(p.outer_dims, s.o) || !fold(p.inner_dims, s.i)) return std::nullopt;
  return s;
}

// t itself when it folds under p, else a copy of t in ref's layout (which always folds).
inline at::Tensor in_plan_layout(const at::Tensor& t, const at::Tensor& ref, const RowPlan& p, Strides3& s) {
  if (auto folded = fold_strides(t, p)) {
    s = *folded;
    return t;
  }
  at::Tensor copy = at::empty_like(ref);
  copy.copy_(t);
  s = fold_strides(copy, p).value();
  return copy;
}

struct RmsFwdArgs {
  at::Tensor x, residual, y, rstd;  // residual / rstd undefined when absent / not saved
  RowPlan plan;
  Strides3 xs, rs, ys;
};

inline RmsFwdArgs prepare_rms_fwd(const at::Tensor& x, const std::optional<at::Tensor>& residual, int64_t dim,
                                  bool save_rstd, c10::DeviceType dev, const char* op) {
  check_device(x, dev, op, "x");
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, "trm::", op, ": x must have at least one dimension, got a scalar");
  dim = c10::maybe_wrap_dim(dim, x.dim());
  TORCH_CHECK(x.size(dim) > 0, "trm::", op, ": the normalised axis (dim ", dim, " of shape ", x.sizes(),
              ") is empty; RMSNorm over zero elements is undefined");
  RmsFwdArgs a;
  a.y = at::empty_like(x);
  a.plan = make_row_plan(a.y, dim);
  a.ys = fold_strides(a.y, a.plan).value();
  a.x = in_plan_layout(x, a.y, a.plan, a.xs);
  if (residual.has_value() && residual->defined()) {
    const at::Tensor& r = *residual;
    check_same_device(x, r, op, "residual");
    TORCH_CHECK(r.sizes() == x.sizes(), "trm::", op, ": residual has shape ", r.sizes(), " but x has shape ",
                x.sizes(), "; they must match (no broadcasting)");
    TORCH_CHECK(r.scalar_type() == x.scalar_type(), "trm::", op, ": residual is ", r.scalar_type(), " but x is ",
                x.scalar_type(), "; cast one of them");
    a.residual = in_plan_layout(r, a.y, a.plan, a.rs);
  }
  if (save_rstd) a.rstd = at::empty({a.plan.rows()}, x.options().dtype(at::kFloat));
  return a;
}

struct RmsBwdArgs {
  at::Tensor dy, y, rstd, dx;
  RowPlan plan;
  Strides3 dys, ys, dxs;
};

inline RmsBwdArgs prepare_rms_bwd(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rstd,
                                  int64_t dim, c10::DeviceType dev, const char* op) {
  check_device(y, dev, op, "y");
  check_float(y, op, "y");
  check_same_device(y, grad_y, op, "grad_y");
  check_same_device(y, rstd, op, "rstd");
  TORCH_CHECK(y.dim() >= 1, "trm::", op, ": y must have at least one dimension");
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "trm::", op, ": grad_y ", grad_y.sizes(), " and y ", y.sizes(),
              " differ in shape");
  dim = c10::maybe_wrap_dim(dim, y.dim());
  RmsBwdArgs a;
  a.y = y;
  // y comes from rms_norm_fwd (empty_like, dense); anything else is copied to a dense layout
  if (!y.is_non_overlapping_and_dense()) a.y = y.contiguous();
  a.plan = make_row_plan(a.y, dim);
  a.ys = fold_strides(a.y, a.plan).value();
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.numel() == a.plan.rows(),
              "trm::", op, ": rstd must be the float32 vector of ", a.plan.rows(),
              " per-row values saved by rms_norm_fwd, got ", rstd.scalar_type(), " ", rstd.sizes());
  a.rstd = rstd.contiguous();
  const at::Tensor dy = grad_y.scalar_type() == y.scalar_type() ? grad_y : grad_y.to(y.scalar_type());
  a.dy = in_plan_layout(dy, a.y, a.plan, a.dys);
  a.dx = at::empty_like(a.y);
  a.dxs = fold_strides(a.dx, a.plan).value();
  return a;
}

// swiglu: gate_up [..., 2H] -> [..., H]
inline int64_t swiglu_half_width(const at::Tensor& gate_up, const char* op) {
  TORCH_CHECK(gate_up.dim() >= 1, "trm::", op, ": gate_up must have at least one dimension");
  const int64_t w = gate_up.size(-1);
  TORCH_CHECK(w % 2 == 0, "trm::", op, ": the last dim of gate_up (", w,
              ") must be even: it holds [gate, up] halves of equal width");
  return w / 2;
}

inline std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// stablemax CE argument checks; returns V
inline int64_t check_ce_args(const at::Tensor& logits, const at::Tensor& labels, c10::DeviceType dev,
                             const char* op) {
  check_device(logits, dev, op, "logits");
  check_same_device(logits, labels, op, "labels");
  check_float(logits, op, "logits");
  TORCH_CHECK(logits.dim() >= 1, "trm::", op, ": logits must have at least one dimension (the vocabulary)");
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), "trm::", op, ": labels ",
              labels.sizes(), " must have shape logits.shape[:-1] (logits ", logits.sizes(), ")");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, "trm::", op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  const int64_t V = logits.size(-1);
  TORCH_CHECK(V > 0 || labels.numel() == 0, "trm::", op, ": the vocabulary axis of logits is empty");
  return V;
}

inline void check_adam_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, int64_t step, c10::DeviceType dev) {
  const char* op = "adam_atan2";
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size(),
              "trm::adam_atan2: the four lists must have one entry per parameter, got ", params.size(), " params, ",
              grads.size(), " grads, ", exp_avgs.size(), " exp_avgs, ", exp_avg_sqs.size(), " exp_avg_sqs");
  TORCH_CHECK(step >= 1, "trm::adam_atan2: step must be >= 1 (the count after this update), got ", step);
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor* ts[4] = {&params[k], &grads[k], &exp_avgs[k], &exp_avg_sqs[k]};
    const char* names[4] = {"params", "grads", "exp_avgs", "exp_avg_sqs"};
    for (int j = 0; j < 4; ++j) {
      const at::Tensor& t = *ts[j];
      trm::check_device(t, dev, op, names[j]);
      TORCH_CHECK(t.device() == params[0].device(), "trm::adam_atan2: ", names[j], "[", k, "] is on ", t.device(),
                  " but params[0] is on ", params[0].device(), "; all tensors must share one device");
      TORCH_CHECK(t.scalar_type() == at::kFloat, "trm::adam_atan2: ", names[j], "[", k, "] is ", t.scalar_type(),
                  "; the fused kernel takes float32 only (trm.ops routes others to the reference)");
      TORCH_CHECK(t.is_contiguous(), "trm::adam_atan2: ", names[j], "[", k, "] is not contiguous");
      TORCH_CHECK(t.numel() == params[k].numel(), "trm::adam_atan2: ", names[j], "[", k, "] has ", t.numel(),
                  " elements but params[", k, "] has ", params[k].numel());
    }
  }
}

}  // namespace trm

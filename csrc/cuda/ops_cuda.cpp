// ops_cuda.cpp -- torch bindings of the CUDA kernels: TORCH_LIBRARY_IMPL(trm, CUDA, m).
//
// Host side only (checks, the row plan of csrc/common.h, allocation, the current stream and
// device guard); the device code is in rms_norm.cu, swiglu.cu, stablemax_ce.cu, adam_atan2.cu
// behind the plain interface of kernels.h. Compiled (with those) only when the build has CUDA.
//
// Test: python -m pytest tests/test_ops_cuda_build.py -q   (registration here; GPU tests marked `gpu`)
// Time: python -m trm.ops.native --bench --device cuda

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "kernels.h"

namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

trm_cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return trm_cuda::kF32;
    case at::kHalf: return trm_cuda::kF16;
    case at::kBFloat16: return trm_cuda::kBF16;
    default: TORCH_CHECK(false, "trm CUDA kernels: unsupported dtype ", t.scalar_type());
  }
}

trm_cuda::Strides3 s3(const trm::Strides3& s) { return {s.o, s.n, s.i}; }
trm_cuda::RowShape shape_of(const trm::RowPlan& p) { return {p.outer, p.n, p.inner}; }
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void run_fwd(const trm::RmsFwdArgs& a, double eps) {
  C10_CUDA_CHECK(trm_cuda::rms_norm_fwd(
      dtype_of(a.x), a.x.const_data_ptr(), s3(a.xs), a.residual.defined() ? a.residual.const_data_ptr() : nullptr,
      s3(a.rs), a.y.mutable_data_ptr(), s3(a.ys), a.rstd.defined() ? a.rstd.mutable_data_ptr<float>() : nullptr,
      shape_of(a.plan), static_cast<float>(eps), stream_of(a.x)));
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                     int64_t dim, double eps) {
  trm::check_device(x, kCUDA, "rms_norm_fwd", "x");  // before the guard: a CPU x must get this message
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = trm::prepare_rms_fwd(x, residual, dim, /*save_rstd=*/true, kCUDA, "rms_norm_fwd");
  run_fwd(a, eps);
  return {a.y, a.rstd};
}

at::Tensor rms_norm_fwd_only_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual, int64_t dim,
                                  double eps) {
  trm::check_device(x, kCUDA, "rms_norm_fwd_only", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  auto a = trm::prepare_rms_fwd(x, residual, dim, /*save_rstd=*/false, kCUDA, "rms_norm_fwd_only");
  run_fwd(a, eps);
  return a.y;
}

at::Tensor rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rstd, int64_t dim) {
  trm::check_device(y, kCUDA, "rms_norm_bwd", "y");
  const c10::cuda::CUDAGuard guard(y.device());
  auto a = trm::prepare_rms_bwd(grad_y, y, rstd, dim, kCUDA, "rms_norm_bwd");
  C10_CUDA_CHECK(trm_cuda::rms_norm_bwd(dtype_of(a.y), a.dy.const_data_ptr(), s3(a.dys), a.y.const_data_ptr(),
                                        s3(a.ys), a.rstd.const_data_ptr<float>(), a.dx.mutable_data_ptr(), s3(a.dxs),
                                        shape_of(a.plan), stream_of(a.y)));
  return a.dx;
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate_up) {
  const char* op = "swiglu_fwd";
  trm::check_device(gate_up, kCUDA, op, "gate_up");
  trm::check_float(gate_up, op, "gate_up");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t H = trm::swiglu_half_width(gate_up, op);
  const at::Tensor gu = gate_up.contiguous();
  at::Tensor out = at::empty(trm::with_last(gu.sizes(), H), gu.options());
  const int64_t rows = H == 0 ? 0 : out.numel() / H;
  C10_CUDA_CHECK(trm_cuda::swiglu_fwd(dtype_of(gu), gu.const_data_ptr(), out.mutable_data_ptr(), rows, H,
                                      stream_of(gu)));
  return out;
}

at::Tensor swiglu_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& gate_up) {
  const char* op = "swiglu_bwd";
  trm::check_device(gate_up, kCUDA, op, "gate_up");
  trm::check_same_device(gate_up, grad_out, op, "grad_out");
  trm::check_float(gate_up, op, "gate_up");
  const c10::cuda::CUDAGuard guard(gate_up.device());
  const int64_t H = trm::swiglu_half_width(gate_up, op);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(trm::with_last(gate_up.sizes(), H)), "trm::", op, ": grad_out ",
              grad_out.sizes(), " must have gate_up's shape with the last dim halved (gate_up ", gate_up.sizes(), ")");
  const at::Tensor gu = gate_up.contiguous();
  const at::Tensor dout = grad_out.to(gu.scalar_type()).contiguous();
  at::Tensor grad = at::empty(gu.sizes(), gu.options());
  const int64_t rows = H == 0 ? 0 : dout.numel() / H;
  C10_CUDA_CHECK(trm_cuda::swiglu_bwd(dtype_of(gu), dout.const_data_ptr(), gu.const_data_ptr(),
                                      grad.mutable_data_ptr(), rows, H, stream_of(gu)));
  return grad;
}

at::Tensor stablemax_ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  const char* op = "stablemax_ce_fwd";
  const int64_t V = trm::check_ce_args(logits, labels, kCUDA, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor lc = logits.contiguous();
  const at::Tensor yc = labels.contiguous();
  at::Tensor loss = at::empty(labels.sizes(), logits.options().dtype(at::kFloat));
  C10_CUDA_CHECK(trm_cuda::stablemax_ce_fwd(dtype_of(lc), lc.const_data_ptr(), yc.const_data_ptr(),
                                            yc.scalar_type() == at::kLong, loss.mutable_data_ptr<float>(),
                                            yc.numel(), V, ignore_index, stream_of(lc)));
  return loss;
}

at::Tensor stablemax_ce_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& labels,
                                 int64_t ignore_index) {
  const char* op = "stablemax_ce_bwd";
  const int64_t V = trm::check_ce_args(logits, labels, kCUDA, op);
  trm::check_same_device(logits, grad_loss, op, "grad_loss");
  TORCH_CHECK(grad_loss.sizes() == labels.sizes(), "trm::", op, ": grad_loss ", grad_loss.sizes(),
              " must have the labels' shape ", labels.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor lc = logits.contiguous();
  const at::Tensor yc = labels.contiguous();
  const at::Tensor gc = grad_loss.to(at::kFloat).contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  C10_CUDA_CHECK(trm_cuda::stablemax_ce_bwd(dtype_of(lc), gc.const_data_ptr<float>(), lc.const_data_ptr(),
                                            yc.const_data_ptr(), yc.scalar_type() == at::kLong,
                                            grad.mutable_data_ptr(), yc.numel(), V, ignore_index, stream_of(lc)));
  return grad;
}

void adam_atan2_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, int64_t step, double lr, double beta1, double beta2,
                     double weight_decay) {
  trm::check_adam_lists(params, grads, exp_avgs, exp_avg_sqs, step, kCUDA);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<trm_cuda::AdamTensor> tensors;
  tensors.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    tensors.push_back({params[k].mutable_data_ptr<float>(), grads[k].const_data_ptr<float>(),
                       exp_avgs[k].mutable_data_ptr<float>(), exp_avg_sqs[k].mutable_data_ptr<float>(),
                       params[k].numel()});
  }
  const double t = static_cast<double>(step);
  trm_cuda::AdamScalars s;
  s.apply_decay = weight_decay != 0.0 ? 1 : 0;
  s.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  s.w1 = static_cast<float>(1.0 - beta1);
  s.w2 = static_cast<float>(1.0 - beta2);
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
  C10_CUDA_CHECK(trm_cuda::adam_atan2(tensors.data(), static_cast<int64_t>(tensors.size()), s,
                                      stream_of(params[0])));
}

}  // namespace

TORCH_LIBRARY_IMPL(trm, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_fwd_only", &rms_norm_fwd_only_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
  m.impl("swiglu_fwd", &swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &swiglu_bwd_cuda);
  m.impl("stablemax_ce_fwd", &stablemax_ce_fwd_cuda);
  m.impl("stablemax_ce_bwd", &stablemax_ce_bwd_cuda);
  m.impl("adam_atan2", &adam_atan2_cuda);
}

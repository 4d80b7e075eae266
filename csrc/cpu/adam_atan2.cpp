// adam_atan2.cpp -- C++ CPU kernel of trm's fused AdamATan2 step (torch.ops.trm.adam_atan2).
//
// What it computes, in place, for every (p, g, m, v) of the four lists (float32, contiguous,
// same numel per index), with t = step >= 1 (the count AFTER this update):
//   p *= 1 - lr * weight_decay                         (skipped when weight_decay == 0)
//   m  = lerp(m, g, 1 - beta1);  v = lerp(v, g * g, 1 - beta2)
//   p -= lr / (1 - beta1^t) * atan2(m, sqrt(v) / sqrt(1 - beta2^t))
// the op sequence of trm.ops.reference.adam_atan2 (torch._foreach_*), scalars rounded to float32
// like the foreach kernels, lerp with torch's two-branch formula. No epsilon: atan2(0, 0) = 0.
//
// Test: python -m pytest tests/test_ops_cpu.py -q -k adam
// Time: python -m trm.ops.native --bench

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"

namespace {

inline float lerp(float a, float b, float w) { return std::abs(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w); }

void adam_atan2_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, int64_t step, double lr, double beta1, double beta2,
                    double weight_decay) {
  trm::check_adam_lists(params, grads, exp_avgs, exp_avg_sqs, step, c10::DeviceType::CPU);
  const double t = static_cast<double>(step);
  const bool decay = weight_decay != 0.0;
  const float decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  const float w1 = static_cast<float>(1.0 - beta1);
  const float w2 = static_cast<float>(1.0 - beta2);
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
  for (size_t k = 0; k < params.size(); ++k) {
    float* p = params[k].mutable_data_ptr<float>();
    const float* g = grads[k].const_data_ptr<float>();
    float* m = exp_avgs[k].mutable_data_ptr<float>();
    float* v = exp_avg_sqs[k].mutable_data_ptr<float>();
    at::parallel_for(0, params[k].numel(), 16384, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float pi = p[i];
        if (decay) pi *= decay_factor;
        const float gi = g[i];
        const float mi = lerp(m[i], gi, w1);
        const float vi = lerp(v[i], gi * gi, w2);
        m[i] = mi;
        v[i] = vi;
        const float direction = std::atan2(mi, std::sqrt(vi) / bc2_sqrt) * step_size;
        p[i] = pi - direction;
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(trm, CPU, m) { m.impl("adam_atan2", &adam_atan2_cpu); }

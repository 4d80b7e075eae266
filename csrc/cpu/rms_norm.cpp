// rms_norm.cpp -- C++ CPU kernels of trm's weightless post-norm RMSNorm (torch.ops.trm.rms_norm_*).
//
// What it computes, over axis `dim` of any dense layout (see csrc/common.h, "Row plan"):
//   rms_norm_fwd(x, residual?, dim, eps) -> (y, rstd)
//       s = x + residual (fp32), r = 1 / sqrt(mean(s^2) + eps), y = s * r in x's dtype;
//       rstd = r, float32, one per row (row order of the plan).
//   rms_norm_fwd_only(...) -> y: the same y, no rstd (the no-grad cycles).
//   rms_norm_bwd(dy, y, rstd, dim) -> ds = r * (dy - y * mean(dy * y)); the gradient of x and of
//       residual alike. (y_i = s_i r, dr/ds_j = -r^3 s_j / N, so ds_j = r dy_j - r^3 s_j/N sum_i dy_i s_i
//       = r (dy_j - y_j mean(dy y)); eps sits inside r and needs no extra term.)
//   fp32 math, float64 accumulation of the sums, for every dtype (float32, float16, bfloat16).
//   Output y = empty_like(x).
// Two loops: "rows" when the normalised axis is the innermost one (a row buffered in fp32),
// "columns" when other dims are inner to it (the mlp_t transposed view): a task takes 64 rows x N
// as an fp32 tile, reading/writing each tensor once in the loop order of its own layout, and
// sums the 64 rows in lockstep (vectorised across rows).
//
// Test: python -m pytest tests/test_ops_cpu.py -q -k rms_norm
// Time: python -m trm.ops.native --bench   (fwd+bwd and no-grad forward vs the PyTorch reference)

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"

namespace {

using trm::Strides3;

constexpr int64_t kGrainElems = 16384;  // elements per parallel task (about)
constexpr int64_t kColBlock = 64;       // rows per task in the columns loop

inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(width, 1)); }

// Sums are accumulated in float64 (8 lanes): exact enough that long rows (N in the thousands,
// e.g. the sequence axis of mlp_t) stay within the error rule, and still memory-bound.
inline float sum8(const float* v, int64_t n) {
  double acc[8] = {0., 0., 0., 0., 0., 0., 0., 0.};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += v[i + k];
  }
  double tail = 0.;
  for (; i < n; ++i) tail += v[i];
  return static_cast<float>(((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail);
}

// ------------------------------------------------------------------------------------------- fwd

template <typename T>
void fwd_rows(const T* x, Strides3 xs, const T* r, Strides3 rs, T* y, Strides3 ys, float* rstd, int64_t outer,
              int64_t N, float eps) {
  at::parallel_for(0, outer, grain_rows(N), [&](int64_t begin, int64_t end) {
    std::vector<float> s(N), sq(N);
    for (int64_t o = begin; o < end; ++o) {
      const T* xo = x + o * xs.o;
      const T* ro = r ? r + o * rs.o : nullptr;
      if (xs.n == 1 && (!ro || rs.n == 1)) {
        for (int64_t n = 0; n < N; ++n) s[n] = static_cast<float>(xo[n]) + (ro ? static_cast<float>(ro[n]) : 0.f);
      } else {
        for (int64_t n = 0; n < N; ++n) {
          s[n] = static_cast<float>(xo[n * xs.n]) + (ro ? static_cast<float>(ro[n * rs.n]) : 0.f);
        }
      }
      for (int64_t n = 0; n < N; ++n) sq[n] = s[n] * s[n];
      const float inv = 1.0f / std::sqrt(sum8(sq.data(), N) / static_cast<float>(N) + eps);
      if (rstd) rstd[o] = inv;
      T* yo = y + o * ys.o;
      if (ys.n == 1) {
        for (int64_t n = 0; n < N; ++n) yo[n] = static_cast<T>(s[n] * inv);
      } else {
        for (int64_t n = 0; n < N; ++n) yo[n * ys.n] = static_cast<T>(s[n] * inv);
      }
    }
  });
}

// The columns loop works on a tile of kColBlock rows x N, staged in fp32 as tile[n][k]: each
// tensor is read (or written) once, in the loop order that follows its own smaller stride.
template <typename T, bool ADD>
inline void load_tile(float* tile, const T* src, int64_t sn, int64_t si, int64_t N, int64_t w) {
  if (si == 1) {
    for (int64_t n = 0; n < N; ++n) {
      const T* p = src + n * sn;
      float* t = tile + n * kColBlock;
      for (int64_t k = 0; k < w; ++k) t[k] = ADD ? t[k] + static_cast<float>(p[k]) : static_cast<float>(p[k]);
    }
  } else if (sn == 1) {
    for (int64_t k = 0; k < w; ++k) {
      const T* p = src + k * si;
      for (int64_t n = 0; n < N; ++n) {
        float& t = tile[n * kColBlock + k];
        t = ADD ? t + static_cast<float>(p[n]) : static_cast<float>(p[n]);
      }
    }
  } else {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < w; ++k) {
        float& t = tile[n * kColBlock + k];
        const float v = static_cast<float>(src[n * sn + k * si]);
        t = ADD ? t + v : v;
      }
    }
  }
}

// dst[n, k] = tile[n][k] * scale[k] (+ optional per-element term, see bwd)
template <typename T, typename F>
inline void store_tile(T* dst, int64_t sn, int64_t si, int64_t N, int64_t w, F&& value) {
  if (si == 1 || sn != 1) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < w; ++k) dst[n * sn + k * si] = static_cast<T>(value(n, k));
    }
  } else {
    for (int64_t k = 0; k < w; ++k) {
      for (int64_t n = 0; n < N; ++n) dst[n * sn + k * si] = static_cast<T>(value(n, k));
    }
  }
}

template <typename T>
void fwd_cols(const T* x, Strides3 xs, const T* r, Strides3 rs, T* y, Strides3 ys, float* rstd, int64_t outer,
              int64_t N, int64_t inner, float eps) {
  const int64_t blocks_per_outer = (inner + kColBlock - 1) / kColBlock;
  const int64_t tasks = outer * blocks_per_outer;
  at::parallel_for(0, tasks, grain_rows(N * kColBlock), [&](int64_t begin, int64_t end) {
    std::vector<float> tile_buf(N * kColBlock);
    float* tile = tile_buf.data();
    double acc[kColBlock];
    float inv[kColBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / blocks_per_outer;
      const int64_t i0 = (t % blocks_per_outer) * kColBlock;
      const int64_t w = std::min(kColBlock, inner - i0);
      load_tile<T, false>(tile, x + o * xs.o + i0 * xs.i, xs.n, xs.i, N, w);
      if (r) load_tile<T, true>(tile, r + o * rs.o + i0 * rs.i, rs.n, rs.i, N, w);
      for (int64_t k = 0; k < w; ++k) acc[k] = 0.;
      for (int64_t n = 0; n < N; ++n) {
        const float* tn = tile + n * kColBlock;
        for (int64_t k = 0; k < w; ++k) acc[k] += tn[k] * tn[k];
      }
      for (int64_t k = 0; k < w; ++k) {
        inv[k] = 1.0f / std::sqrt(static_cast<float>(acc[k]) / static_cast<float>(N) + eps);
        if (rstd) rstd[o * inner + i0 + k] = inv[k];
      }
      store_tile(y + o * ys.o + i0 * ys.i, ys.n, ys.i, N, w,
                 [&](int64_t n, int64_t k) { return tile[n * kColBlock + k] * inv[k]; });
    }
  });
}

void run_fwd(const trm::RmsFwdArgs& a, float eps) {
  const auto& p = a.plan;
  if (p.rows() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "trm_rms_norm_fwd_cpu", [&] {
    const scalar_t* r = a.residual.defined() ? a.residual.const_data_ptr<scalar_t>() : nullptr;
    float* rstd = a.rstd.defined() ? a.rstd.mutable_data_ptr<float>() : nullptr;
    if (p.inner == 1) {
      fwd_rows<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.xs, r, a.rs, a.y.mutable_data_ptr<scalar_t>(), a.ys, rstd,
                         p.outer, p.n, eps);
    } else {
      fwd_cols<scalar_t>(a.x.const_data_ptr<scalar_t>(), a.xs, r, a.rs, a.y.mutable_data_ptr<scalar_t>(), a.ys, rstd,
                         p.outer, p.n, p.inner, eps);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                    int64_t dim, double eps) {
  auto a = trm::prepare_rms_fwd(x, residual, dim, /*save_rstd=*/true, c10::DeviceType::CPU, "rms_norm_fwd");
  run_fwd(a, static_cast<float>(eps));
  return {a.y, a.rstd};
}

at::Tensor rms_norm_fwd_only_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual, int64_t dim,
                                 double eps) {
  auto a = trm::prepare_rms_fwd(x, residual, dim, /*save_rstd=*/false, c10::DeviceType::CPU, "rms_norm_fwd_only");
  run_fwd(a, static_cast<float>(eps));
  return a.y;
}

// ------------------------------------------------------------------------------------------- bwd

template <typename T>
void bwd_rows(const T* dy, Strides3 dys, const T* y, Strides3 ys, const float* rstd, T* dx, Strides3 dxs,
              int64_t outer, int64_t N) {
  at::parallel_for(0, outer, grain_rows(N), [&](int64_t begin, int64_t end) {
    std::vector<float> prod(N);
    for (int64_t o = begin; o < end; ++o) {
      const T* dyo = dy + o * dys.o;
      const T* yo = y + o * ys.o;
      for (int64_t n = 0; n < N; ++n) prod[n] = static_cast<float>(dyo[n * dys.n]) * static_cast<float>(yo[n * ys.n]);
      const float mean_dot = sum8(prod.data(), N) / static_cast<float>(N);
      const float inv = rstd[o];
      T* dxo = dx + o * dxs.o;
      for (int64_t n = 0; n < N; ++n) {
        dxo[n * dxs.n] = static_cast<T>(
            inv * (static_cast<float>(dyo[n * dys.n]) - static_cast<float>(yo[n * ys.n]) * mean_dot));
      }
    }
  });
}

template <typename T>
void bwd_cols(const T* dy, Strides3 dys, const T* y, Strides3 ys, const float* rstd, T* dx, Strides3 dxs,
              int64_t outer, int64_t N, int64_t inner) {
  const int64_t blocks_per_outer = (inner + kColBlock - 1) / kColBlock;
  const int64_t tasks = outer * blocks_per_outer;
  at::parallel_for(0, tasks, grain_rows(N * kColBlock), [&](int64_t begin, int64_t end) {
    std::vector<float> dy_buf(N * kColBlock), y_buf(N * kColBlock);
    float* dyt = dy_buf.data();
    float* yt = y_buf.data();
    double acc[kColBlock];
    float mean_dot[kColBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / blocks_per_outer;
      const int64_t i0 = (t % blocks_per_outer) * kColBlock;
      const int64_t w = std::min(kColBlock, inner - i0);
      load_tile<T, false>(dyt, dy + o * dys.o + i0 * dys.i, dys.n, dys.i, N, w);
      load_tile<T, false>(yt, y + o * ys.o + i0 * ys.i, ys.n, ys.i, N, w);
      for (int64_t k = 0; k < w; ++k) acc[k] = 0.;
      for (int64_t n = 0; n < N; ++n) {
        const float* a = dyt + n * kColBlock;
        const float* b = yt + n * kColBlock;
        for (int64_t k = 0; k < w; ++k) acc[k] += a[k] * b[k];
      }
      for (int64_t k = 0; k < w; ++k) mean_dot[k] = static_cast<float>(acc[k]) / static_cast<float>(N);
      const float* rs = rstd + o * inner + i0;
      store_tile(dx + o * dxs.o + i0 * dxs.i, dxs.n, dxs.i, N, w, [&](int64_t n, int64_t k) {
        return rs[k] * (dyt[n * kColBlock + k] - yt[n * kColBlock + k] * mean_dot[k]);
      });
    }
  });
}

at::Tensor rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& rstd, int64_t dim) {
  auto a = trm::prepare_rms_bwd(grad_y, y, rstd, dim, c10::DeviceType::CPU, "rms_norm_bwd");
  const auto& p = a.plan;
  if (p.rows() == 0 || p.n == 0) return a.dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.y.scalar_type(), "trm_rms_norm_bwd_cpu", [&] {
    if (p.inner == 1) {
      bwd_rows<scalar_t>(a.dy.const_data_ptr<scalar_t>(), a.dys, a.y.const_data_ptr<scalar_t>(), a.ys,
                         a.rstd.const_data_ptr<float>(), a.dx.mutable_data_ptr<scalar_t>(), a.dxs, p.outer, p.n);
    } else {
      bwd_cols<scalar_t>(a.dy.const_data_ptr<scalar_t>(), a.dys, a.y.const_data_ptr<scalar_t>(), a.ys,
                         a.rstd.const_data_ptr<float>(), a.dx.mutable_data_ptr<scalar_t>(), a.dxs, p.outer, p.n,
                         p.inner);
    }
  });
  return a.dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(trm, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cpu);
  m.impl("rms_norm_fwd_only", &rms_norm_fwd_only_cpu);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cpu);
}

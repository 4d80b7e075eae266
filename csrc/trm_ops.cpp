// trm_ops.cpp -- the ONE definition of the torch.ops.trm library: every schema, no kernels.
//
// Kernels register per device in other files: csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(trm, CPU, m))
// and, when the build has CUDA, csrc/cuda/ops_cuda.cpp (TORCH_LIBRARY_IMPL(trm, CUDA, m)) with
// the device code in csrc/cuda/*.cu. Fake (meta) and autograd registrations live in Python
// (trm/ops/native.py), as does every op's user-facing signature (trm.ops.<op>).
//
// Ops (math in each kernel file's header):
//   rms_norm_fwd       (x, residual?, dim, eps) -> (y, rstd)   y = s / sqrt(mean(s^2, dim) + eps), s = x + residual
//   rms_norm_fwd_only  (x, residual?, dim, eps) -> y            same y, nothing saved (no-grad cycles)
//   rms_norm_bwd       (grad_y, y, rstd, dim)   -> grad_s       rstd * (dy - y * mean(dy * y, dim))
//   swiglu_fwd         (gate_up) -> silu(gate) * up            gate, up = gate_up.chunk(2, -1)
//   swiglu_bwd         (grad_out, gate_up) -> grad_gate_up
//   stablemax_ce_fwd   (logits, labels, ignore_index) -> per-token loss (float32)
//   stablemax_ce_bwd   (grad_loss, logits, labels, ignore_index) -> grad_logits
//   adam_atan2         (params!, grads, exp_avgs!, exp_avg_sqs!, step, lr, beta1, beta2, weight_decay)
//
// Build: ahead of time as the Python module trm._C by `pip install --no-build-isolation -e .`
//   (setup.py), or JIT by trm/ops/native.py when trm._C is absent.
// Test:  python -m pytest tests/test_ops_cpu.py tests/test_ops_cuda_build.py -q
// Time:  python -m trm.ops.native --bench

#include <Python.h>
#include <torch/library.h>

#ifndef TRM_WITH_CUDA
#define TRM_WITH_CUDA 0
#endif
#ifndef TRM_CUDA_ARCHS
#define TRM_CUDA_ARCHS none
#endif
#define TRM_STR_(x) #x
#define TRM_STR(x) TRM_STR_(x)

TORCH_LIBRARY(trm, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? residual, int dim, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_fwd_only(Tensor x, Tensor? residual, int dim, float eps) -> Tensor y");
  m.def("rms_norm_bwd(Tensor grad_y, Tensor y, Tensor rstd, int dim) -> Tensor grad_s");
  m.def("swiglu_fwd(Tensor gate_up) -> Tensor out");
  m.def("swiglu_bwd(Tensor grad_out, Tensor gate_up) -> Tensor grad_gate_up");
  m.def("stablemax_ce_fwd(Tensor logits, Tensor labels, int ignore_index) -> Tensor loss");
  m.def("stablemax_ce_bwd(Tensor grad_loss, Tensor logits, Tensor labels, int ignore_index) -> Tensor grad_logits");
  m.def(
      "adam_atan2(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "int step, float lr, float beta1, float beta2, float weight_decay) -> ()");
}

// `import trm._C` (the ahead-of-time build) loads this library; the module itself only says how
// it was built. The JIT build loads the same code with torch.ops.load_library and ignores this.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "trm._C",
                                   "trm native kernels (torch.ops.trm.*), built ahead of time by setup.py",
                                   -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "with_cuda", TRM_WITH_CUDA) != 0 ||
      PyModule_AddStringConstant(module, "cuda_archs", TRM_STR(TRM_CUDA_ARCHS)) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

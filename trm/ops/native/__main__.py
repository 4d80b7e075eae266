"""Load (or build) the native kernels and time them against the reference.

    python -m trm.ops.native [--bench] [--device cpu|cuda] [--dtype bfloat16] [--batch 64]
"""

from __future__ import annotations

import math
import time

import torch

from trm.ops import reference
from trm.ops.native import IMPLS_CPU, IMPLS_CUDA, available_cpu, available_cuda, load, status


def _median_ms(fn, repeats: int, device_type: str, warmup: int = 3) -> float:
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def bench(repeats: int = 21, device_type: str = "cpu", dtype: torch.dtype = torch.float32,
          batch: int = 64) -> dict[str, tuple[float, float]]:
    """Median ms ``{name: (native_ms, reference_ms)}`` on the shapes of a TRM step (batch x 97 x 512)."""
    ok, reason = available_cpu() if device_type == "cpu" else available_cuda()
    if not ok:
        raise RuntimeError(f"trm native {device_type} kernels are unavailable: {reason}")
    impls = IMPLS_CPU if device_type == "cpu" else IMPLS_CUDA
    dev = torch.device(device_type)
    B, L, D, V = batch, 97, 512, 11
    out: dict[str, tuple[float, float]] = {}

    def pair(name, make_fn, *args):
        out[name] = tuple(_median_ms(make_fn(fn), repeats, device_type, *args)
                          for fn in (impls[name.split()[0]], getattr(reference, name.split()[0])))

    x = torch.randn(B, L, D, device=dev, dtype=dtype)
    r = torch.randn(B, L, D, device=dev, dtype=dtype)
    leaf = x.clone().requires_grad_(True)
    dy = torch.randn_like(x)

    def rms_train(fn):
        def run():
            leaf.grad = None
            fn(leaf, 1e-5, -1, r).backward(dy)
        return run

    def rms_nograd(fn):
        def run():
            with torch.no_grad():
                fn(x, 1e-5, -1, r)
        return run

    xt = x.transpose(1, 2)                                   # the mlp_t view (B, D, L), norm over L
    rt = torch.randn(B, D, L, device=dev, dtype=dtype)

    def rms_mlp_t(fn):
        def run():
            with torch.no_grad():
                fn(xt, 1e-5, -1, rt)
        return run

    sfx = f"{B}x{L}x{D} {str(dtype).replace('torch.', '')}"
    pair(f"rms_norm fwd+bwd residual {sfx}", rms_train)
    pair(f"rms_norm no-grad residual {sfx}", rms_nograd)
    pair(f"rms_norm no-grad mlp_t view {sfx}", rms_mlp_t)
    gu = torch.randn(B, L, 2 * 4 * D // 3 // 2 * 2, device=dev, dtype=dtype).requires_grad_(True)

    def swiglu_train(fn):
        def run():
            gu.grad = None
            fn(gu).sum().backward()
        return run

    pair(f"swiglu fwd+bwd {tuple(gu.shape)} {sfx.split()[1]}", swiglu_train)
    logits = (torch.randn(B, 81, V, device=dev, dtype=dtype) * 3).requires_grad_(True)
    labels = torch.randint(0, V, (B, 81), device=dev)
    labels[:, :5] = reference.IGNORE_LABEL_ID

    def ce_train(fn):
        def run():
            logits.grad = None
            fn(logits, labels).sum().backward()
        return run

    pair(f"stablemax_cross_entropy fwd+bwd {B}x81x{V}", ce_train)
    shapes = [(512, 512)] * 8 + [(1536, 512)] * 4 + [(10, 512), (512,)]
    ps = [torch.randn(s, device=dev) for s in shapes]
    gs = [torch.randn(s, device=dev) for s in shapes]
    ms = [torch.zeros(s, device=dev) for s in shapes]
    vs = [torch.zeros(s, device=dev) for s in shapes]

    def adam(fn):
        def run():
            fn(ps, gs, ms, vs, step=3, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1)
        return run

    pair(f"adam_atan2 step {sum(math.prod(s) for s in shapes) / 1e6:.1f}M params", adam)
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    import argparse

    p = argparse.ArgumentParser(description="Load (or build) the trm native kernels; optionally time them.")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    t = time.perf_counter()
    ok = load()
    print(f"load: {ok} in {time.perf_counter() - t:.1f}s; cuda: {available_cuda()}; threads={torch.get_num_threads()}")
    print(status())
    if ok and args.bench:
        for name, (nat, ref) in bench(args.repeats, args.device, getattr(torch, args.dtype), args.batch).items():
            print(f"{name}: native {nat:.3f} ms, reference {ref:.3f} ms, reference/native {ref / nat:.2f}x")


if __name__ == "__main__":
    main()

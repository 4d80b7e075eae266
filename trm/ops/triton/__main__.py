"""Time the Triton kernels against the PyTorch reference on a CUDA GPU.

    python -m trm.ops.triton --bench [op ...]
"""

from __future__ import annotations

from typing import Callable

import torch

from trm.ops import reference
from trm.ops.triton import IMPLS
from trm.ops.triton.loader import available, interpreting

BenchCase = tuple[str, Callable[[], object], Callable[[], object]]    # (label, kernel run, reference run)


def _bench_cases(device: str, batch: int = 256) -> dict[str, list[BenchCase]]:
    """op -> [(case, run with the kernel, run with the reference)]: forward + backward, TRM shapes
    (``batch`` sequences of 97 positions, hidden 512, 8 heads of 64, vocabulary 11)."""
    B = batch
    bf16 = dict(device=device, dtype=torch.bfloat16)

    def fwd_bwd(fn, make_inputs):
        inputs = make_inputs()

        def run():
            out = fn(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward([o.float().sum() for o in outs])
        return run

    def leaf(*shape, **kw):
        return torch.randn(*shape, **{**bf16, **kw}).requires_grad_(True)

    cases: dict[str, list] = {op: [] for op in IMPLS}
    for label, make in (
        (f"{B}x97x512 bf16 +residual", lambda: (leaf(B, 97, 512), leaf(B, 97, 512))),
        (f"{B}x512x97 (over L, strided) bf16 +residual", lambda: (leaf(B, 97, 512).transpose(1, 2), leaf(B, 512, 97))),
    ):
        cases["rms_norm"].append((label, fwd_bwd(lambda x, r: IMPLS["rms_norm"](x, 1e-5, -1, r), make),
                                  fwd_bwd(lambda x, r: reference.rms_norm(x, 1e-5, -1, residual=r), make)))
    make = lambda: (leaf(B, 97, 2 * 1536),)                                       # noqa: E731
    cases["swiglu"].append((f"{B}x97x3072 bf16", fwd_bwd(IMPLS["swiglu"], make), fwd_bwd(reference.swiglu, make)))
    cos, sin = (t.to(device) for t in (torch.randn(97, 64), torch.randn(97, 64)))

    def rope_with(fn):
        return lambda qkv: fn(*qkv.view(B, 97, 24, 64).split(8, dim=2)[:2], cos, sin)

    make = lambda: (leaf(B, 97, 24 * 64),)                                        # noqa: E731
    cases["apply_rope"].append((f"{B}x97x8x64 bf16 (views of qkv)", fwd_bwd(rope_with(IMPLS["apply_rope"]), make),
                                fwd_bwd(rope_with(reference.apply_rope), make)))
    for n, L in ((B, 97), (max(1, B // 8), 916)):
        def attn_with(fn, n=n, L=L):
            return lambda qkv: fn(*qkv.view(n, L, 24, 64).split(8, dim=2))
        make = lambda n=n, L=L: (leaf(n, L, 24 * 64),)                           # noqa: E731
        cases["attention"].append((f"{n}x{L}x8x64 bf16", fwd_bwd(attn_with(IMPLS["attention"]), make),
                                   fwd_bwd(attn_with(reference.attention), make)))
    labels = torch.randint(0, 11, (3 * B, 97), device=device)
    make = lambda: (leaf(3 * B, 97, 11, dtype=torch.float32),)                   # noqa: E731
    cases["stablemax_cross_entropy"].append((
        f"{3 * B}x97x11 fp32", fwd_bwd(lambda x: IMPLS["stablemax_cross_entropy"](x, labels), make),
        fwd_bwd(lambda x: reference.stablemax_cross_entropy(x, labels), make)))
    shapes = [(512, 512)] * 12 + [(1536, 512)] * 4 + [(512, 1536)] * 4 + [(11, 512), (512,)]
    state = [[torch.randn(s, device=device) for s in shapes] for _ in range(4)]
    state[3] = [t.abs() for t in state[3]]
    step_args = dict(step=10, lr=1e-4, beta1=0.9, beta2=0.95, weight_decay=0.1)
    cases["adam_atan2"].append((f"{len(shapes)} tensors, {sum(t.numel() for t in state[0]) / 1e6:.1f}M fp32",
                                lambda: IMPLS["adam_atan2"](*state, **step_args),
                                lambda: reference.adam_atan2(*state, **step_args)))
    return cases


def main(argv: list[str] | None = None) -> None:
    """Print kernel vs reference times (median ms, triton.testing.do_bench) on a CUDA GPU."""
    import argparse

    parser = argparse.ArgumentParser(description="Time the Triton kernels against the PyTorch reference.")
    parser.add_argument("--bench", nargs="*", metavar="OP", help=f"ops to time (default all): {', '.join(IMPLS)}")
    args = parser.parse_args(argv)
    ok, why = available()
    if not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA GPU; none is visible")
    if not ok or interpreting():
        raise SystemExit(f"timing needs the compiled kernels: {why or 'unset TRITON_INTERPRET'}")
    if args.bench is None:
        parser.print_help()
        return
    from triton.testing import do_bench

    unknown = set(args.bench) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown op(s) {sorted(unknown)}; ops: {', '.join(IMPLS)}")
    print(f"{'op':<24} {'case':<44} {'triton ms':>10} {'torch ms':>10} {'speedup':>8}")
    for op, cases in _bench_cases("cuda").items():
        if args.bench and op not in args.bench:
            continue
        for label, ours, theirs in cases:
            t_ours, t_ref = do_bench(ours), do_bench(theirs)
            print(f"{op:<24} {label:<44} {t_ours:>10.3f} {t_ref:>10.3f} {t_ref / t_ours:>7.2f}x")


if __name__ == "__main__":
    main()

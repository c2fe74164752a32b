"""``triton-losses check``: every registered op on this device against torch, on random inputs.

For each op and size, the output and the input gradients of ours are compared with torch's in
float64 (the truth). The error budget is that of the tests (DESIGN.md): ours may be off by at most
twice torch's own error in the same dtype, plus ``eps · (1 + |truth|)``.
"""

from __future__ import annotations

import torch

from .providers import ours_backend
from .registry import Case, Op, Size, get_ops

# Slack per dtype, relative to the truth's magnitude (as in tests/helpers.py).
EPS = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run(fn, case: Case) -> list[torch.Tensor]:
    """The output and the gradients of the inputs that require grad."""
    out = fn(*case.args)
    grads = torch.autograd.grad(out, case.grad_inputs, case.grad_out)
    return [out.detach(), *grads]


def _as64(case: Case) -> Case:
    def cast(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().double().requires_grad_(a.requires_grad)
        return a

    return Case(tuple(cast(a) for a in case.args), None if case.grad_out is None else case.grad_out.double())


def check_one(op: Op, size: Size, dtype: torch.dtype, device: torch.device) -> dict:
    """``{"ok", "max_err", "worst_ratio", "torch_err"}``; ``worst_ratio`` = the largest error / budget."""
    torch.manual_seed(0)
    case = op.inputs(size, dtype, device)
    ours = _run(op.ours, case)
    low = _run(op.torch, case)
    truth = _run(op.torch, _as64(case))
    max_err = torch_err = worst = 0.0
    ok = True
    for o, t, r in zip(ours, low, truth):
        o, t = o.double(), t.double()
        same_nan = torch.equal(o.isnan(), r.isnan())
        fin = r.isfinite() & o.isfinite()
        err = (o - r).abs()[fin]
        budget = 2 * (t - r).abs()[fin] + EPS[dtype] * (1 + r.abs()[fin])
        ok &= same_nan and torch.equal(o.isinf(), r.isinf()) and bool((err <= budget).all())
        if err.numel():
            max_err = max(max_err, err.max().item())
            torch_err = max(torch_err, (t - r).abs()[fin].max().item())
            worst = max(worst, (err / budget).max().item())
    return {"ok": ok, "max_err": max_err, "torch_err": torch_err, "worst_ratio": worst}


def run_check(device: torch.device, dtypes: list[torch.dtype], ops: list[str] | None = None) -> int:
    """Print pass/fail per op, dtype and size; return the exit status (1 if anything failed)."""
    print(f"triton-losses check on {device}: ours runs {ours_backend(device)}")
    print(f"{'op':<34} {'dtype':<9} {'size':<12} {'max |err|':>10} {'torch err':>10} {'err/budget':>10}  result")
    failed = 0
    for op in get_ops(ops):
        for dtype in dtypes:
            for size in op.check_sizes:
                name = str(dtype).removeprefix("torch.")
                try:
                    r = check_one(op, size, dtype, device)
                except Exception as e:
                    failed += 1
                    print(f"{op.name:<34} {name:<9} {size.label:<12} FAIL  {type(e).__name__}: {e}".rstrip())
                    continue
                failed += not r["ok"]
                print(
                    f"{op.name:<34} {name:<9} {size.label:<12} {r['max_err']:>10.2e} {r['torch_err']:>10.2e} "
                    f"{r['worst_ratio']:>10.3f}  {'pass' if r['ok'] else 'FAIL'}"
                )
    print("all passed" if not failed else f"{failed} failed")
    return 1 if failed else 0

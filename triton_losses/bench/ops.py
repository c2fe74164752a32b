"""The ops the benchmark and ``triton-losses check`` know, registered in one place.

To add an op: write (or reuse) an input builder ``(size, dtype, device) -> Case`` and call
:func:`register` with ours / torch callables and the bytes the op must move, e.g.::

    register(Op(
        name="my_loss",
        inputs=logits_and_index_target,
        ours=lambda x, t: triton_losses.my_loss(x, t),
        torch=lambda x, t: F.my_loss(x, t),
        # fwd reads x; bwd reads x, writes dx; fused fwd+bwd reads x once and writes dx once.
        bytes_moved=lambda s, b: {"fwd": s.N * s.V * b, "bwd": 2 * s.N * s.V * b, "fwd+bwd": 2 * s.N * s.V * b},
        bytes_note="fwd N·V·b; bwd 2·N·V·b; fwd+bwd 2·N·V·b",
    ))

Byte counts are the floor an ideal implementation
must move (``b`` = bytes per element of the benchmark dtype, targets int64); every provider is
measured against the same count, so GB/s compares times and the ratio to the copy bandwidth says
how close to the memory-bound floor a provider gets.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch
import torch.nn.functional as F

import triton_losses

from .registry import Case, Op, Size, register

# ----------------------------------------------------------------------------------------------
# Input builders: (size, dtype, device) -> Case. Values are drawn at random, never zeros.


def logits_and_index_target(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Logits ``(N, V)`` requiring grad, int64 class targets ``(N,)``."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    return Case((x, torch.randint(0, s.V, (s.N,), device=device)))


def logprobs_and_index_target(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Log-probabilities ``(N, V)`` requiring grad, int64 class targets ``(N,)``."""
    x = torch.randn(s.N, s.V, device=device).log_softmax(-1).to(dtype).requires_grad_()
    return Case((x, torch.randint(0, s.V, (s.N,), device=device)))


def logits_and_upstream(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Logits ``(N, V)`` requiring grad; a random upstream gradient ``(N, V)`` for the backward."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    return Case((x,), grad_out=torch.randn_like(x))


def probs_and_soft_targets(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Probabilities in (0, 1) ``(N, V)`` requiring grad, soft targets in [0, 1) of the same shape."""
    x = torch.randn(s.N, s.V, device=device).sigmoid().to(dtype).requires_grad_()
    return Case((x, torch.rand(s.N, s.V, dtype=dtype, device=device)))


def logits_and_soft_targets(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Logits ``(N, V)`` requiring grad, soft targets in [0, 1) of the same shape."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    return Case((x, torch.rand(s.N, s.V, dtype=dtype, device=device)))


def logprobs_and_probs(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Log-probabilities ``(N, V)`` requiring grad, target probabilities ``(N, V)`` (rows sum to 1)."""
    x = torch.randn(s.N, s.V, device=device).log_softmax(-1).to(dtype).requires_grad_()
    return Case((x, torch.randn(s.N, s.V, device=device).softmax(-1).to(dtype)))


def two_logprobs(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Student log-probabilities ``(N, V)`` requiring grad, teacher log-probabilities ``(N, V)``."""
    x = torch.randn(s.N, s.V, device=device).log_softmax(-1).to(dtype).requires_grad_()
    return Case((x, torch.randn(s.N, s.V, device=device).log_softmax(-1).to(dtype)))


def two_logits(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Student logits ``(N, V)`` requiring grad, teacher logits ``(N, V)``."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    return Case((x, torch.randn(s.N, s.V, dtype=dtype, device=device)))


def hidden_weight_target(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Hidden states ``(N, H)`` and the LM head ``(V, H)``, both requiring grad; targets ``(N,)``."""
    assert s.H is not None, "linear ops need a hidden size H"
    h = torch.randn(s.N, s.H, dtype=dtype, device=device).requires_grad_()
    w = (torch.randn(s.V, s.H, device=device) * s.H**-0.5).to(dtype).requires_grad_()
    return Case((h, w, torch.randint(0, s.V, (s.N,), device=device)))


# ----------------------------------------------------------------------------------------------
# torch references for the extras torch.nn.functional does not have.


def jsd_torch(input: torch.Tensor, target: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD of log-probability rows, 'batchmean': ``β·KL(P‖M) + (1-β)·KL(Q‖M)``, ``M = βP + (1-β)Q``.

    ``Q = exp(input)`` (student), ``P = exp(target)`` (teacher); ``0 < beta < 1``.
    """
    log_m = torch.logaddexp(target + math.log(beta), input + math.log1p(-beta))
    kl_p = F.kl_div(log_m, target, reduction="sum", log_target=True)
    kl_q = F.kl_div(log_m, input, reduction="sum", log_target=True)
    return (beta * kl_p + (1 - beta) * kl_q) / input.shape[0]


def kl_div_with_logits_torch(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(teacher) ‖ softmax(student))`` per row, 'batchmean', temperature 1."""
    return F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), reduction="batchmean", log_target=True)


def _liger(name: str, **kwargs):
    """A loader of ``liger_kernel.transformers.functional.<name>`` with ``kwargs`` bound."""

    def load():
        fn = getattr(importlib.import_module("liger_kernel.transformers.functional"), name)
        return functools.partial(fn, **kwargs) if kwargs else fn

    return load


# ----------------------------------------------------------------------------------------------
# The ops. b = bytes per element of the benchmark dtype; targets are int64 (8 bytes); E = N·V.

register(
    Op(
        name="cross_entropy",
        inputs=logits_and_index_target,
        ours=lambda x, t: triton_losses.cross_entropy(x, t),
        torch=lambda x, t: F.cross_entropy(x, t),
        # fwd: read the logits and the targets (the loss is a scalar).
        # bwd: read the logits, the targets and the saved fp32 lse; write the gradient.
        # fwd+bwd: the floor: read the logits once, write the gradient once (the gradient can be
        # computed in the forward while the row is on chip).
        bytes_moved=lambda s, b: {
            "fwd": s.N * s.V * b + 8 * s.N,
            "bwd": 2 * s.N * s.V * b + 12 * s.N,
            "fwd+bwd": 2 * s.N * s.V * b + 8 * s.N,
        },
        bytes_note="fwd N·V·b + 8N (logits, targets); bwd 2·N·V·b + 12N (+ gradient, lse); "
        "fwd+bwd 2·N·V·b + 8N (read logits once, write gradient once)",
        liger=_liger("liger_cross_entropy"),
    )
)

register(
    Op(
        name="nll_loss",
        inputs=logprobs_and_index_target,
        ours=lambda x, t: triton_losses.nll_loss(x, t),
        torch=lambda x, t: F.nll_loss(x, t),
        # fwd: read the targets and gather one element per row (N·b); a scalar out.
        # bwd: read the targets, write the whole gradient (zeros but one element per row).
        # fwd+bwd: both; nothing is shared.
        bytes_moved=lambda s, b: {
            "fwd": 8 * s.N + s.N * b,
            "bwd": 8 * s.N + s.N * s.V * b,
            "fwd+bwd": 16 * s.N + s.N * b + s.N * s.V * b,
        },
        bytes_note="fwd 8N + N·b (targets, one gathered element per row); bwd 8N + N·V·b (write the gradient); "
        "fwd+bwd the sum",
    )
)

for _name, _torch_fn in (("log_softmax", torch.log_softmax), ("softmax", torch.softmax)):
    register(
        Op(
            name=_name,
            inputs=logits_and_upstream,
            ours=functools.partial(getattr(triton_losses, _name), dim=-1),
            torch=functools.partial(_torch_fn, dim=-1),
            # fwd: read x, write y. bwd: read y and the upstream gradient, write dx.
            # fwd+bwd: 5·N·V·b; the backward cannot start before the upstream gradient exists.
            bytes_moved=lambda s, b: {"fwd": 2 * s.N * s.V * b, "bwd": 3 * s.N * s.V * b, "fwd+bwd": 5 * s.N * s.V * b},
            bytes_note="fwd 2·N·V·b (read x, write y); bwd 3·N·V·b (read y, dy; write dx); fwd+bwd 5·N·V·b",
            liger=_liger("liger_softmax") if _name == "softmax" else None,
        )
    )

# Elementwise losses over N·V elements: fwd reads input and target; bwd reads both and writes the
# gradient; fused fwd+bwd reads both once and writes the gradient once.
_ELEMENTWISE = lambda s, b: {"fwd": 2 * s.N * s.V * b, "bwd": 3 * s.N * s.V * b, "fwd+bwd": 3 * s.N * s.V * b}
_ELEMENTWISE_NOTE = "fwd 2·E·b (input, target); bwd 3·E·b (+ gradient); fwd+bwd 3·E·b; E = N·V elements"

register(
    Op(
        name="binary_cross_entropy_with_logits",
        inputs=logits_and_soft_targets,
        ours=lambda x, t: triton_losses.binary_cross_entropy_with_logits(x, t),
        torch=lambda x, t: F.binary_cross_entropy_with_logits(x, t),
        bytes_moved=_ELEMENTWISE,
        bytes_note=_ELEMENTWISE_NOTE,
    )
)

register(
    Op(
        name="binary_cross_entropy",
        inputs=probs_and_soft_targets,
        ours=lambda x, t: triton_losses.binary_cross_entropy(x, t),
        torch=lambda x, t: F.binary_cross_entropy(x, t),
        bytes_moved=_ELEMENTWISE,
        bytes_note=_ELEMENTWISE_NOTE,
    )
)

register(
    Op(
        name="kl_div",
        inputs=logprobs_and_probs,
        ours=lambda x, t: triton_losses.kl_div(x, t, reduction="batchmean"),
        torch=lambda x, t: F.kl_div(x, t, reduction="batchmean"),
        # fwd: read input and target. bwd: the gradient -target/N needs only the target: read it,
        # write the gradient. fwd+bwd: read both once, write the gradient once.
        bytes_moved=lambda s, b: {"fwd": 2 * s.N * s.V * b, "bwd": 2 * s.N * s.V * b, "fwd+bwd": 3 * s.N * s.V * b},
        bytes_note="fwd 2·N·V·b (input, target); bwd 2·N·V·b (target, gradient); fwd+bwd 3·N·V·b",
        liger=_liger("liger_kl_div", reduction="batchmean"),
    )
)

register(
    Op(
        name="jsd",
        inputs=two_logprobs,
        ours=lambda x, t: triton_losses.jsd(x, t, beta=0.5),
        torch=lambda x, t: jsd_torch(x, t, beta=0.5),
        # fwd: read both rows. bwd: the gradient needs both rows: read them, write it.
        # fwd+bwd: read both once, write the gradient once.
        bytes_moved=lambda s, b: {"fwd": 2 * s.N * s.V * b, "bwd": 3 * s.N * s.V * b, "fwd+bwd": 3 * s.N * s.V * b},
        bytes_note="fwd 2·N·V·b (both log-prob rows); bwd 3·N·V·b (+ gradient); fwd+bwd 3·N·V·b",
        liger=_liger("liger_jsd", beta=0.5),
    )
)

register(
    Op(
        name="kl_div_with_logits",
        inputs=two_logits,
        ours=lambda s, t: triton_losses.kl_div_with_logits(s, t),
        torch=kl_div_with_logits_torch,
        # fwd: read both logit rows (the two log-softmaxes are computed on chip). bwd: read both
        # again (or use saved lse), write the student's gradient. fwd+bwd: read both once, write once.
        bytes_moved=lambda s, b: {"fwd": 2 * s.N * s.V * b, "bwd": 3 * s.N * s.V * b, "fwd+bwd": 3 * s.N * s.V * b},
        bytes_note="fwd 2·N·V·b (student, teacher logits); bwd 3·N·V·b (+ student gradient); fwd+bwd 3·N·V·b",
    )
)

register(
    Op(
        name="linear_cross_entropy",
        inputs=hidden_weight_target,
        ours=lambda h, w, t: triton_losses.linear_cross_entropy(h, w, t),
        torch=lambda h, w, t: F.cross_entropy(F.linear(h, w), t),
        # Never the N·V logits: fwd reads hidden (N·H) and the head (V·H) and the targets;
        # bwd reads them again and writes their gradients; fwd+bwd: read once, write the gradients once.
        bytes_moved=lambda s, b: {
            "fwd": (s.N + s.V) * s.H * b + 8 * s.N,
            "bwd": 2 * (s.N + s.V) * s.H * b + 8 * s.N,
            "fwd+bwd": 2 * (s.N + s.V) * s.H * b + 8 * s.N,
        },
        bytes_note="fwd (N+V)·H·b + 8N; bwd and fwd+bwd 2·(N+V)·H·b + 8N (no N·V logits)",
        axes=("N", "V", "H"),
        # logits 2·N·H·V; backward: grad_input and grad_weight, 2·N·H·V each.
        flops=lambda s: {"fwd": 2 * s.N * s.H * s.V, "bwd": 4 * s.N * s.H * s.V, "fwd+bwd": 6 * s.N * s.H * s.V},
        liger=_liger("liger_fused_linear_cross_entropy"),
        check_sizes=(Size(64, 1000, 32), Size(8, 50257, 16)),
    )
)

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

import dataclasses
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

for _name, _inputs in (
    ("binary_cross_entropy_with_logits", logits_and_soft_targets),
    ("binary_cross_entropy", probs_and_soft_targets),
):
    register(
        Op(
            name=_name,
            inputs=_inputs,
            ours=getattr(triton_losses, _name),
            torch=getattr(F, _name),
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

# ---- logprobs: per-token log-probabilities and entropy (RL policy losses) ----------------------


def _logits_tokens_upstream(rows_out: int):
    """Logits ``(N, V)`` requiring grad, int64 tokens ``(N,)``, an fp32 upstream ``(N,)`` or ``(2, N)``."""

    def build(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
        x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
        up = torch.randn(*((rows_out,) if rows_out > 1 else ()), s.N, device=device)
        return Case((x, torch.randint(0, s.V, (s.N,), device=device)), grad_out=up)

    return build


def _hidden_head_tokens_upstream(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Hidden states ``(N, H)`` and the LM head ``(V, H)`` requiring grad, tokens ``(N,)``, an upstream ``(2, N)``."""
    case = hidden_weight_target(s, dtype, device)
    return Case(case.args, grad_out=torch.randn(2, s.N, device=device))


def _torch_token_logprobs(x: torch.Tensor, t: torch.Tensor, entropy: bool) -> torch.Tensor:
    """Eager torch: log-softmax in fp32 (fp64 for fp64), gathered; with ``entropy`` stacked with the entropy."""
    logp_all = torch.log_softmax(x.to(torch.promote_types(x.dtype, torch.float32)), -1)
    logp = logp_all.gather(-1, t[:, None])[:, 0]
    return torch.stack((logp, -(logp_all.exp() * logp_all).sum(-1))) if entropy else logp


register(
    Op(
        name="token_logprobs",
        inputs=_logits_tokens_upstream(1),
        ours=lambda x, t: triton_losses.token_logprobs(x, t),
        torch=lambda x, t: _torch_token_logprobs(x, t, False),
        # fwd: read the logits once (one online pass per row) and the tokens; write 4 fp32 per row
        # (logp, max, sum; entropy slot unused). bwd: read the logits, the row stats and the
        # upstream gradient, write the gradient. The upstream gradient of a per-token output is
        # only known in the backward, so fwd+bwd reads the logits twice.
        bytes_moved=lambda s, b: {
            "fwd": s.N * s.V * b + 8 * s.N + 12 * s.N,
            "bwd": 2 * s.N * s.V * b + 8 * s.N + 12 * s.N,
            "fwd+bwd": 3 * s.N * s.V * b + 16 * s.N + 24 * s.N,
        },
        bytes_note="fwd N·V·b + 20N (logits, tokens, row stats); bwd 2·N·V·b + 20N (+ gradient); fwd+bwd 3·N·V·b + 40N",
    )
)

register(
    Op(
        name="token_logprobs_entropy",
        inputs=_logits_tokens_upstream(2),
        ours=lambda x, t: torch.stack(triton_losses.token_logprobs(x, t, return_entropy=True)),
        torch=lambda x, t: _torch_token_logprobs(x, t, True),
        # As token_logprobs, with the entropy written (fwd) and its saved value and upstream
        # gradient read (bwd): 8N bytes more each way.
        bytes_moved=lambda s, b: {
            "fwd": s.N * s.V * b + 24 * s.N,
            "bwd": 2 * s.N * s.V * b + 28 * s.N,
            "fwd+bwd": 3 * s.N * s.V * b + 52 * s.N,
        },
        bytes_note="fwd N·V·b + 24N; bwd 2·N·V·b + 28N; fwd+bwd 3·N·V·b + 52N (logits read twice)",
    )
)

register(
    Op(
        name="linear_token_logprobs",
        inputs=_hidden_head_tokens_upstream,
        ours=lambda h, w, t: torch.stack(triton_losses.linear_token_logprobs(h, w, t, return_entropy=True)),
        torch=lambda h, w, t: _torch_token_logprobs(F.linear(h, w), t, True),
        # Never the N·V logits: fwd reads hidden (N·H), the head (V·H) and the tokens, writes 4 fp32
        # per row; bwd reads them again and writes the hidden and head gradients.
        bytes_moved=lambda s, b: {
            "fwd": (s.N + s.V) * s.H * b + 24 * s.N,
            "bwd": 2 * (s.N + s.V) * s.H * b + 28 * s.N,
            "fwd+bwd": 3 * (s.N + s.V) * s.H * b + 52 * s.N,
        },
        bytes_note="fwd (N+V)·H·b + 24N; bwd 2·(N+V)·H·b + 28N; fwd+bwd 3·(N+V)·H·b + 52N (no N·V logits)",
        axes=("N", "V", "H"),
        # logits 2·N·H·V in the forward and again in the backward, then grad_input and grad_weight.
        flops=lambda s: {"fwd": 2 * s.N * s.H * s.V, "bwd": 6 * s.N * s.H * s.V, "fwd+bwd": 8 * s.N * s.H * s.V},
        check_sizes=(Size(64, 1000, 32), Size(8, 50257, 16)),
    )
)

# ----------------------------------------------------------------------------------------------
# CTC. A CTC problem has four axes, (T, N, C, S) = (input length, batch, classes, target length),
# which the (N, V, H) grid of the other ops does not describe: the op runs at its own sizes,
# _CTCSize(N=batch, V=C, H=T, S=...) (tables show N, V, H; the label names all four), whatever
# ``--sizes`` says. W = 2S + 1 extended states.


@dataclasses.dataclass(frozen=True)
class _CTCSize(Size):
    """A CTC problem: ``N`` sequences of ``H`` frames over ``V`` classes, targets of ``S`` labels."""

    S: int = 0

    @property
    def label(self) -> str:
        return f"T{self.H}xN{self.N}xC{self.V}xS{self.S}"


@dataclasses.dataclass(frozen=True)
class _FixedSizeOp(Op):
    """An op that runs at its own sizes (``bench_sizes``), not at the generic grid's."""

    bench_sizes: tuple[Size, ...] = ()

    def sizes_for(self, sizes: list[Size], hidden: list[int]) -> list[Size]:
        return list(self.bench_sizes)


def ctc_inputs(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Log-probabilities ``(T, N, C)`` requiring grad, padded targets ``(N, S)`` (no blank), full-length
    inputs, target lengths in ``[S/2, S]``: ``N, V, H = N, C, T``; a plain ``Size`` has ``T = H or 100``,
    ``S = T/5``."""
    T = s.H or 100
    S = s.S if isinstance(s, _CTCSize) else T // 5
    lp = torch.randn(T, s.N, s.V, device=device).log_softmax(2).to(dtype).requires_grad_()
    targets = torch.randint(1, s.V, (s.N, S), device=device)
    il = torch.full((s.N,), T, device=device)
    tl = torch.randint(S // 2, S + 1, (s.N,), device=device)
    return Case((lp, targets, il, tl))


def _ctc_torch(lp, targets, il, tl):
    """torch's ctc_loss; fp16 / bf16 computed in fp32 (torch's CPU op refuses them) and rounded."""
    if lp.dtype in (torch.float16, torch.bfloat16):
        return F.ctc_loss(lp.float(), targets, il, tl).to(lp.dtype)
    return F.ctc_loss(lp, targets, il, tl)


def _ctc_bytes(s: Size, b: int) -> dict[str, int]:
    # E = T·N·C log-probabilities; A = T·N·W fp32 forward variables.
    # fwd: gather the W label entries of each frame (at most E) and write alpha for the backward.
    # bwd: read every log-probability (the exp(lp) term) and alpha, write the gradient.
    # fwd+bwd (fused): the gathers, alpha written and read back once, lp read once, gradient written once.
    T = s.H or 100
    S = s.S if isinstance(s, _CTCSize) else T // 5
    E, A = T * s.N * s.V, T * s.N * (2 * S + 1)
    gathered = min(E, A) * b
    return {"fwd": gathered + 4 * A, "bwd": 2 * E * b + 4 * A, "fwd+bwd": gathered + 8 * A + 2 * E * b}


register(
    _FixedSizeOp(
        name="ctc_loss",
        inputs=ctc_inputs,
        ours=lambda lp, t, il, tl: triton_losses.ctc_loss(lp, t, il, tl),
        torch=_ctc_torch,
        bytes_moved=_ctc_bytes,
        bytes_note="E = T·N·C, A = T·N·(2S+1) fp32 alphas: fwd min(E, A)·b + 4A; bwd 2·E·b + 4A; "
        "fwd+bwd min(E, A)·b + 8A + 2·E·b",
        axes=("N", "V", "H"),
        check_sizes=(_CTCSize(4, 20, 50, S=10), _CTCSize(2, 500, 30, S=8)),
        bench_sizes=(_CTCSize(32, 1024, 1000, S=200), _CTCSize(64, 10000, 300, S=80)),
    )
)


# ---- regression and margin: elementwise losses over E = N·V elements --------------------------


def _pred_and_target(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Predictions ``(N, V)`` requiring grad, targets ``(N, V)`` (non-negative, so they also serve Poisson)."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    return Case((x, torch.rand(s.N, s.V, dtype=dtype, device=device) * 3))


def _pred_target_var(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Means ``(N, V)`` requiring grad, samples ``(N, V)``, positive variances ``(N, V)``."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    y = torch.randn(s.N, s.V, dtype=dtype, device=device)
    return Case((x, y, torch.rand(s.N, s.V, dtype=dtype, device=device) + 0.1))


def _scores_and_labels(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Scores ``(N, V)`` requiring grad, +-1 labels ``(N, V)`` in the same dtype."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    return Case((x, torch.randint(0, 2, (s.N, s.V), device=device).to(dtype) * 2 - 1))


def _two_scores_and_labels(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Two score tensors ``(N, V)`` (the first requiring grad) and +-1 labels ``(N, V)``."""
    x1 = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    x2 = torch.randn(s.N, s.V, dtype=dtype, device=device)
    return Case((x1, x2, torch.randint(0, 2, (s.N, s.V), device=device).to(dtype) * 2 - 1))


# Three operands (gaussian's var, ranking's second input): fwd reads three; bwd reads three and
# writes the gradient; fused fwd+bwd reads three once and writes the gradient once.
_ELEMENTWISE3 = lambda s, b: {"fwd": 3 * s.N * s.V * b, "bwd": 4 * s.N * s.V * b, "fwd+bwd": 4 * s.N * s.V * b}
_ELEMENTWISE3_NOTE = "fwd 3·E·b (three operands); bwd 4·E·b (+ gradient); fwd+bwd 4·E·b; E = N·V elements"

for _name, _kwargs, _inputs in (
    ("l1_loss", {}, _pred_and_target),
    ("mse_loss", {}, _pred_and_target),
    ("smooth_l1_loss", {"beta": 0.5}, _pred_and_target),
    ("huber_loss", {"delta": 0.5}, _pred_and_target),
    ("poisson_nll_loss", {"full": True}, _pred_and_target),
    ("soft_margin_loss", {}, _scores_and_labels),
    ("hinge_embedding_loss", {"margin": 0.5}, _scores_and_labels),
):
    register(
        Op(
            name=_name,
            inputs=_inputs,
            ours=functools.partial(getattr(triton_losses, _name), **_kwargs),
            torch=functools.partial(getattr(F, _name), **_kwargs),
            # the input and the target read; the input's gradient written (fused: in the forward's pass).
            bytes_moved=_ELEMENTWISE,
            bytes_note=_ELEMENTWISE_NOTE,
        )
    )

for _name, _inputs in (("gaussian_nll_loss", _pred_target_var), ("margin_ranking_loss", _two_scores_and_labels)):
    register(
        Op(
            name=_name,
            inputs=_inputs,
            ours=getattr(triton_losses, _name),
            torch=getattr(F, _name),
            bytes_moved=_ELEMENTWISE3,
            bytes_note=_ELEMENTWISE3_NOTE,
        )
    )


# ---- multi_margin and embedding: row losses over N rows of V classes / features, E = N·V --------


def _labels_per_row(s: Size) -> int:
    """Classes listed per multilabel row in the benchmark: 4 (fewer for tiny rows)."""
    return max(1, min(4, s.V // 2))


def _logits_and_multilabels(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Logits ``(N, V)`` requiring grad, 0/1 multilabel targets ``(N, V)`` in the same dtype."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    return Case((x, torch.randint(0, 2, (s.N, s.V), device=device).to(dtype)))


def _scores_and_label_lists(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Scores ``(N, V)`` requiring grad, int64 target lists ``(N, V)``: ``_labels_per_row`` classes, then -1."""
    x = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    k = _labels_per_row(s)
    y = torch.randint(0, s.V, (s.N, s.V), device=device)
    y[:, k : k + 1] = -1
    return Case((x, y))


def _two_embeddings_and_signs(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Two embeddings ``(N, V)`` requiring grad, +-1 int64 targets ``(N,)``."""
    x1 = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    x2 = torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_()
    return Case((x1, x2, torch.randint(0, 2, (s.N,), device=device) * 2 - 1))


def _triplet(s: Size, dtype: torch.dtype, device: torch.device) -> Case:
    """Anchors, positives and negatives ``(N, V)``, all requiring grad."""
    return Case(tuple(torch.randn(s.N, s.V, dtype=dtype, device=device).requires_grad_() for _ in range(3)))


def _fp32_on_cpu(fn):
    """torch's op, in fp32 for fp16 / bf16 CPU inputs (its CPU kernels refuse them), rounded back."""

    def run(x, *rest):
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            return fn(x.float(), *rest).to(x.dtype)
        return fn(x, *rest)

    return run


_ROW_OPS = (
    # name, inputs, torch, bytes {mode: bytes}, note. Floors: every input row read once; the fused
    # fwd+bwd writes each gradient once in the same pass; the backward alone reads the inputs again.
    ("multilabel_soft_margin_loss", _logits_and_multilabels, F.multilabel_soft_margin_loss,
     lambda s, b: {"fwd": 2 * s.N * s.V * b, "bwd": 3 * s.N * s.V * b, "fwd+bwd": 3 * s.N * s.V * b},
     "x and targets read (2·E·b); + dx written (3·E·b)"),
    ("multi_margin_loss", logits_and_index_target, _fp32_on_cpu(F.multi_margin_loss),
     lambda s, b: {"fwd": s.N * s.V * b + 8 * s.N, "bwd": 2 * s.N * s.V * b + 8 * s.N,
                   "fwd+bwd": 2 * s.N * s.V * b + 8 * s.N},
     "x read (E·b) + int64 targets (8·N); + dx written (2·E·b + 8·N)"),
    # the target lists are read up to their -1 (k + 1 entries of int64 per row), not whole
    ("multilabel_margin_loss", _scores_and_label_lists, _fp32_on_cpu(F.multilabel_margin_loss),
     lambda s, b: {m: f * s.N * s.V * b + 8 * s.N * (_labels_per_row(s) + 1)
                   for m, f in (("fwd", 1), ("bwd", 2), ("fwd+bwd", 2))},
     "x read (E·b) + each target list up to its -1 (8·N·(k+1), k = 4); + dx written (2·E·b)"),
    ("cosine_embedding_loss", _two_embeddings_and_signs, F.cosine_embedding_loss,
     lambda s, b: {"fwd": 2 * s.N * s.V * b + 8 * s.N, "bwd": 4 * s.N * s.V * b + 8 * s.N,
                   "fwd+bwd": 4 * s.N * s.V * b + 8 * s.N},
     "x1, x2 read (2·E·b) + targets (8·N); + dx1, dx2 written (4·E·b + 8·N)"),
    ("triplet_margin_loss", _triplet, F.triplet_margin_loss,
     lambda s, b: {"fwd": 3 * s.N * s.V * b, "bwd": 6 * s.N * s.V * b, "fwd+bwd": 6 * s.N * s.V * b},
     "a, p, n read (3·E·b); + three gradients written (6·E·b)"),
    ("triplet_margin_with_distance_loss", _triplet, F.triplet_margin_with_distance_loss,
     lambda s, b: {"fwd": 3 * s.N * s.V * b, "bwd": 6 * s.N * s.V * b, "fwd+bwd": 6 * s.N * s.V * b},
     "distance_function=None (pairwise_distance): as triplet_margin_loss"),
)  # fmt: skip

for _name, _inputs, _torch_fn, _bytes, _note in _ROW_OPS:
    register(
        Op(
            name=_name,
            inputs=_inputs,
            ours=getattr(triton_losses, _name),
            torch=_torch_fn,
            bytes_moved=_bytes,
            bytes_note=_note,
        )
    )

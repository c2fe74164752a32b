"""Vocabulary-parallel cross-entropy over ``torch.distributed``: the logits' classes split across ranks.

Every rank holds the logits of a contiguous slice of the classes (slices in rank order, sizes free
to differ). The engine's ``ce_partial`` reads the slice once and gives per-row local sums; two
all-reduces of ``O(rows)`` values make them global:

1. MAX of the local row maxima ``m_r`` -> the global maximum ``M``;
2. one SUM of ``[s_r * exp(m_r - M), target logit, sum_c w_c x_c, sum_c w_c t_c, sum_c w_c t_c x_c]``
   (only the columns the options need), from which every rank computes the same per-row loss.

The backward needs no communication: the engine's ``ce_bwd`` writes the slice's gradient from the
global statistics ``(M, S, S1)`` with the slice's bounds in the ``CESpec``. For a plain tensor the
bounds come from one all-gather of the ranks' class counts (``world_size`` integers): on the
kernels they stay on the device (``CESpec.bounds``, read by the kernels; no host sync), the
reference reads them back. A ``DTensor``'s placement gives them as integers (no communication).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _dispatch
from ._checks import FLOAT_DTYPES, autocast_linear, ce_views, check_target_range, eager_checks
from ._precision import acc_dtype
from .options import CEOptions, CESpec
from .reference.cross_entropy import PARTIAL_COLUMNS

__all__ = ["cross_entropy", "is_class_sharded", "is_row_sharded", "linear_cross_entropy", "slice_bounds"]


def slice_bounds(local_classes: int, group, device: torch.device, on_host: bool = True):
    """This rank's first global class and the global class count, from one all-gather of the counts.

    Args:
        local_classes: the class count of this rank's slice.
        group: the ``ProcessGroup`` the classes are split over (slices in rank order).
        device: where the collective runs (the logits' device: CPU for gloo, CUDA for NCCL).
        on_host: read the counts back (``(offset, total)`` as integers), or keep them on the device:
            a ``(2,)`` int64 tensor ``[offset, total]`` (no host sync).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.full((1,), local_classes, dtype=torch.int64, device=device)  # not built from host data
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(sizes, mine, group=group)
    if on_host:
        counts = sizes.tolist()
        return sum(counts[:rank]), sum(counts)
    return torch.stack((sizes[:rank].sum(), sizes.sum()))


def _spec(weight, opts: CEOptions, bounds) -> CESpec:
    """The ``CESpec`` of a slice given as ``(offset, total)`` integers or as device ``bounds``."""
    if isinstance(bounds, torch.Tensor):
        return CESpec(weight, None, *opts, bounds=bounds)
    return CESpec(weight, None, *opts, *bounds)


def _total(bounds):
    """The global class count: an integer, or a 0-d device tensor."""
    return bounds[1]


def _class_shard_dim(x) -> int | None:
    """The mesh dimension on which DTensor ``x`` is ``Shard(class_dim)``, or None."""
    from torch.distributed.tensor import Replicate, Shard

    cdim = 1 if x.dim() >= 2 else 0
    found = None
    for i, p in enumerate(x.placements):
        if isinstance(p, Shard) and p.dim % x.dim() == cdim:
            found = i
        elif not isinstance(p, Replicate):
            raise NotImplementedError(
                f"triton_losses.cross_entropy: a DTensor input must be Shard({cdim}) on one mesh dimension and "
                f"Replicate on the others, got {tuple(x.placements)}"
            )
    return found


def is_class_sharded(x) -> bool:
    """Whether ``x`` is a ``DTensor`` placed ``Shard(class_dim)`` on a mesh dimension."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor) and _class_shard_dim(x) is not None


def _dtensor_slice(x) -> tuple:
    """``(local logits, group, offset, total, mesh, mesh_dim)`` of a class-sharded DTensor.

    ``Shard`` splits as ``torch.chunk``: every slice but the last ones holds ``ceil(C / n)`` classes.
    """
    mesh_dim = _class_shard_dim(x)
    mesh = x.device_mesh
    total = x.shape[1 if x.dim() >= 2 else 0]
    n = mesh.size(mesh_dim)
    step = -(-total // n)
    offset = min(mesh.get_local_rank(mesh_dim) * step, total)
    return _ToLocal.apply(x), mesh.get_group(mesh_dim), offset, total, mesh, mesh_dim


class _ToLocal(torch.autograd.Function):
    """``x.to_local()`` whose gradient is a DTensor with ``x``'s placements, shape and stride.

    ``to_local``'s own backward gives the gradient the stride implied by the local shard, which
    differs from ``x.stride()`` for an uneven ``Shard(1)`` (e.g. ``(14, 1)`` vs ``(13, 1)``); the leaf's
    AccumulateGrad then copies it into ``new_empty_strided(x.shape, x.stride())``, which torch 2.11
    places ``Replicate`` (a full-size local gradient). Keeping ``x``'s layout avoids the copy.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.meta = (x.device_mesh, x.placements, x.shape, x.stride())
        local = x.to_local()
        return local.view_as(local)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = ctx.meta
        return DTensor.from_local(grad, mesh, placements, run_check=False, shape=shape, stride=stride)


def _local(v, name: str):
    """A replicated (or class-sharded, for probability targets) DTensor argument's local tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(v, DTensor):
        return v.to_local()
    if v is not None and not isinstance(v, torch.Tensor):
        raise TypeError(f"triton_losses.cross_entropy: {name} must be a Tensor, got {type(v).__name__}")
    return v


def _check_weight(weight, total) -> None:
    """The global weight must have one entry per global class (``total``: an integer or a device count).

    With the count on the device the check needs its value: read back where value checks read data
    (:func:`eager_checks`: CPU tensors, or the opt-in), else a device-side assert, as for targets.
    """
    if weight is None:
        return
    if isinstance(total, torch.Tensor):
        if weight.dim() == 1 and not eager_checks(total.device):
            msg = "cross_entropy: weight tensor should be defined for all classes"
            torch._assert_async(total == weight.numel(), msg)
            return
        total = int(total)
    if weight.dim() != 1 or weight.numel() != total:
        raise RuntimeError(f"weight tensor should be defined either for all {total} classes or no classes but "
                           f"got weight tensor of shape: {list(weight.shape)}")  # fmt: skip


def _check(x: torch.Tensor, t: torch.Tensor, weight, total, opts: CEOptions, reduction: str) -> None:
    """The structural checks of a vocabulary-parallel call (torch's messages where torch has them);
    ``total``: the global class count, an integer or a 0-d device tensor."""
    if x.dtype not in FLOAT_DTYPES or x.dim() == 0:
        raise ValueError(f"triton_losses.cross_entropy(process_group=...): input must be floating with a class "
                         f"dimension, got {x.dtype} of shape {tuple(x.shape)}")  # fmt: skip
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= opts.smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {opts.smoothing}")
    _check_weight(weight, total)
    if opts.prob_target:
        if opts.ignore_index >= 0:
            raise ValueError("ignore_index is not supported for floating point target")
        return
    if t.dtype not in (torch.int64, torch.uint8) or t.is_floating_point():
        raise RuntimeError(f"expected index targets of dtype Long, got {t.dtype}")
    want = tuple(x.shape[:1]) + tuple(x.shape[2:]) if x.dim() >= 2 else ()
    if tuple(t.shape) != want:
        raise ValueError(f"Expected target size {list(want)}, got {list(t.shape)}")
    check_target_range(t, total, opts.ignore_index)


class VocabParallelCE(torch.autograd.Function):
    """Autograd wrapper of one vocabulary-parallel cross-entropy call on this rank's ``(A, C_local, B)`` slice."""

    @staticmethod
    def forward(ctx, x, t, weight, opts: CEOptions, eng, reduction: str, out_dtype, group, bounds, inplace: bool):
        A, _, B = x.shape
        norm, spec = _norm(eng, x, A, B, t, _spec(weight, opts, bounds), reduction)
        rows, stats = _global_rows(eng.ce_partial(x, t, spec), t, spec, group)
        out = eng.ce_finish(rows, norm, spec, reduction, out_dtype)
        ctx.save_for_backward(x, t, weight, stats, norm)
        ctx.opts, ctx.eng, ctx.reduction, ctx.bounds, ctx.inplace = opts, eng, reduction, bounds, inplace
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        x, t, weight, stats, norm = ctx.saved_tensors
        wsum = norm[0:1] if norm is not None and weight is not None else None
        spec = _spec(weight, ctx.opts, ctx.bounds)._replace(weight_sum=wsum)
        coef = norm[2:3] if ctx.reduction == "mean" else None
        want_x, want_t = ctx.needs_input_grad[:2]
        tbuf = torch.empty(t.shape, dtype=t.dtype, device=t.device) if want_t else None
        buf = x if ctx.inplace and want_x else None
        grad, tgrad = ctx.eng.ce_bwd(x, t, spec, stats, gout.contiguous(), coef, buf, tbuf)
        return (grad if want_x else None, tgrad) + (None,) * 8


def _norm(eng, x: torch.Tensor, A: int, B: int, t: torch.Tensor, spec: CESpec, reduction: str):
    """``(norm, spec)``: ``ce_norm``'s ``(3,)`` over the global classes (or None when not needed), and
    ``spec`` with the global weight sum set."""
    if reduction != "mean" and not (spec.weight is not None and spec.smoothing > 0):
        return None, spec
    # The global shape (ce_norm reads no logits; of the class count only the weights' length matters).
    C = spec.num_classes if spec.bounds is None else (1 if spec.weight is None else spec.weight.numel())
    whole = x.new_empty(()).expand(A, C, B)
    norm = eng.ce_norm(whole, t, spec._replace(class_offset=0, num_classes=0, bounds=None), reduction == "mean")
    return norm, spec._replace(weight_sum=norm[0:1] if spec.weight is not None else None)


def _all_reduce(v: torch.Tensor, op, group) -> torch.Tensor:
    dist.all_reduce(v, op=op, group=group)
    return v


def _global_rows(part: torch.Tensor, t: torch.Tensor, spec: CESpec, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses ``(R,)`` and global statistics ``(R, 3)`` = ``(max, sum-exp, S1)`` from the local partial sums.

    Args:
        part: ``ce_partial``'s ``(R, 8)`` local sums of this rank.
        t: global index targets ``(A, B)`` or this rank's probability targets.
        spec: the call's options, with ``weight_sum`` set when the weights and smoothing need it.
        group: the process group.
    """
    eps, total = spec.smoothing, spec.num_classes if spec.bounds is None else spec.bounds[1]
    gmax = _all_reduce(part[:, 0].clone(), dist.ReduceOp.MAX, group)
    shift = gmax.masked_fill(gmax == float("-inf"), 0.0)
    # the weighted sums of each rank are relative to its own max (column 6); rebased on the global max
    # (times the rank's weight mass) they add up without cancelling terms of the logits' magnitude
    back = part[:, 6] - shift
    cols = [part[:, 1] * torch.exp(part[:, 0] - shift)]
    cols += [part[:, 4], part[:, 5] + part[:, 4] * back] if spec.prob_target else [part[:, 2]]
    if eps > 0:
        cols.append(part[:, 3] + part[:, 7] * back)
    sums = _all_reduce(torch.stack(cols, 1), dist.ReduceOp.SUM, group)
    S = sums[:, 0]
    logs = torch.log(S)
    lse = gmax + logs
    if spec.weight is not None:
        wsum = spec.weight_sum.to(S.dtype)
    else:
        wsum = total.to(S.dtype) if isinstance(total, torch.Tensor) else float(total)
    if spec.prob_target:
        S1, S2 = sums[:, 1], sums[:, 2]
        if eps > 0:
            S1 = (1.0 - eps) * S1 + eps * wsum / total
            S2 = (1.0 - eps) * S2 + eps * sums[:, 3] / total
        rows = ((gmax - shift) * S1 - S2) + logs * S1
        if spec.z_loss:
            rows = rows + spec.z_loss * lse * lse
        return rows, torch.stack([gmax, S, S1], 1)
    tt = t.reshape(-1).long()
    ignored, inb = tt == spec.ignore_index, (tt >= 0) & (tt < total)
    if spec.weight is None:
        w_t = torch.ones_like(S)
    else:
        w_t = spec.weight.to(S.dtype)[torch.where(inb, tt, torch.zeros_like(tt))]
    rows = w_t * ((gmax - sums[:, 1]) + logs)
    if eps > 0:
        rows = (1.0 - eps) * rows + eps / total * ((wsum * (gmax - shift) - sums[:, 2]) + wsum * logs)
    if spec.z_loss:
        rows = rows + spec.z_loss * w_t * lse * lse
    rows = rows.masked_fill(~inb, float("nan")).masked_fill_(ignored, 0.0)
    return rows, torch.stack([gmax, S, torch.zeros_like(S)], 1)


def cross_entropy(input, target, weight, ignore_index: int, reduction: str, label_smoothing: float, *,
                  z_loss: float, softcap: float | None, inplace_backward: bool, process_group=None):  # fmt: skip
    """Vocabulary-parallel ``cross_entropy``: ``input`` is this rank's slice of the class dimension.

    Args:
        input: logits ``(C_local,)``, ``(N, C_local)`` or ``(N, C_local, d1, ..., dk)``: this rank's
            contiguous slice of the classes (slices in rank order, any sizes); or a ``DTensor``
            placed ``Shard(class_dim)`` (then ``process_group`` is its mesh dimension's group).
        target: global class indices ``()``, ``(N,)`` or ``(N, d1, ..., dk)``, the same on every
            rank, or this rank's slice of probability targets (the input's local shape).
        weight: the global class weights ``(C,)``, or None.
        ignore_index, reduction, label_smoothing, z_loss, softcap, inplace_backward: as in
            :func:`triton_losses.cross_entropy` (smoothing uses the global class count).
        process_group: the ``ProcessGroup`` the classes are split over (None for a DTensor input).

    Returns:
        The loss of the concatenated logits, the same on every rank (a replicated ``DTensor`` for
        a ``DTensor`` input): 0-d for 'mean' / 'sum', ``(N, d1, ..., dk)`` for 'none'.
    """
    mesh = None
    if is_class_sharded(input):
        x_local, group, offset, total, mesh, _ = _dtensor_slice(input)
    else:
        x_local, group = _local(input, "input"), process_group
    target, weight = _local(target, "target"), _local(weight, "weight")
    cdim = 1 if x_local.dim() >= 2 else 0
    prob = target.is_floating_point() and target.shape == x_local.shape
    eng = _dispatch.engine("cross_entropy", x_local, target, weight, op="cross_entropy")
    if mesh is None:
        bounds = slice_bounds(x_local.shape[cdim] if x_local.dim() else 0, group, x_local.device,
                              on_host=eng is _dispatch.reference("cross_entropy"))  # fmt: skip
    else:
        bounds = (offset, total)
    opts = CEOptions(ignore_index=ignore_index, smoothing=float(label_smoothing), z_loss=float(z_loss),
                     softcap=None if softcap is None else float(softcap), prob_target=prob)  # fmt: skip
    _check(x_local, target, weight, _total(bounds), opts, reduction)
    opts = opts._replace(smoothing=max(opts.smoothing, 0.0))
    x, t = ce_views(x_local, target, prob)
    out_dtype = x_local.dtype
    if prob:
        out_dtype = torch.promote_types(out_dtype, target.dtype)
    if weight is not None:
        out_dtype = torch.promote_types(out_dtype, weight.dtype) if prob else out_dtype
        weight = weight.to(x_local.dtype) if weight.dtype != x_local.dtype else weight
    if weight is not None and weight.device != x.device:
        weight = weight.to(x.device)
    out = VocabParallelCE.apply(x, t, weight, opts, eng, reduction, out_dtype, group, bounds, inplace_backward)
    if reduction == "none":
        out = out.reshape(x_local.shape[:1] + x_local.shape[2:] if x_local.dim() >= 2 else ())
    if mesh is not None:
        from torch.distributed.tensor import DTensor, Replicate

        out = DTensor.from_local(out, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return out


class VocabParallelLinearCE(torch.autograd.Function):
    """Autograd wrapper of one vocabulary-parallel linear cross-entropy: rows ``x`` ``(N, H)`` (the same on
    every rank) against this rank's ``w`` ``(V_local, H)`` rows of the lm_head.

    The forward computes each chunk's logits, reads them once with ``ce_partial`` and keeps only
    ``(N, 8)`` partial sums; the two all-reduces make them global. The backward recomputes the
    chunks' logits through ``_linear_ce_chunks.run`` with the global statistics (input, weight and
    bias gradients), then one all-reduce sums the ``(N, H)`` input gradient over the ranks.
    """

    @staticmethod
    def forward(ctx, x, w, b, t, weight, eng, opts: CEOptions, reduction: str, out_dtype, group, bounds, plan):
        from . import _linear_ce_chunks as chunks

        N, V = x.shape[0], w.shape[0]
        norm, spec = _norm(eng, x, N, 1, t, _spec(weight, opts, bounds), reduction)
        part = torch.empty(N, PARTIAL_COLUMNS, dtype=acc_dtype(x.dtype), device=x.device)
        chunk = plan[0]
        buf = torch.empty(min(chunk, N), V, dtype=x.dtype, device=x.device) if N else None
        for c0 in range(0, N, chunk):
            c1 = min(N, c0 + chunk)
            logits = buf[: c1 - c0]
            if b is None:
                torch.mm(x[c0:c1], w.t(), out=logits)
            else:
                torch.addmm(b, x[c0:c1], w.t(), out=logits)
            part[c0:c1] = eng.ce_partial(logits.view(c1 - c0, V, 1), t[c0:c1], spec)
        buf = logits = None
        rows, stats = _global_rows(part, t, spec, group)
        ctx.save_for_backward(x, w, b, t, weight, stats, norm)
        ctx.eng, ctx.opts, ctx.reduction, ctx.group, ctx.bounds, ctx.plan = eng, opts, reduction, group, bounds, plan
        ctx.chunks = chunks
        return eng.ce_finish(rows, norm, spec, reduction, out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        x, w, b, t, weight, stats, norm = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        acc = acc_dtype(x.dtype)
        wsum = norm[0:1] if norm is not None and weight is not None else None
        spec = _spec(weight, ctx.opts, ctx.bounds)._replace(weight_sum=wsum)
        coef = norm[2:3] if ctx.reduction == "mean" else torch.ones(1, dtype=acc, device=x.device)
        chunk, wgrad = ctx.plan
        reduce_rows = _RowsAllReduce(x.shape[0], ctx.group)
        if w.shape[0]:
            p = ctx.chunks.Problem(x, w, b, t, spec, w.shape[0], None, x.shape[0], chunk, wgrad)
            res = ctx.chunks.run(ctx.eng, p, coef, need, stats=stats, gout=gout.reshape(-1).to(acc).contiguous(),
                                 on_rows=reduce_rows.ready if need[0] else None)  # fmt: skip
            gi, gw, gb = res.grads
        else:  # an empty slice of the vocabulary: no logits, but the input gradient's all-reduce still runs
            gi = torch.zeros_like(x) if need[0] else None
            gw = torch.zeros_like(w) if need[1] else None
            gb = torch.zeros_like(b) if need[2] else None
        if gi is not None:
            reduce_rows.ready(x.shape[0], gi)
            reduce_rows.wait()
        return gi, gw, gb, *(None,) * 9


class _RowsAllReduce:
    """The input gradient's sum over the ranks, in ``PIECES`` row ranges fixed by the row count alone
    (every rank issues the same collectives in the same order, whatever its own chunking), each started
    (``async_op``) as soon as the chunk loop has finished its rows, so the all-reduce of the first rows
    overlaps the later chunks' GEMMs (and the weight gradient's)."""

    PIECES = 4

    def __init__(self, n: int, group):
        k = min(self.PIECES, n)
        self.bounds = [(i * n // k, (i + 1) * n // k) for i in range(k)]
        self.group, self.handles = group, []

    def ready(self, done: int, gi: torch.Tensor) -> None:
        """Rows ``[0, done)`` of ``gi`` are final: start the pieces they complete."""
        while len(self.handles) < len(self.bounds) and self.bounds[len(self.handles)][1] <= done:
            a, b = self.bounds[len(self.handles)]
            self.handles.append(dist.all_reduce(gi[a:b], op=dist.ReduceOp.SUM, group=self.group, async_op=True))

    def wait(self) -> None:
        for h in self.handles:
            h.wait()


def _row_shard_dim(w) -> int | None:
    """The mesh dimension on which DTensor ``w`` is ``Shard(0)`` (Replicate elsewhere), or None."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not dist.is_available() or not isinstance(w, DTensor):
        return None
    found = None
    for i, p in enumerate(w.placements):
        if isinstance(p, Shard) and p.dim % w.dim() == 0:
            found = i
        elif not isinstance(p, Replicate):
            raise NotImplementedError(
                "triton_losses.linear_cross_entropy: a DTensor linear_weight must be Shard(0) on one mesh "
                f"dimension and Replicate on the others, got {tuple(w.placements)}"
            )
    return found


def is_row_sharded(w) -> bool:
    """Whether ``w`` is a ``DTensor`` placed ``Shard(0)`` on a mesh dimension (a vocabulary-parallel lm_head)."""
    return _row_shard_dim(w) is not None


def linear_cross_entropy(input, linear_weight, target, *, linear_bias, weight, reduction: str, ignore_index,
                         label_smoothing: float, z_loss: float, softcap, chunk_size, fp32_weight_grad,
                         process_group=None):  # fmt: skip
    """Vocabulary-parallel ``linear_cross_entropy``: ``linear_weight`` holds this rank's vocabulary rows.

    Args:
        input: hidden states ``(..., H)``, the same on every rank (a replicated DTensor allowed).
        linear_weight: this rank's contiguous rows ``(V_local, H)`` of the lm_head (slices in rank
            order, any sizes), or a ``DTensor`` placed ``Shard(0)``.
        target: global class indices ``(...)``, or this rank's slice of probabilities ``(..., V_local)``.
        linear_bias: this rank's ``(V_local,)`` bias rows (or a ``Shard(0)`` DTensor), or None.
        weight: the global class weights ``(V,)``, or None.
        reduction, ignore_index, label_smoothing, z_loss, softcap, chunk_size, fp32_weight_grad: as in
            :func:`triton_losses.linear_cross_entropy` (``chunk_size`` and the memory rules apply per rank).
        process_group: the group the vocabulary is split over (None for a DTensor weight).

    Returns:
        The loss of the full lm_head, the same on every rank: 0-d, or ``input.shape[:-1]`` for 'none'.
        ``input``'s gradient is the full one on every rank, ``linear_weight``'s this rank's rows.
    """
    from . import _linear_ce_chunks as chunks

    input, linear_weight, linear_bias, autocast = autocast_linear(input, linear_weight, linear_bias)
    mesh_dim = _row_shard_dim(linear_weight)
    if mesh_dim is not None:
        mesh = linear_weight.device_mesh
        group, total = mesh.get_group(mesh_dim), linear_weight.shape[0]
        step = -(-total // mesh.size(mesh_dim))
        bounds = (min(mesh.get_local_rank(mesh_dim) * step, total), total)
    else:
        group = process_group
    w, b = _local(linear_weight, "linear_weight"), _local(linear_bias, "linear_bias")
    x, t, weight = _local(input, "input"), _local(target, "target"), _local(weight, "weight")
    if w.dim() != 2 or x.dim() == 0 or x.shape[-1] != w.shape[1] or w.dtype != x.dtype:
        raise ValueError(
            "triton_losses.linear_cross_entropy(process_group=...): expected input (..., H) and linear_weight "
            f"(V_local, H) of one dtype, got {tuple(x.shape)}, {tuple(w.shape)}"
        )
    eng = _dispatch.engine("cross_entropy", x, w, t, op="linear_cross_entropy")
    if mesh_dim is None:
        bounds = slice_bounds(w.shape[0], group, w.device, on_host=eng is _dispatch.reference("cross_entropy"))
    batch = tuple(x.shape[:-1])
    prob = t.is_floating_point() and tuple(t.shape) == (*batch, w.shape[0])
    ii = -100 if ignore_index is None else int(ignore_index)
    if prob and ignore_index is not None:
        raise RuntimeError("ignore_index is not supported for floating point target")
    opts = CEOptions(ignore_index=ii, smoothing=float(label_smoothing), z_loss=float(z_loss),
                     softcap=None if softcap is None else float(softcap), prob_target=prob)  # fmt: skip
    x2 = x.reshape(-1, x.shape[-1])
    N = x2.shape[0]
    t2 = t.reshape(N, w.shape[0], 1) if prob else t.reshape(N, 1)
    _check(x2.new_empty(()).expand(N, w.shape[0]), t2 if prob else t2.reshape(N), weight, _total(bounds), opts,
           reduction)  # fmt: skip
    opts = opts._replace(smoothing=max(opts.smoothing, 0.0))
    plan = (chunks.chunk_rows(N, w.shape[0], x2.element_size(), x2.device, chunk_size),
            chunks.weight_grad_dtype(w, fp32_weight_grad))  # fmt: skip
    out_dtype = torch.promote_types(x.dtype, t.dtype) if prob else x.dtype
    if autocast:  # torch's composite's policy: 16-bit logits, an fp32 loss
        out_dtype = torch.promote_types(out_dtype, torch.float32)
    out = VocabParallelLinearCE.apply(x2, w, b, t2, weight, eng, opts, reduction, out_dtype, group, bounds, plan)
    return out.reshape(batch) if reduction == "none" else out

"""Hugging Face ``transformers`` in one call: a causal LM's loss without its ``(tokens, vocab)`` logits.

``patch(model)`` patches one model instance (never a class; other instances are untouched): when
its forward is given ``labels``, it still runs the model's own forward, but the output embedding
(``model.get_output_embeddings()``) only records the final hidden states it receives and returns an
empty ``(..., 0)`` placeholder; the shifted causal-LM loss is then computed from those hidden states
by :func:`triton_losses.linear_cross_entropy`, so the logits exist one chunk of rows at a time.
Everything the model does before its head (the decoder, ``logits_to_keep`` slicing, its argument
handling) is the model's own code; what it applies to its logits after the head is honoured from
its config (``final_logit_softcapping`` becomes ``softcap``, Cohere's ``logit_scale`` scales the hidden
states) or refused at patch time with a ``ValueError`` naming the attribute. Without ``labels`` the
forward is the model's own, logits unchanged.

:func:`ForCausalLMLoss` is a drop-in for transformers' loss of the same name, on logits, for users who
keep them (``model.loss_function = triton_losses.transformers.ForCausalLMLoss``).

``transformers`` is imported only inside the functions that need it; importing this module does not.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .cross_entropy import cross_entropy_fp32
from .linear_cross_entropy import linear_cross_entropy

__all__ = ["ForCausalLMLoss", "is_patched", "patch", "unpatch"]

_STATE = "_triton_losses_patch"
# Options of linear_cross_entropy a patched model passes through; ``return_logits`` is ours.
_LOSS_OPTIONS = ("z_loss", "label_smoothing", "chunk_size", "fp32_weight_grad")
# Config attributes some models apply to their logits after the head, in ways that differ between
# models (Granite divides by ``logits_scaling``, HyperCLOVA X multiplies by it): refused, not guessed.
_REFUSED_LOGIT_ATTRS = ("logits_scaling", "output_multiplier", "lm_head_multiplier")


@dataclass
class _Patch:
    """What ``patch`` recorded on a model instance (stored as an attribute of the instance)."""

    options: dict[str, Any]
    return_logits: bool
    softcap: float | None
    scale: float | None
    previous_forward: Any = None  # the instance's own ``forward`` attribute before patching, if any
    had_forward: bool = False


@dataclass
class _Capture:
    """The hidden states the output embedding received during one patched call."""

    hidden: torch.Tensor | None = None
    placeholder: torch.Tensor | None = None
    calls: int = 0
    head_forward: Any = field(default=None, repr=False)


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
        raise ImportError(
            "triton_losses.transformers needs `pip install transformers` (extra: triton-losses[hf])"
        ) from e
    return transformers


def _output_head(model) -> torch.nn.Linear:
    """The model's output embedding, which must be a plain ``nn.Linear`` (its weight is the LM head)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        raise ValueError(
            f"patch(): {type(model).__name__}.get_output_embeddings() is {type(head).__name__}, not a plain "
            "torch.nn.Linear, so its logits cannot be computed from its weight and bias"
        )
    return head


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _logit_transform(model) -> tuple[float | None, float | None]:
    """``(softcap, scale)`` the model applies to its logits after the head, from its config.

    Raises:
        ValueError: the model applies a transformation this integration does not reproduce.
    """
    cfg = _text_config(model)
    for attr in _REFUSED_LOGIT_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None and value != 1:
            raise ValueError(
                f"patch(): {type(model).__name__} applies config.{attr}={value!r} to its logits after the "
                "output embeddings; triton_losses.transformers does not reproduce it, so the loss would differ"
            )
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", getattr(cfg, "logit_scale", None))
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"patch(): {type(model).__name__}.logit_scale is {type(scale).__name__}, not a number")
    return (None if softcap is None else float(softcap)), (None if scale in (None, 1) else float(scale))


def patch(model, **loss_options):
    """Compute ``model``'s causal-LM loss from its final hidden states, never building its logits.

    Patches this instance only (a second call replaces the options; :func:`unpatch` restores it).
    With ``labels`` the forward returns the model's own shifted causal-LM loss (ignore index -100,
    or the ``ignore_index`` the call passes; ``num_items_in_batch`` as the ``Trainer`` passes it under
    gradient accumulation: the sum over tokens divided by it, as transformers' ``ForCausalLMLoss``;
    ``shift_labels`` and ``logits_to_keep`` as the model takes them), computed by
    :func:`triton_losses.linear_cross_entropy` one chunk of rows at a time; ``output.logits`` is then
    None unless ``return_logits=True``. Without ``labels`` the forward is unchanged. The loss is fp32,
    as transformers returns it; tied and untied embeddings both get their gradients.

    Args:
        model: a ``transformers.PreTrainedModel`` whose ``get_output_embeddings()`` is an ``nn.Linear``
            (any causal-LM class).
        **loss_options: ``z_loss``, ``label_smoothing``, ``chunk_size``, ``fp32_weight_grad`` (passed to
            :func:`triton_losses.linear_cross_entropy`), and ``return_logits`` (bool, default False:
            also compute the model's logits, with their memory, for callers that read them).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``, or an option is unknown.
        ValueError: the model's head is not an ``nn.Linear``, or it transforms its logits in a way
            this integration does not reproduce (the message names the config attribute).
    """
    transformers = _require_transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"patch() takes a transformers.PreTrainedModel, got {type(model).__name__}")
    unknown = sorted(set(loss_options) - {*_LOSS_OPTIONS, "return_logits"})
    if unknown:
        raise TypeError(f"patch() got unknown loss options {unknown}; known: {[*_LOSS_OPTIONS, 'return_logits']}")
    if "labels" not in inspect.signature(type(model).forward).parameters:
        raise ValueError(f"patch(): {type(model).__name__}.forward takes no `labels`; it is not a causal LM")
    _output_head(model)
    softcap, scale = _logit_transform(model)
    if is_patched(model):
        unpatch(model)
    return_logits = bool(loss_options.pop("return_logits", False))
    state = _Patch(loss_options, return_logits, softcap, scale)
    state.had_forward = "forward" in model.__dict__
    state.previous_forward = model.__dict__.get("forward")
    model.__dict__[_STATE] = state
    model.forward = types.MethodType(_wrapped_forward(type(model).forward), model)
    return model


def unpatch(model):
    """Undo :func:`patch` on ``model`` (a no-op if it is not patched); returns ``model``."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    current = model.__dict__.get("forward")
    if not getattr(getattr(current, "__func__", None), _STATE, False):
        return model  # another wrapper was installed over ours: leave it (ours then calls the class forward)
    if state.had_forward:
        model.forward = state.previous_forward
    else:
        model.__dict__.pop("forward", None)
    return model


def is_patched(model) -> bool:
    """Whether :func:`patch` is in effect on this instance."""
    return _STATE in getattr(model, "__dict__", {})


def _wrapped_forward(cls_forward):
    """A ``forward`` with the class forward's signature (the Trainer reads it) that calls :func:`_call`.

    It closes over nothing of the instance, so ``copy.deepcopy`` of a patched model rebinds it to the copy.
    """

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        return _call(self, args, kwargs)

    setattr(forward, _STATE, True)  # marks it as ours (``wraps`` copied the class forward's names)
    return forward


def _call(model, args: tuple, kwargs: dict):
    """One patched forward: the model's own without labels; else the loss from the captured hidden states."""
    state: _Patch | None = model.__dict__.get(_STATE)
    if state is None:  # unpatched while another wrapper (e.g. TRL's fused head) still calls this forward
        return type(model).forward(model, *args, **kwargs)
    inner = state.previous_forward or types.MethodType(type(model).forward, model)
    if args:  # normalise positional arguments to keywords so that ``labels`` is found
        bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
        kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
        kwargs.update(kwargs.pop(_var_keyword(type(model).forward), None) or {})
    labels = kwargs.get("labels")
    if labels is None:
        return inner(**kwargs)
    kwargs = dict(kwargs, labels=None)
    loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels", "ignore_index") if k in kwargs}
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    head = _output_head(model)
    with _capturing(head, state) as cap:
        out = inner(**kwargs, return_dict=True)
    _check_captured(model, state, cap, out)
    loss = _loss(cap.hidden, head, labels, state, **loss_kwargs)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    out = type(out)(loss=loss, logits=out.logits if state.return_logits else None, **fields)
    return out if return_dict else out.to_tuple()


def _var_keyword(fn) -> str | None:
    params = inspect.signature(fn).parameters.values()
    return next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)


class _capturing:
    """Context: ``head`` records its input and returns an empty ``(..., 0)`` placeholder (or its logits)."""

    def __init__(self, head: torch.nn.Linear, state: _Patch):
        self.head, self.state, self.cap = head, state, _Capture()

    def __enter__(self) -> _Capture:
        cap, head, keep = self.cap, self.head, self.state.return_logits
        self.saved = head.__dict__.get("forward")
        cap.head_forward = head.forward

        def capture(hidden: torch.Tensor) -> torch.Tensor:
            cap.calls += 1
            cap.hidden = hidden
            if keep:
                return cap.head_forward(hidden)
            cap.placeholder = hidden.new_empty((*hidden.shape[:-1], 0))
            return cap.placeholder

        head.forward = capture
        return cap

    def __exit__(self, *exc) -> None:
        if self.saved is None:
            self.head.__dict__.pop("forward", None)
        else:
            self.head.forward = self.saved


def _check_captured(model, state: _Patch, cap: _Capture, out) -> None:
    """The head ran exactly once, and nothing unknown was applied to what it returned."""
    name = type(model).__name__
    if cap.calls != 1:
        raise RuntimeError(
            f"triton_losses.transformers: {name} called its output embeddings {cap.calls} times in one "
            "forward (expected once); its loss cannot be computed from the final hidden states"
        )
    if state.return_logits or state.softcap is not None or state.scale is not None:
        return
    logits = getattr(out, "logits", None)
    if logits is not None and logits is not cap.placeholder and logits.dtype == cap.placeholder.dtype:
        raise RuntimeError(
            f"triton_losses.transformers: {name} transforms its logits after the output embeddings in a way "
            "its config does not name; unpatch() it (or use triton_losses.transformers.ForCausalLMLoss on logits)"
        )


def _loss(hidden, head, labels, state: _Patch, num_items_in_batch=None, shift_labels=None, ignore_index=-100):
    """transformers' ``ForCausalLMLoss`` from the hidden states ``(..., H)`` the head received."""
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)  # tokens < n predict n
        shift_labels = labels[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    w, b = head.weight, head.bias
    target = shift_labels.reshape(-1).to(h.device)
    if h.device != w.device:
        h = h.to(w.device)
        target = target.to(w.device)
    if state.scale is not None:  # logits * s == (s * h) @ W.T + s * b
        h = h * state.scale
        b = None if b is None else b * state.scale
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(h, w, target, linear_bias=b, reduction=reduction, ignore_index=ignore_index,
                                softcap=state.softcap, **state.options)  # fmt: skip
    loss = loss.float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def ForCausalLMLoss(  # transformers' name: it drops into LOSS_MAPPING / model.loss_function
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` (same signature and normalisation) on :func:`triton_losses.cross_entropy`.

    As transformers does, the loss is that of the logits upcast to fp32 (on the kernels without an fp32
    copy: ``cross_entropy_fp32`` of ``triton_losses/cross_entropy.py``) and the labels shifted (``shift_labels``
    given: used as they are); ``num_items_in_batch`` given: the summed loss divided by it, else the
    mean over non-ignored tokens. The cross-entropy is the fused one: no log-softmax of the logits'
    size is kept for the backward. Other keyword arguments are accepted and ignored, as transformers does.

    Args:
        logits: ``(..., vocab_size)``.
        labels: ``(...)`` token ids (``ignore_index`` where no loss is wanted).
        vocab_size: ``V``.
        num_items_in_batch: the number of non-ignored tokens of the whole (accumulated) batch, or None.
        ignore_index: label value that contributes nothing.
        shift_labels: already shifted labels ``(...)``, or None to shift ``labels``.

    Returns:
        The 0-d fp32 loss.
    """
    if shift_labels is None:
        labels = F.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    logits = logits.reshape(-1, vocab_size)
    shift_labels = shift_labels.view(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    # transformers' logits.float(), without the fp32 copy on the kernels (cross_entropy_fp32)
    loss = cross_entropy_fp32(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss

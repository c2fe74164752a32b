"""``triton_losses.transformers``: patched causal LMs against the unpatched model, tiny random configs.

No hub downloads: every config is built here (hidden 32, 2 layers, vocab 256). The loss and every
parameter's gradient of a patched model must match the model's own; the Trainer (gradient
accumulation) must train a patched model exactly as the unpatched one; and a patched step must not
create any ``(tokens, vocab)`` tensor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from triton_losses import transformers as tlt  # noqa: E402

V, H, B, T = 256, 32, 2, 24
N = B * T  # tokens per batch; no patched tensor may hold N x V elements
CHUNK = 8  # rows per linear-CE chunk in these tests, so a chunk buffer is (8, V)

_LLAMA_LIKE = dict(hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, vocab_size=V)  # fmt: skip
_OPT = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=H,
            max_position_embeddings=64, vocab_size=V)  # fmt: skip
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", _LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA_LIKE, head_dim=8)),
    # A small softcap so that it changes the loss visibly (the default is 30).
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_LLAMA_LIKE, head_dim=8, final_logit_softcapping=2.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA_LIKE, pad_token_id=0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_LLAMA_LIKE, logit_scale=0.25)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=H, n_layer=2, n_head=4, n_positions=64, vocab_size=V)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(_OPT)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_LLAMA_LIKE, rotary_pct=0.5)),
}


def _available(name: str) -> bool:
    cfg, cls, _ = ARCHS[name]
    return hasattr(transformers, cfg) and hasattr(transformers, cls)


AVAILABLE = [a for a in ARCHS if _available(a)]


def make_model(name: str, tied: bool = True, seed: int = 0):
    cfg_name, cls_name, kwargs = ARCHS[name]
    cfg = getattr(transformers, cfg_name)(**kwargs, tie_word_embeddings=tied, attn_implementation="eager")
    for attr in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 0.0)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg)
    if not tied:  # untied heads start from their own random values
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0, 0.3)
    return model.eval()


def batch(seed: int = 0, pad: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :pad] = -100  # a padded prefix: fewer counted tokens in row 0
    labels[1, -2:] = -100
    return ids, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, _grads(model)


def _assert_same_step(ref, ours, ids, labels, **kw):
    out_ref, g_ref = _step(ref, ids, labels, **kw)
    out, g = _step(ours, ids, labels, **kw)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys()
    for k in g_ref:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    return out, out_ref


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """The PyTorch engines unless a test asks for the ``backend`` fixture (the interpreter is slow)."""
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "torch")


_UNTIED_FAST = ("llama", "gemma2", "gpt_neox")
CASES = [pytest.param(a, True, id=f"{a}-tied") for a in AVAILABLE] + [
    pytest.param(a, False, id=f"{a}-untied", marks=() if a in _UNTIED_FAST else pytest.mark.slow) for a in AVAILABLE
]


@pytest.mark.parametrize("arch,tied", CASES)
def test_loss_and_every_gradient_match_the_model(arch, tied):
    ref = make_model(arch, tied)
    ours = tlt.patch(copy.deepcopy(ref), chunk_size=CHUNK)
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == tied
    ids, labels = batch()
    out, _ = _assert_same_step(ref, ours, ids, labels)
    assert out.logits is None


@pytest.mark.interpreter
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_kernels_through_the_interpreter(arch, monkeypatch):
    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    ref = make_model(arch)
    ours = tlt.patch(copy.deepcopy(ref), chunk_size=CHUNK)
    _assert_same_step(ref, ours, *batch())


def test_num_items_in_batch_shift_labels_and_logits_to_keep():
    ref = make_model("llama")
    ours = tlt.patch(copy.deepcopy(ref), chunk_size=CHUNK)
    ids, labels = batch()
    _assert_same_step(ref, ours, ids, labels, num_items_in_batch=torch.tensor(71))
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shifted[1, 3] = -100  # not derivable from labels: shift_labels must be the ones used
    _assert_same_step(ref, ours, ids, labels, shift_labels=shifted)
    keep = 10  # the loss of the last 10 positions only, as the model computes it
    _assert_same_step(ref, ours, ids, labels[:, -keep:], logits_to_keep=keep)


def test_without_labels_logits_unchanged_and_return_logits():
    ref = make_model("gemma2")
    ours = tlt.patch(copy.deepcopy(ref), chunk_size=CHUNK, return_logits=True)
    ids, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    out, out_ref = _assert_same_step(ref, ours, ids, labels)
    torch.testing.assert_close(out.logits, out_ref.logits)
    tup = ours(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], out.loss.detach())


def test_patch_is_per_instance_and_unpatch_restores():
    a, b = make_model("llama"), make_model("llama")
    tlt.patch(a)
    assert tlt.is_patched(a) and not tlt.is_patched(b)
    assert "forward" not in b.__dict__
    ids, labels = batch()
    assert a(input_ids=ids, labels=labels).logits is None
    assert b(input_ids=ids, labels=labels).logits is not None
    copied = copy.deepcopy(a)  # the copy's forward runs the copy
    assert copied.forward.__self__ is copied
    tlt.unpatch(a)
    assert not tlt.is_patched(a) and "forward" not in a.__dict__
    assert a(input_ids=ids, labels=labels).logits is not None


def test_refusals():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        tlt.patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unknown loss options"):
        tlt.patch(make_model("llama"), softmax=True)
    model = make_model("llama")
    model.config.logits_scaling = 4.0  # Granite-style scaling, whose direction differs between models
    with pytest.raises(ValueError, match="logits_scaling"):
        tlt.patch(model)


def test_loss_options_pass_through():
    ref = make_model("qwen2")
    ours = tlt.patch(copy.deepcopy(ref), chunk_size=CHUNK, z_loss=1e-2, label_smoothing=0.1)
    ids, labels = batch()
    out = ours(input_ids=ids, labels=labels)
    logits = ref(input_ids=ids).logits.float()
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    flat = logits.reshape(-1, V)
    keep = target != -100
    expected = torch.nn.functional.cross_entropy(flat, target, label_smoothing=0.1)
    expected = expected + 1e-2 * (torch.logsumexp(flat[keep], -1) ** 2).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


class _LargestOutputs(TorchDispatchMode):
    """Records every op output that holds ``N x V`` elements or more with a vocab-sized dimension."""

    def __init__(self):
        super().__init__()
        self.big = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and V in t.shape and t.numel() >= N * V:
                self.big.append((str(func), tuple(t.shape)))
        return out


def test_no_tokens_by_vocab_tensor_in_a_patched_step():
    ref = make_model("llama", tied=False)
    ours = tlt.patch(copy.deepcopy(ref), chunk_size=CHUNK)
    ids, labels = batch()
    with _LargestOutputs() as seen:
        ref(input_ids=ids, labels=labels).loss.backward()
    assert seen.big, "the check must see the unpatched model's logits"
    with _LargestOutputs() as seen:
        ours(input_ids=ids, labels=labels).loss.backward()
    assert not seen.big, seen.big[:5]


def test_for_causal_lm_loss_drop_in():
    ref = make_model("llama")
    ours = copy.deepcopy(ref)
    ours.loss_function = tlt.ForCausalLMLoss
    ids, labels = batch()
    _assert_same_step(ref, ours, ids, labels)
    _assert_same_step(ref, ours, ids, labels, num_items_in_batch=torch.tensor(40))


@pytest.mark.interpreter
def test_for_causal_lm_loss_reads_16bit_logits_without_an_fp32_copy(monkeypatch):
    """transformers upcasts the logits (an fp32 copy, and an fp32 gradient cast back); on the kernels the
    drop-in reads the bf16 logits: the same fp32 loss and bf16 gradient, and no copy of the logits."""
    from tests.op_counts import count_ops
    from triton_losses.kernels import cross_entropy as k

    monkeypatch.setenv("TRITON_LOSSES_BACKEND", "triton")
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = (torch.randn(2, 5, 300) * 2).bfloat16().requires_grad_()
    labels = torch.randint(0, 300, (2, 5))
    labels[0, 1] = -100
    launchers = [(k, name) for name in ("ce_norm", "ce_fwd", "ce_bwd", "ce_finish", "scale_")]
    out = []
    ops, _ = count_ops(lambda: out.append(tlt.ForCausalLMLoss(logits, labels, 300)), launchers, monkeypatch)
    assert not [op for op in ops if op == "aten._to_copy.default"], ops
    ref = ForCausalLMLoss(logits, labels, 300)
    (g,) = torch.autograd.grad(out[0], logits)
    (gr,) = torch.autograd.grad(ref, logits)
    assert out[0].dtype == ref.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(g, gr)


def _dataset(n: int = 8):
    rows = []
    for i in range(n):
        ids, labels = batch(seed=i, pad=i % 4 + 1)
        rows.append({"input_ids": ids[0], "attention_mask": torch.ones(T, dtype=torch.long), "labels": labels[0]})
    return rows


def _train(model, out_dir, **args):
    # Plain SGD: the parameters move by the gradients themselves, so comparing them checks the gradients'
    # scale (Adam normalises it away, and turns rounding in a gradient that nearly cancels into an
    # lr-sized parameter difference).
    targs = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-1, optim="sgd", report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **args,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=_dataset())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _count_items(monkeypatch) -> list:
    """Record the ``num_items_in_batch`` each patched loss receives."""
    seen, loss = [], tlt._loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_items_in_batch"))
        return loss(*args, **kwargs)

    monkeypatch.setattr(tlt, "_loss", spy)
    return seen


@pytest.mark.slow
def test_trainer_with_gradient_accumulation(tmp_path, monkeypatch):
    ref = make_model("llama", tied=False).train()
    ours = tlt.patch(copy.deepcopy(ref), chunk_size=CHUNK)
    losses_ref = _train(ref, tmp_path / "ref")
    seen = _count_items(monkeypatch)
    losses = _train(ours, tmp_path / "ours")
    assert len(losses) == 3
    assert len(seen) == 6 and all(n is not None for n in seen)  # 3 steps x 2 micro-batches, normalised by the step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _tokenizer():
    """A word-level tokenizer over the test vocabulary ``t0 .. t{V-1}``, built in code (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


@pytest.mark.slow
def test_trl_sft_trainer(tmp_path):
    """SFTTrainer trains a patched model as the unpatched one (TRL >= 1.x adds its own fused head on top)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = [{"input_ids": r["input_ids"].tolist()} for r in _dataset()]
    results = []
    for patched in (False, True):
        model = make_model("llama", tied=False, seed=0).train()
        if patched:
            tlt.patch(model, chunk_size=CHUNK)
        cfg = trl.SFTConfig(output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, report_to=[],
                            use_cpu=True, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)  # fmt: skip
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=_tokenizer())  # fmt: skip
        trainer.train()
        results.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], model))
    (losses_ref, ref), (losses, ours) = results
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-5, atol=1e-6)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)

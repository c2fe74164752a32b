"""Train a small transformers causal LM twice: with the model's own loss, then patched by triton_losses.

    python examples/train_lm.py [--steps 8] [--vocab 32000] [--seq 128] [--batch 4]

The model is a randomly initialised Llama (hidden 128, 2 layers) with a 32000-token vocabulary, so
its LM head's logits dominate the activation memory, as in real LMs. The text is this repository's
own Markdown and Python files, tokenised as bytes (ids 0-255 of the vocabulary). Each variant runs
in a fresh process from the same initial weights and batches and reports its loss curve, tokens/s
and peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS growth over the process's
size after building the model), printed side by side.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def corpus_bytes() -> bytes:
    """The repository's Markdown and Python sources as one byte string."""
    files = sorted(p for ext in ("*.md", "*.py") for p in ROOT.rglob(ext) if ".git" not in p.parts)
    return b"\n".join(p.read_bytes() for p in files)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


def build_model(vocab: int, device: torch.device):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device).train()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_variant(variant: str, args) -> dict:
    """Train one variant in this process; returns its losses, tokens/s and peak memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.vocab, device)
    if variant == "triton_losses":
        import triton_losses.transformers

        triton_losses.transformers.patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.frombuffer(bytearray(pathlib.Path(args.corpus).read_bytes()), dtype=torch.uint8).long()
    losses, tokens, elapsed = [], 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_mib()
    for step, ids in enumerate(batches(data, args.steps, args.batch, args.seq)):
        ids = ids.to(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step pays one-time costs (allocator, kernel compilation)
            elapsed += time.perf_counter() - t0
            tokens += ids.numel()
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else peak_rss_mib() - base
    return {"variant": variant, "device": str(device), "losses": losses, "tokens_per_s": tokens / elapsed,
            "peak_mib": peak}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variant", choices=("transformers", "triton_losses"), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0
    results = []
    with tempfile.NamedTemporaryFile(suffix=".txt") as corpus:  # read once: both variants see the same text
        corpus.write(corpus_bytes())
        corpus.flush()
        for variant in ("transformers", "triton_losses"):  # a fresh process each, so peak memory is its own
            cmd = [sys.executable, __file__, "--variant", variant, "--corpus", corpus.name, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    ref, ours = results
    print(f"device {ref['device']}, {args.batch} x {args.seq} tokens per step, vocabulary {args.vocab}")
    print(f"{'step':>4} {'transformers loss':>18} {'triton_losses loss':>19}")
    for i, (a, b) in enumerate(zip(ref["losses"], ours["losses"])):
        print(f"{i:>4} {a:>18.4f} {b:>19.4f}")
    print(f"{'tokens/s':>23} {ref['tokens_per_s']:>10.0f} {ours['tokens_per_s']:>19.0f}")
    print(f"{'peak memory (MiB)':>23} {ref['peak_mib']:>10.0f} {ours['peak_mib']:>19.0f}")
    saved = ref["peak_mib"] - ours["peak_mib"]
    share = ours["peak_mib"] / ref["peak_mib"]
    print(f"memory saved: {saved:.0f} MiB (triton_losses peaks at {share:.0%} of the model's own)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

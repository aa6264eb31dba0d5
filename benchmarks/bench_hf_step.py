#!/usr/bin/env python3
"""One training step of a LLaVA-shaped model: peak memory and time of HF's own
cross-entropy, PRSL on the logits (``apply_prsl(fused_linear=False)``) and the fused PRSL
(``apply_prsl``, the default), through ``model(**batch).loss.backward()``.

The shape that matters is LLaVA 1.5's vocabulary (V = 32064) and a 4096-token batch: the
N x V logits (and, unfused, their gradient and HF's float32 upcast) are what the fused path
never builds. The rest of the model is small (``--hidden``, ``--layers``, a 4-patch CLIP tower),
so the step's peak is dominated by the loss, as in a real step's loss phase: the model's own
activations and weights are the same for every method and are not what differs.

Memory: the peak allocated during the step beyond what was live before it (model and inputs
excluded, parameter gradients included: the same for every method). CUDA:
``torch.cuda.max_memory_allocated``; CPU: torch's allocation records (bench_linear.py's method).
Time: median of ``--reps`` steps after one warm-up (CUDA events; CPU wall time).

    python3 benchmarks/bench_hf_step.py                      # CPU: hidden 512, fp32
    python3 benchmarks/bench_hf_step.py --device cuda        # GPU: hidden 4096, bf16

Results: a table on stdout and benchmarks/results/hf-step-<device>.csv (+ .txt).
"""

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_prsl as bp  # noqa: E402

bp.import_package()
import torch  # noqa: E402

from bench_linear import step_peak_bytes  # noqa: E402

METHODS = ("hf_ce", "prsl_unfused", "prsl_fused")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMAGE_TOKENS = 4  # a 32-pixel image in 16-pixel patches


def build(vocab, hidden, layers, dtype, device, seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                       max_position_embeddings=8192, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab - 1,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).to(device=device, dtype=dtype)


def make_batch(vocab, tokens, batch, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = tokens // batch
    ids = torch.randint(1, vocab - 1, (batch, seq), generator=g)
    ids[:, :IMAGE_TOKENS] = vocab - 1
    labels = ids.clone()
    labels[:, :IMAGE_TOKENS + 8] = -100  # the image and a prompt
    pixels = torch.rand(batch, 3, 32, 32, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


def prepare(model, method, k, b):
    from prsl_kernels.hf import apply_prsl, remove_prsl

    remove_prsl(model)
    if method != "hf_ce":
        apply_prsl(model, k, b, fused_linear=method == "prsl_fused")


def step_fn(model, batch):
    def step():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
    return step


def time_step(step, device, reps):
    step()  # warm-up (allocator, kernels, the C++ JIT)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(argv=None, log=print):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--vocab", type=int, default=32064, help="LLaVA 1.5's vocabulary")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=None, help="default 512 (CPU) / 4096 (CUDA, LLaVA-7B's)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default fp32 (CPU) / bf16 (CUDA)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--b", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=None, help="default 2 (CPU) / 10 (CUDA)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(bp.RESULTS_DIR))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    hidden = args.hidden or (4096 if cuda else 512)
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype, reps = DTYPES[dtype_name], args.reps or (10 if cuda else 2)
    if not cuda:
        torch.set_num_threads(args.threads)
    model = build(args.vocab, hidden, args.layers, dtype, device).train()
    batch = make_batch(args.vocab, args.tokens, args.batch, dtype, device)
    n_rows = batch["input_ids"].numel()
    logits_mib = n_rows * args.vocab * torch.empty((), dtype=dtype).element_size() / 2**20
    title = (f"# {bp.device_name(device)}: LLaVA-shaped step, V = {args.vocab}, {n_rows} tokens, hidden {hidden}, "
             f"{args.layers} layer(s), {dtype_name}, k = {args.k}, b = {args.b}; logits {logits_mib:.0f} MiB; "
             f"torch {torch.__version__}")
    log(title)
    rows = []
    for method in METHODS:
        prepare(model, method, args.k, args.b)
        step = step_fn(model, batch)
        ms = time_step(step, device, reps)
        peak = step_peak_bytes(step, device)
        rows.append({"method": method, "ms": ms, "peak_mib": peak / 2**20})
    base = rows[0]
    header = f"{'method':<14}{'step time':>12}{'x HF CE':>9}{'peak MiB':>11}{'x HF CE':>9}{'peak / logits':>15}"
    lines = [title, header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['method']:<14}{r['ms']:>10.0f}ms{r['ms'] / base['ms']:>9.2f}{r['peak_mib']:>11.0f}"
                     f"{r['peak_mib'] / base['peak_mib']:>9.2f}{r['peak_mib'] / logits_mib:>15.2f}")
    for line in lines[1:]:
        log(line)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = bp.device_slug(device, 1 if cuda else args.threads)
    with open(out / f"hf-step-{slug}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "vocab", "tokens", "hidden", "layers", "dtype", "k", "b",
                                               "method", "ms", "peak_mib", "logits_mib"])
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": bp.device_name(device), "vocab": args.vocab, "tokens": n_rows,
                             "hidden": hidden, "layers": args.layers, "dtype": dtype_name, "k": args.k,
                             "b": args.b, "method": r["method"], "ms": f"{r['ms']:.2f}",
                             "peak_mib": f"{r['peak_mib']:.1f}", "logits_mib": f"{logits_mib:.1f}"})
    (out / f"hf-step-{slug}.txt").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    run()

"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by tests/test_distributed.py.

Each case trains one step of a tiny random model patched with ``apply_prsl`` on this rank's half
of a batch and checks the loss and every parameter's gradient against one process on the whole
batch (float64; ZeRO-3 in float32, see DTYPES). Each rank's loss is
``sum / num_items_in_batch * world_size`` with the global token count, as HF ``Trainer`` does
(``average_tokens_across_devices``), since DDP and FSDP average the ranks' gradients. Prints one
``CASE <name> ok <max relative error>`` line per case.
"""

import os
import sys

import torch
import torch.distributed as dist

K, B = 5, 0.7
# float64 everywhere except ZeRO-3: zero.Init partitions only half, bfloat16 and float32 parameters
# (it asserts on float64), so its cases run in float32 against one float32 process.
DTYPES = {"zero3": torch.float32}
# Gradient errors are relative to the tensor's largest entry, floored at this fraction of the largest
# gradient of the model (see run()).
FLOOR = {torch.float64: 1e-6, torch.float32: 1e-3}
# name[@architecture of tests/tiny_models.py]; without one, a 2-layer Llama on 4 rows.
CASES = ["ddp", "fsdp2-root", "fsdp2-head-unit-reshard", "fsdp2-head-unit-noreshard", "fsdp2-head-unit-reshard-unfused",
         "zero3", "fsdp2-head-unit-reshard@llava", "zero3@paligemma2"]


def build(arch, dtype):
    """The model (``dtype``, fresh from its seed) and the whole batch (a dict with labels)."""
    if arch != "llama":
        import tiny_models  # tests/: a tiny random model of the architecture and its batch

        return tiny_models.build(arch, dtype=dtype)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    labels[1, 5:] = -100  # a short answer: the ranks count different numbers of tokens
    return LlamaForCausalLM(config).to(dtype), {"input_ids": ids, "labels": labels}


def reference(arch, dtype):
    """One process, the whole batch: PRSL on the unpatched model's logits."""
    from prsl_kernels.hf import align_labels
    from reference import prsl_loss_reference

    model, batch = build(arch, dtype)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    loss = prsl_loss_reference(model(**inputs).logits, align_labels(batch["labels"], True), K, B)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def rank_rows(batch, rank, world):
    """This rank's equal share of the batch's rows."""
    rows = batch["input_ids"].shape[0]
    share = slice(rank * rows // world, (rank + 1) * rows // world)
    return {key: value[share] if value.shape[0] == rows else value for key, value in batch.items()}


def shard(model, case):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    if case == "ddp":
        return DistributedDataParallel(model)
    # The FSDP2 recipe of docs/training.md as written: the architecture's own blocks (decoder and vision
    # layers alike), inner ones first, with no per-architecture attribute path.
    blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for block in reversed(blocks):
        fully_shard(block)
    if case.startswith("fsdp2-head-unit"):
        fully_shard(model.lm_head, reshard_after_forward=case.endswith("-reshard"))
    fully_shard(model, reshard_after_forward=not case.endswith("-noreshard"))
    return model


def zero3(model):
    """DeepSpeed ZeRO-3 on CPU over the gloo group: every parameter partitioned outside its module's
    forward (persistence threshold 0), so the head's weight is gathered only by its own hooks."""
    import deepspeed
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None  # gloo carries the collectives: skip a 25 s g++ build
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                      config=config)
    assert engine.module.lm_head.weight.numel() == 0  # partitioned: only its hooks gather it
    return engine


def run(case, rank, world):
    from prsl_kernels.hf import apply_prsl

    case, _, arch = case.partition("@")
    arch = arch or "llama"
    dtype = DTYPES.get(case, torch.float64)
    want_loss, want_grads = reference(arch, dtype)
    model, batch = build(arch, dtype)
    apply_prsl(model, K, B, fused_linear="unfused" not in case)
    wrapped = zero3(model) if case == "zero3" else shard(model, case.replace("-unfused", ""))
    n_items = (batch["labels"][:, 1:] != -100).sum()
    out = wrapped(**rank_rows(batch, rank, world), num_items_in_batch=n_items)
    loss = out.loss * world
    if case == "zero3":
        wrapped.backward(loss)
    else:
        loss.backward()
    total = loss.detach() / world
    dist.all_reduce(total)
    worst = (total - want_loss).abs().item() / want_loss.abs().item()
    overall = max(g.abs().max().item() for g in want_grads.values())
    for name, p in model.named_parameters():
        if case == "zero3":
            from deepspeed.utils import safe_get_full_grad
            grad = safe_get_full_grad(p)  # a collective: every rank calls it
        else:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        want = want_grads.get(name.replace("module.", ""))
        if want is None:  # no gradient in one process (e.g. CLIP's unused post-layernorm): none here either
            assert grad is None or not grad.any(), name
            continue
        # Relative to the tensor's scale, floored at a fraction of the largest gradient: gradients that
        # are zero in exact arithmetic (attention key biases) hold only rounding noise of the others,
        # ~1e-15 of the largest in float64 but ~1e-9 in float32 (hence a higher floor there).
        scale = max(want.abs().max().item(), FLOOR[dtype] * overall)
        worst = max(worst, (grad - want).abs().max().item() / scale)
    return worst


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    torch.set_num_threads(1)
    cases = sys.argv[1:] or CASES
    for case in cases:
        worst = run(case, rank, world)
        if rank == 0:
            print(f"CASE {case} ok {worst:.3e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

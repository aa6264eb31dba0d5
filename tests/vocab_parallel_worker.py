"""Run under ``torchrun --nproc_per_node {2,4}`` (gloo, CPU) by tests/test_vocab_parallel.py.

Every case computes vocab-parallel PRSL on this rank's shard and holds the loss, the row statistics
and every gradient to one process on the whole (unsharded) logits through the reference backend,
in float64. Prints one ``CASE <name> ok <max relative error>`` line per case (rank 0; the error is the
largest over the ranks).
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from prsl_kernels import linear_prsl_loss, prsl_loss
from prsl_kernels.spec import ROW_STATS as STATS  # every column, entropy included
from prsl_kernels.vocab_parallel import vocab_parallel_linear_prsl_loss, vocab_parallel_prsl_loss

F64 = torch.float64


# --------------------------------------------------------------------------- inputs and comparisons


def logits_of(n, vocab, seed, ties=False):
    """The same ``(n, vocab)`` logits on every rank; ``ties``: small integers, so many logits are equal
    (also at the threshold, and across shards)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        return torch.randint(-2, 3, (n, vocab), generator=g).to(F64)
    return torch.randn(n, vocab, generator=g, dtype=F64) * 2


def targets_of(n, vocab, seed, ignored=()):
    """Targets on every shard: all classes in turn (so each shard holds some, the first and last
    columns of each shard among them), shuffled; ``ignored`` rows get -100."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.arange(n) % vocab)[torch.randperm(n, generator=g)]
    t[list(ignored)] = -100
    return t


def rel(got, want):
    got, want = got.detach().to(F64), want.detach().to(F64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    same_nan = torch.isnan(got) == torch.isnan(want)
    if not bool(same_nan.all()):
        raise AssertionError(f"NaN pattern differs: {got} vs {want}")
    finite = ~torch.isnan(want)
    inf_ok = bool((got[torch.isinf(want)] == want[torch.isinf(want)]).all())
    if not inf_ok:
        raise AssertionError(f"infinities differ: {got} vs {want}")
    keep = finite & ~torch.isinf(want)
    if not bool(keep.any()):
        return 0.0
    scale = want[keep].abs().max().clamp_min(1e-30)
    return ((got[keep] - want[keep]).abs().max() / scale).item()


def local(x):
    return x.to_local() if isinstance(x, DTensor) else x


def full(x):
    return x.full_tensor() if isinstance(x, DTensor) else x


def reference(logits, target, k, b, reduction, upstream, **options):
    """One process, the whole logits: loss, stats and gradient from the reference backend."""
    z = logits.detach().clone().requires_grad_()
    loss, stats = prsl_loss(z, target, k, b, reduction=reduction, backend="reference", return_stats=True, **options)
    (local(loss) * upstream).sum().backward() if reduction == "none" else (loss * upstream).backward()
    return loss.detach(), stats, z.grad


def compare_stats(got, want, target, b, k):
    """Counted rows as the reference; ignored rows zero, as the fused kernels give them. With
    ``b == 0`` or ``k == 0`` the fused kernels skip the selection: tau = +inf, no penalty."""
    counted = target.reshape(-1) != -100
    worst = 0.0
    for name in STATS:
        g, w = getattr(got, name), getattr(want, name)
        assert not isinstance(g, DTensor), name
        assert bool((g[~counted] == 0).all()), (name, g)
        if (b == 0 or k == 0) and name in ("tau", "dist", "spread_sum", "tie_count"):
            want_skip = {"tau": float("inf")}.get(name, 0.0)
            assert bool((g[counted] == want_skip).all()), (name, g)
            continue
        worst = max(worst, rel(g[counted], w[counted]))
    return worst


# --------------------------------------------------------------------------- cases


def case_logits(mesh, *, n=12, vocab=11, k=3, b=0.7, reduction="mean", ties=False, ignored=(), seed=0,
                masked=False, target_dtensor=False, divisor=None, dtype=F64, replicated=False, **options):
    """prsl_loss on Shard(-1) logits (DTensor), or ``replicated`` ones, against one process."""
    z = logits_of(n, vocab, seed, ties).to(dtype)
    if masked:  # a masked vocabulary: some rows with fewer than k finite non-target logits
        z[0, 1:] = float("-inf")
        z[1, ::2] = float("-inf")
    t = targets_of(n, vocab, seed + 1, ignored)
    if masked:
        t[0] = 0
    upstream = torch.rand(n, generator=torch.Generator().manual_seed(seed + 2), dtype=F64) + 0.5 \
        if reduction == "none" else torch.tensor(1.7, dtype=F64)
    extra = {"divisor": divisor} if divisor is not None else {}
    want_loss, want_stats, want_grad = reference(z, t, k, b, reduction, upstream, **options)
    if divisor is not None:
        want_loss, want_grad = want_loss / divisor, want_grad / divisor
    dz = distribute_tensor(z, mesh, [Replicate()] if replicated else [Shard(-1)]).requires_grad_()
    target = distribute_tensor(t, mesh, [Replicate()]) if target_dtensor else t
    loss, stats = prsl_loss(dz, target, k, b, reduction=reduction, return_stats=True, **options, **extra)
    assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), loss
    (local(loss) * upstream).sum().backward() if reduction == "none" else (loss * upstream).backward()
    assert dz.grad.placements == dz.placements
    return max(rel(local(loss), want_loss), compare_stats(stats, want_stats, t, b, k), rel(full(dz.grad), want_grad))


def case_all_ignored(mesh):
    """Every row ignored: mean is NaN (as torch), sum 0, the gradient exactly 0."""
    z = logits_of(4, 9, 3)
    t = torch.full((4,), -100)
    dz = distribute_tensor(z, mesh, [Shard(-1)]).requires_grad_()
    loss = prsl_loss(dz, t, 3, 0.5)
    assert torch.isnan(local(loss)), loss
    loss.backward()
    assert bool((local(dz.grad) == 0).all())
    s = prsl_loss(distribute_tensor(z, mesh, [Shard(-1)]), t, 3, 0.5, reduction="sum")
    assert local(s).item() == 0.0
    return 0.0


def case_non_finite(mesh):
    """A NaN (row 0) or +inf (row 1) logit in one shard makes that row's loss and entropy NaN, as in one
    process; an ignored row holding NaN (row 2) has loss, entropy and gradient 0, the other rows are
    untouched."""
    z, t = logits_of(6, 10, 13), targets_of(6, 10, 14)
    z[0, 7], z[1, 2], z[2, 9] = float("nan"), float("inf"), float("nan")
    t[2] = -100
    upstream = torch.ones(6, dtype=F64)
    want_loss, _, want_grad = reference(z, t, 3, 0.5, "none", upstream)
    dz = distribute_tensor(z, mesh, [Shard(-1)]).requires_grad_()
    loss, stats = prsl_loss(dz, t, 3, 0.5, reduction="none", return_stats=True)
    loss = local(loss)
    loss.sum().backward()
    assert bool(torch.isnan(stats.entropy[:2]).all()) and stats.entropy[2] == 0, stats.entropy
    grad = full(dz.grad)
    assert bool(torch.isnan(loss[:2]).all()) and loss[2] == 0 and bool((grad[2] == 0).all()), (loss, grad)
    assert bool(torch.isnan(grad[:2]).any(-1).all())
    return max(rel(loss[3:], want_loss[3:]), rel(grad[3:], want_grad[3:]))


def case_megatron(mesh, *, widths, k=4, b=0.6, reduction="mean", **options):
    """vocab_parallel_prsl_loss on local shards of any widths (one may be empty), vocab_size inferred."""
    rank, world = dist.get_rank(), dist.get_world_size()
    widths = widths[:world]
    vocab, n = sum(widths), 10
    z, t = logits_of(n, vocab, 5), targets_of(n, vocab, 6, ignored=(2,))
    upstream = torch.rand(n, dtype=F64, generator=torch.Generator().manual_seed(7)) if reduction == "none" \
        else torch.tensor(1.0, dtype=F64)
    want_loss, want_stats, want_grad = reference(z, t, k, b, reduction, upstream, **options)
    start = sum(widths[:rank])
    mine = z[:, start:start + widths[rank]].clone().requires_grad_()
    loss, stats = vocab_parallel_prsl_loss(mine, t, k, b, vocab_start=start, reduction=reduction, return_stats=True,
                                           **options)
    (local(loss) * upstream).sum().backward() if reduction == "none" else (loss * upstream).backward()
    return max(rel(loss, want_loss), compare_stats(stats, want_stats, t, b, k),
               rel(mine.grad, want_grad[:, start:start + widths[rank]]))


def case_linear(mesh, *, n=9, hidden_size=5, vocab=13, k=5, b=0.8, reduction="mean", bias=True,
                hidden_dtensor=False, chunk_size=None, **options):
    """linear_prsl_loss with the head's weight a Shard(0) DTensor (ColwiseParallel's) against one process."""
    g = torch.Generator().manual_seed(11)
    h = torch.randn(n, hidden_size, generator=g, dtype=F64)
    w = torch.randn(vocab, hidden_size, generator=g, dtype=F64)
    c = torch.randn(vocab, generator=g, dtype=F64) if bias else None
    t = targets_of(n, vocab, 12, ignored=(1,))
    upstream = torch.rand(n, generator=g, dtype=F64) + 0.5 if reduction == "none" else torch.tensor(0.9, dtype=F64)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    cr = c.clone().requires_grad_() if bias else None
    want_loss, want_stats = prsl_loss(F.linear(hr, wr, cr), t, k, b, reduction=reduction, backend="reference",
                                      return_stats=True, **options)
    (want_loss * upstream).sum().backward() if reduction == "none" else (want_loss * upstream).backward()
    hd = h.clone().requires_grad_()
    hin = DTensor.from_local(hd, mesh, [Replicate()], run_check=False) if hidden_dtensor else hd
    wd = distribute_tensor(w, mesh, [Shard(0)]).requires_grad_()
    cd = distribute_tensor(c, mesh, [Shard(0)]).requires_grad_() if bias else None
    loss, stats = linear_prsl_loss(hin, wd, t, k, b, bias=cd, reduction=reduction, return_stats=True,
                                   chunk_size=chunk_size, **options)
    assert isinstance(loss, DTensor)
    (local(loss) * upstream).sum().backward() if reduction == "none" else (loss * upstream).backward()
    worst = max(rel(local(loss), want_loss.detach()), compare_stats(stats, want_stats, t, b, k),
                rel(hd.grad, hr.grad), rel(full(wd.grad), wr.grad))
    if bias:
        worst = max(worst, rel(full(cd.grad), cr.grad))
    return worst


def case_linear_megatron(mesh, *, reduction="sum"):
    """vocab_parallel_linear_prsl_loss on this rank's rows of the head."""
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(21)
    n, hidden_size, vocab = 7, 4, 10
    h = torch.randn(n, hidden_size, generator=g, dtype=F64)
    w = torch.randn(vocab, hidden_size, generator=g, dtype=F64)
    t = targets_of(n, vocab, 22)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = prsl_loss(F.linear(hr, wr), t, 6, 0.5, reduction=reduction, backend="reference", z_loss=1e-2)
    want.backward()
    bounds = [vocab * r // world for r in range(world + 1)]
    hd = h.clone().requires_grad_()
    wd = w[bounds[rank]:bounds[rank + 1]].clone().requires_grad_()
    loss = vocab_parallel_linear_prsl_loss(hd, wd, t, 6, 0.5, vocab_start=bounds[rank], vocab_size=vocab,
                                           reduction=reduction, z_loss=1e-2)
    loss.backward()
    return max(rel(loss, want.detach()), rel(hd.grad, hr.grad), rel(wd.grad, wr.grad[bounds[rank]:bounds[rank + 1]]))


# --------------------------------------------------------------------------- Hugging Face: apply_prsl on a TP head


K, B = 5, 0.7


def tiny_llama(vocab=37):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 9), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    labels[1, 5:] = -100
    return LlamaForCausalLM(config).to(F64), {"input_ids": ids, "labels": labels}


def one_process(batch):
    """The unpatched model on the whole batch, PRSL by the reference backend on its logits."""
    from prsl_kernels.hf import align_labels

    model, _ = tiny_llama()
    logits = model(input_ids=batch["input_ids"]).logits
    loss = prsl_loss(logits, align_labels(batch["labels"], True), K, B, backend="reference")
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}, logits.argmax(-1)


def grad_error(model, want_grads, prefix=""):
    overall = max(g.abs().max().item() for g in want_grads.values())
    worst = 0.0
    for name, p in model.named_parameters():
        want = want_grads[name.replace(prefix, "")]
        got = full(p.grad)
        scale = max(want.abs().max().item(), 1e-6 * overall)
        worst = max(worst, (got - want).abs().max().item() / scale)
    return worst


def case_apply_prsl_tp(mesh, *, fused=True, use_local_output=False):
    """apply_prsl on a Llama whose lm_head is ColwiseParallel: every rank the whole batch, the head's
    vocabulary split over the ranks; loss and every gradient equal one process."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from prsl_kernels.hf import apply_prsl

    model, batch = tiny_llama()
    want_loss, want_grads, want_predictions = one_process(batch)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1),
                                                               use_local_output=use_local_output)})
    token_loss = apply_prsl(model, K, B, fused_linear=fused)
    out = model(**batch)
    assert not isinstance(out.loss, DTensor) and out.loss.dim() == 0
    out.loss.backward()
    stats = token_loss.pop_stats()
    assert stats["tokens"] == int((batch["labels"][:, 1:] != -100).sum()), stats
    worst = max(rel(out.loss, want_loss), grad_error(model, want_grads))
    if fused:  # an evaluation forward: each position's argmax token, from the shards' best
        with torch.no_grad():
            assert torch.equal(model(**batch).predictions, want_predictions)
    with torch.no_grad():  # generation / inference without labels: the model is unchanged
        logits = model(input_ids=batch["input_ids"]).logits
    width = torch.tensor(local(logits).shape[-1])
    dist.all_reduce(width)
    assert isinstance(logits, DTensor) != use_local_output and int(width) == 37, (type(logits), width)
    return worst


def case_unfused_local_output_refused(mesh):
    """fused_linear=False needs the logits as a DTensor: a head returning its local slice is refused."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from prsl_kernels.hf import apply_prsl

    model, batch = tiny_llama()
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    apply_prsl(model, K, B, fused_linear=False)
    try:
        model(**batch)
    except NotImplementedError as error:
        assert "use_local_output=False" in str(error), error
        return 0.0
    raise AssertionError("a local slice of the logits was taken for the whole")


def case_fsdp2_tp(_mesh):
    """FSDP2 over a 2 x 2 mesh: the batch split over "dp", the lm_head ColwiseParallel over "tp",
    apply_prsl fused; each rank's loss sum / (all tokens) * dp, as Trainer averages over DDP/FSDP."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from prsl_kernels.hf import apply_prsl

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model, batch = tiny_llama()
    want_loss, want_grads, _ = one_process(batch)
    parallelize_module(model, mesh["tp"], {"lm_head": ColwiseParallel(output_layouts=Shard(-1),
                                                                     use_local_output=False)})
    apply_prsl(model, K, B)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dp_rank = mesh["dp"].get_local_rank()
    rows = slice(2 * dp_rank, 2 * dp_rank + 2)
    n_items = (batch["labels"][:, 1:] != -100).sum()
    out = model(input_ids=batch["input_ids"][rows], labels=batch["labels"][rows], num_items_in_batch=n_items)
    (out.loss * 2).backward()
    total = out.loss.detach().clone()
    dist.all_reduce(total, group=mesh["dp"].get_group())
    return max(rel(total, want_loss), grad_error(model, want_grads))


CASES = {
    "logits-mean": lambda m: case_logits(m),
    "logits-sum-divisor": lambda m: case_logits(m, reduction="sum", divisor=torch.tensor(7.0, dtype=F64)),
    "logits-none": lambda m: case_logits(m, reduction="none", ignored=(3, 4)),
    "ties": lambda m: case_logits(m, vocab=16, k=5, ties=True, seed=2),
    "ties-none": lambda m: case_logits(m, vocab=15, k=7, ties=True, seed=3, reduction="none"),
    "k-above-shard": lambda m: case_logits(m, vocab=10, k=8, seed=4, ignored=(0,)),
    "tiny-vocab": lambda m: case_logits(m, n=6, vocab=3, k=2, seed=5),  # an empty shard at 4 ranks
    "options": lambda m: case_logits(m, softcap=2.5, label_smoothing=0.1, z_loss=1e-2, ignored=(5,), seed=6),
    "options-ties-none": lambda m: case_logits(m, vocab=13, k=4, ties=True, softcap=3.0, label_smoothing=0.2,
                                              reduction="none", seed=7),
    "masked-vocab": lambda m: case_logits(m, vocab=12, k=6, masked=True, seed=8),
    # Replicated logits: every rank computes the whole loss with prsl_loss on its local value.
    "replicated-options": lambda m: case_logits(m, replicated=True, softcap=2.5, label_smoothing=0.1, seed=10),
    "k0": lambda m: case_logits(m, k=0, label_smoothing=0.3),
    "b0": lambda m: case_logits(m, b=0.0, z_loss=1e-3),
    "b-negative-target-dtensor": lambda m: case_logits(m, b=-0.4, target_dtensor=True, seed=9),
    "bf16-options": lambda m: case_logits(m, n=20, vocab=301, k=9, dtype=torch.bfloat16, softcap=20.0,
                                          label_smoothing=0.1, ignored=(3,)),
    "all-ignored": case_all_ignored,
    "non-finite": case_non_finite,
    "megatron": lambda m: case_megatron(m, widths=[5, 0, 7, 2]),
    "megatron-none-options": lambda m: case_megatron(m, widths=[1, 9, 3, 4], reduction="none", softcap=1.5,
                                                     label_smoothing=0.05),
    "linear-mean": lambda m: case_linear(m),
    "linear-none-options": lambda m: case_linear(m, reduction="none", softcap=2.0, z_loss=1e-2, hidden_dtensor=True),
    "linear-chunks-k-above-shard": lambda m: case_linear(m, vocab=7, k=6, bias=False, chunk_size=2),
    "linear-megatron": case_linear_megatron,
    "apply-prsl-tp-fused": lambda m: case_apply_prsl_tp(m),
    "apply-prsl-tp-fused-local-output": lambda m: case_apply_prsl_tp(m, use_local_output=True),
    "apply-prsl-tp-unfused": lambda m: case_apply_prsl_tp(m, fused=False),
    "apply-prsl-tp-unfused-local-output-refused": case_unfused_local_output_refused,
    "fsdp2-tp": case_fsdp2_tp,
}
ONLY_AT = {"fsdp2-tp": 4}


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    names = sys.argv[1:] or [name for name in CASES if ONLY_AT.get(name, world) == world]
    for name in names:
        worst = torch.tensor(CASES[name](mesh), dtype=F64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            print(f"CASE {name} ok {worst.item():.3e}", flush=True)
    dist.barrier()  # no rank tears gloo down while another still sends (an abort at exit otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

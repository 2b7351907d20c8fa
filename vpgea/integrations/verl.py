"""verl's fused-kernel contract, computed by ``vpgea.token_logprobs``.

verl (``actor_rollout_ref.model.use_fused_kernels=True`` with ``fused_kernel_options.impl_backend=triton``) calls
``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy(hidden, weight, labels, temperature, "none"[,
tp_group])`` from its patched model forwards (dense HF models, Qwen2/3-VL, GLM-4V; Megatron's fused forward with the
tensor-parallel group) and reads ``(log_probs, entropy)``. ``linear_cross_entropy`` here has that signature and those
returns; ``patch_verl()`` puts it in verl's place, and importing ``vpgea.integrations.verl_patch`` does so, which is
how a verl config turns it on in every worker:

    actor_rollout_ref.model.use_fused_kernels=True
    actor_rollout_ref.model.fused_kernel_options.impl_backend=triton
    actor_rollout_ref.model.external_lib=vpgea.integrations.verl_patch

(``VERL_USE_EXTERNAL_MODULES=vpgea.integrations.verl_patch`` in the workers' environment does the same.)

Vocab-parallel heads (``dist_process_group``): each rank holds rows ``[rank * V_local, (rank + 1) * V_local)`` of the
head and the global labels, as in verl. Each rank scores its shard with ``token_logprobs`` and the per-row
log-sum-exps, target logits and entropy moments are combined across the group (an all-gather of ``3 * N`` floats);
every rank returns the global log-probs and entropies. As verl's kernel, the backward gives each rank the gradient of
its own shard and its partial ``d_hidden`` (the caller's Megatron region reduces it).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from vpgea import logprobs as _lp

__all__ = ["linear_cross_entropy", "patch_verl"]

_REDUCTIONS = ("none", "sum", "mean")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of ``labels`` under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: ``[..., D]`` (verl passes ``[B, T, D]`` or ``[1, total, D]``), float32 / bfloat16 / float16.
        weight: ``[V, D]`` (the local ``[V / tp, D]`` shard with ``dist_process_group``), same dtype as ``hidden``.
        labels: ``[...]`` int64 token ids in ``[0, V)`` (global ids with a group); every position is scored.
        temperature: a float > 0.
        reduction: "none" (per token), "sum" or "mean" of the log-probs (the entropy stays per token).
        dist_process_group: the tensor-parallel group the head's vocabulary is split over, or None.

    Returns:
        ``(log_probs, entropy)``, float32: ``log_probs`` ``[N]`` (``N`` = number of labels, flattened as verl's
        kernel returns them) or a scalar with "sum" / "mean"; ``entropy`` ``[N]``. Differentiable w.r.t. ``hidden``
        and ``weight``.
    """
    if not isinstance(temperature, (float, int)) or isinstance(temperature, bool):
        raise TypeError(f"linear_cross_entropy: temperature must be a float, got {type(temperature).__name__}")
    if not isinstance(reduction, str) or reduction.lower() not in _REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must match hidden.shape[:-1] "
                         f"{tuple(hidden.shape[:-1])}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if dist_process_group is None or dist.get_world_size(dist_process_group) == 1:
        logp, ent = _lp.token_logprobs(h, weight, y, temperature=float(temperature), return_entropy=True)
    else:
        logp, ent = _vocab_parallel(h, weight, y, float(temperature), dist_process_group)
    reduction = reduction.lower()
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.sum() / max(y.numel(), 1)
    return logp, ent


def _vocab_parallel(h, weight, y, temperature, group):
    """Global ``(log_probs, entropy)`` from this rank's vocabulary shard; gradients reach this rank's shard only."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    v_local = weight.shape[0]
    local = y - rank * v_local
    mine = (local >= 0) & (local < v_local)
    # This shard's distribution, scored at a column it holds (the label where it owns it, else column 0).
    t = torch.where(mine, local, torch.zeros_like(local))
    lp, ent = _lp.token_logprobs(h, weight, t, temperature=temperature, return_entropy=True)
    (h_c, w_c, _), guard = _lp.autocast_inputs(h, weight, None)
    z_t = (h_c.float() * w_c.index_select(0, t).float()).sum(-1) / temperature  # [N] the chosen column's logit
    lse = z_t - lp  # this shard's log-sum-exp; d lse / d z_j = p_j (the z_t terms cancel)
    mu = lse - ent  # this shard's E[z]
    z_y = torch.where(mine, z_t, 0.0)  # the label's logit, from the shard that holds it
    # Other ranks' values are constants here: each rank differentiates through its own shard only.
    mine_stats = torch.stack([lse, mu, z_y])  # [3, N]
    gathered = [torch.empty_like(mine_stats) for _ in range(world)]
    dist.all_gather(gathered, mine_stats.detach().contiguous(), group=group)
    gathered[rank] = mine_stats
    stats = torch.stack(gathered)  # [world, 3, N]
    lse_all, mu_all, zy_all = stats[:, 0], stats[:, 1], stats[:, 2]
    lse_g = torch.logsumexp(lse_all, dim=0)
    w = torch.exp(lse_all - lse_g)  # each shard's share of the probability mass
    return zy_all.sum(0) - lse_g, lse_g - (w * mu_all).sum(0)


def patch_verl() -> dict[str, object]:
    """Put ``linear_cross_entropy`` in place of verl's ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
    (and every loaded ``verl`` module that imported it). Returns ``{"module.attribute": original}``."""
    import importlib

    try:
        module = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
    except ImportError as err:
        raise ImportError("patch_verl: verl is not installed, or has no verl.utils.kernel.linear_cross_entropy "
                          "(the fused-kernel contract vpgea implements)") from err
    original = getattr(module, "linear_cross_entropy", None)
    if original is None:
        raise RuntimeError("patch_verl: verl.utils.kernel.linear_cross_entropy has no linear_cross_entropy")
    if original is linear_cross_entropy:
        return {}
    replaced = {}
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "verl" or name.startswith("verl.")):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                replaced[f"{name}.{attr}"] = original
                setattr(mod, attr, linear_cross_entropy)
    return replaced

"""Data-parallel scale-out: FSDP2 under ``torchrun``, sharded checkpoints, rank-0 logging, failing together.

Everything here is a no-op (or the plain single-process path) when the process was not started by ``torchrun``
(``WORLD_SIZE`` unset or 1), so the trainer calls these functions unconditionally.

Work split: questions, not paths, are divided among ranks, so a question's G posterior and K prior paths stay on one
rank and the group advantages need no communication. Each rank's loss is its sum over local questions divided by the
*global* number of questions and multiplied by the world size; FSDP averages gradients over ranks, so N ranks with a
global batch produce the gradient of one rank with the same global batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if (world > 1 and device.type == "cuda" and device.index is not None and torch.cuda.device_count() > 1
            and device.index != local_rank % torch.cuda.device_count()):
        raise ValueError(
            f"rank {rank}: --device {device} names one GPU for every rank of a {world}-process run; pass --device "
            f"cuda and each rank takes cuda:LOCAL_RANK (here cuda:{local_rank % torch.cuda.device_count()})"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        log.info("joined process group: rank %d of %d (%s, %s)", rank, world, backend, device)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # A barrier first: tearing gloo down while a peer is still in a collective aborts the process.
        dist.barrier()
        dist.destroy_process_group()


def loss_scale(local_questions: int, global_questions: int, info: DistInfo) -> float:
    """Factor turning a rank's *sum* of per-question losses into its share of the global mean (see module doc)."""
    if global_questions <= 0:
        return 0.0
    return info.world_size / global_questions if local_questions else 0.0


def _device(info: DistInfo) -> torch.device:
    """Where collective tensors live: the rank's GPU for NCCL, the CPU for gloo."""
    return info.device if info.device.type == "cuda" else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_max(value: int, info: DistInfo) -> int:
    """The largest ``value`` over ranks."""
    if not info.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(obj, info: DistInfo) -> list | None:
    """Every rank's picklable ``obj``, in rank order, on rank 0 (``None`` elsewhere). Collective."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank. Collective."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_agree(ok: bool, info: DistInfo) -> bool:
    """True only if every rank says ``ok``: a rank that failed makes all of them stop together."""
    if not info.enabled:
        return ok
    flag = torch.tensor([1 if ok else 0], device=_device(info))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_reduce_sum(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sum of each scalar over ranks (float64), on every rank. Collective."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(inner, "get_decoder"):
        layers = getattr(inner.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


def apply_fsdp(root: torch.nn.Module, hf_model: torch.nn.Module, info: DistInfo, *, mixed_precision: bool) -> None:
    """Shard with FSDP2: each decoder layer is a unit, ``root`` (which owns the embeddings, final norm and the head,
    tied or not) is the outer unit. The fused log-prob kernels run inside ``root.forward``, so they see the head
    weight as FSDP gathers it and its gradient flows back through FSDP's hooks.

    ``mixed_precision``: bf16 parameters for compute, fp32 gradient reduction (GPU runs).
    """
    if not info.enabled:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kw = {"mesh": mesh}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = _decoder_layers(hf_model)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(root, **kw)
    log.info("FSDP2: %d decoder layers + root sharded over %d ranks", len(layers), info.world_size)


def clip_grad_norm(params, max_norm: float) -> float:
    """Gradient clipping that works for plain tensors and FSDP2's DTensors alike; returns the total norm."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 ``DTensor`` shard (a collective: every rank must call it, in the same order), or
    ``t`` itself. CPU-offloaded shards go to this process's GPU first: NCCL gathers only device tensors."""
    if not hasattr(t, "full_tensor"):
        return t
    if t.device.type == "cpu" and torch.cuda.is_available():
        t = t.to("cuda")
    return t.full_tensor()


def full_state_dict(model: torch.nn.Module, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """Full (unsharded) CPU state dict on rank 0, ``None`` on the others. Collective: every rank must call it."""
    if not info.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if info.is_main else None

"""Packed (varlen) causal attention backends, registered with transformers' attention-function registry.

Three backends compute causal attention over sequences packed as ``[1, T]`` with boundaries ``cu_seqlens``:

- ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, when flash-attn is installed);
- ``"torch_varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16, recent PyTorch);
- ``"sdpa"``: ``scaled_dot_product_attention`` with a block-diagonal causal mask; runs everywhere (the CPU path).

:func:`register` adds them to ``transformers.AttentionInterface`` as ``"vpgea_varlen"`` (automatic choice per call,
from the tensors' device and dtype, logged once per choice) and ``"vpgea_flash_attn"``, ``"vpgea_torch_varlen"``,
``"vpgea_sdpa"`` (forced). A model switched to one of them with ``model.set_attn_implementation(name)`` runs packed
with no modelling code copied: pass ``input_ids [1, T]``, ``position_ids [1, T]`` and the boundaries as the kwargs
transformers already forwards to attention functions (``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/
``max_length_k``); without them the boundaries are derived from ``position_ids`` (a new sequence wherever the
position does not follow on by one).

A mask function is registered under the same names so that the model's own mask creation never builds a
``[T, T]`` mask for packed input; with padding or a KV cache (generation) the standard SDPA mask is built and
attention falls back to transformers' SDPA path, so the same module still generates correctly.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "IMPL_NAMES",
    "available_backends",
    "resolve_backend",
    "impl_name",
    "register",
    "varlen_attention",
]

logger = logging.getLogger(__name__)

BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
AUTO_NAME = "vpgea_varlen"
IMPL_NAMES = {"auto": AUTO_NAME, **{b: f"vpgea_{b}" for b in BACKENDS}}
_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------------
# availability and choice


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=None)
def _torch_varlen_func():
    try:
        from torch.nn.attention import varlen as _varlen
    except Exception:
        return None
    fn = getattr(_varlen, "varlen_attn", None)
    if fn is None:
        return None
    try:
        params = frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    if not params & {"is_causal", "window_size"}:  # a version that cannot be told to be causal is of no use here
        return None
    return fn, params


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _backend_ok(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` if ``backend`` can run on ``device``/``dtype``, else the reason it cannot."""
    if backend == "sdpa":
        return None
    if device.type != "cuda":
        return f"{backend} needs a CUDA device, got {device.type}"
    if dtype not in _HALF:
        return f"{backend} needs float16 or bfloat16 activations, got {dtype}"
    major, minor = _capability(device.index)
    if major < 8:  # both are FlashAttention-2 kernels: Ampere or newer
        return f"{backend} needs a GPU of compute capability >= 8.0, got {major}.{minor}"
    if backend == "flash_attn" and _flash_attn_func() is None:
        return "flash_attn is not installed (pip install flash-attn)"
    if backend == "torch_varlen" and _torch_varlen_func() is None:
        return (f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn with causal masking "
                "(is_causal or window_size)")
    return None


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Backends usable for activations of ``dtype`` on ``device``, in order of preference."""
    device = torch.device(device)
    return [b for b in BACKENDS if _backend_ok(b, device, dtype) is None]


def resolve_backend(attn_impl: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend ``attn_impl`` ("auto" or one of :data:`BACKENDS`) means for ``device``/``dtype``.

    "auto" prefers flash-attn, then PyTorch's varlen attention, then masked SDPA. A named backend that cannot run
    is an error, never a silent fallback.
    """
    if attn_impl == "auto":
        return available_backends(device, dtype)[0]
    if attn_impl not in BACKENDS:
        raise ValueError(f"attn_impl must be 'auto' or one of {BACKENDS}, got {attn_impl!r}")
    why = _backend_ok(attn_impl, torch.device(device), dtype)
    if why is not None:
        raise RuntimeError(f"attention backend {attn_impl!r} cannot run: {why}")
    return attn_impl


def impl_name(attn_impl: str) -> str:
    """The transformers attention-implementation name for ``attn_impl`` ("auto" or a backend)."""
    if attn_impl not in IMPL_NAMES:
        raise ValueError(f"attn_impl must be 'auto' or one of {BACKENDS}, got {attn_impl!r}")
    return IMPL_NAMES[attn_impl]


_logged: set[tuple] = set()


def _log_choice(attn_impl: str, backend: str, device: torch.device, dtype: torch.dtype) -> None:
    key = (attn_impl, backend, device.type, dtype)
    if key not in _logged:
        _logged.add(key)
        logger.info(
            "vpgea packed attention: backend %r (requested %r) for %s activations on %s; available: %s",
            backend, attn_impl, dtype, device.type, available_backends(device, dtype),
        )


# --------------------------------------------------------------------------------------------------------------------
# boundaries


def _cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``position_ids: [B, T]`` -> ``cu_seqlens: [S+1]`` int32 over the flattened ``B*T`` tokens, and max length.

    A sequence starts at every row start and wherever a position does not follow its predecessor by one.
    """
    pos = position_ids.reshape(position_ids.shape[0], -1)
    b, t = pos.shape
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = torch.nonzero(start.reshape(-1), as_tuple=False)[:, 0]
    cu = torch.cat([starts, starts.new_tensor([b * t])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _boundaries(query: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, int]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu):
            raise ValueError("vpgea packed attention is self-attention: cu_seq_lens_k must equal cu_seq_lens_q")
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())
        return cu.to(device=query.device, dtype=torch.int32), int(max_len)
    position_ids = kwargs.get("position_ids")
    b, _, t, _ = query.shape
    if position_ids is not None and position_ids.shape[-1] == t:
        return _cu_seqlens_from_positions(position_ids.expand(b, t).to(query.device))
    # No packing information: every row is one causal sequence.
    return torch.arange(0, (b + 1) * t, t, device=query.device, dtype=torch.int32), t


# --------------------------------------------------------------------------------------------------------------------
# backends. Inputs in flat varlen layout: q [N, H, D], k/v [N, Hk, D], cu_seqlens [S+1] int32; output [N, H, D].


def _block_causal_mask(cu_seqlens: torch.Tensor, n: int, sliding_window: int | None) -> torch.Tensor:
    """``[N, N]`` bool, True where query ``i`` may attend key ``j``: same sequence, ``j <= i`` (and in the window)."""
    idx = torch.arange(n, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), idx, right=True)  # [N] sequence of each token
    mask = (seq[:, None] == seq[None, :]) & (idx[:, None] >= idx[None, :])
    if sliding_window is not None:
        mask &= idx[:, None] - idx[None, :] < sliding_window  # transformers' convention: kv > q - window
    return mask


def _sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, dropout, sliding_window):
    n, h, _ = q.shape
    hk = k.shape[1]
    if hk != h:  # GQA: repeat each kv head for its group of query heads
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    num_seqs = cu_seqlens.shape[0] - 1
    if num_seqs > 1 and num_seqs * max_seqlen * max_seqlen < n * n:
        return _sdpa_padded(q, k, v, cu_seqlens, max_seqlen, scale=scale, dropout=dropout,
                            sliding_window=sliding_window)
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, N, D]
    if num_seqs == 1 and sliding_window is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout, is_causal=True, scale=scale)
    else:
        mask = _block_causal_mask(cu_seqlens, n, sliding_window)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout, scale=scale)
    return out[0].transpose(0, 1)


def _sdpa_padded(q, k, v, cu_seqlens, longest, *, scale, dropout, sliding_window):
    """The packed sequences as a padded batch ``[S, H, L, D]`` with a causal, key-padding mask: ``S L^2`` scores
    instead of the block mask's ``N^2`` (many short sequences packed together: 8x fewer on the toy's training pass).
    Index arithmetic only (no host sync in the layer); ``longest`` must be at least the longest sequence, as for
    flash-attn. A padded query row still sees its sequence's keys (an empty
    sequence's rows see its first slot), so no row is empty and nothing is NaN; padded rows are dropped."""
    n, s = q.shape[0], cu_seqlens.shape[0] - 1
    cu = cu_seqlens.to(torch.int64)
    tok = torch.arange(n, device=q.device)
    seq = torch.searchsorted(cu[1:], tok, right=True)  # [N] sequence of each token
    slot = seq * longest + (tok - cu[seq])  # [N] its place in the flattened [S, L] batch
    lengths = cu[1:] - cu[:-1]  # [S]

    def pad(x):
        return x.new_zeros(s * longest, *x.shape[1:]).index_copy(0, slot, x).view(s, longest, *x.shape[1:])

    pos = torch.arange(longest, device=q.device)
    mask = (pos[:, None] >= pos[None, :])[None] & (pos[None, None, :] < lengths[:, None, None])  # [S, L(q), L(k)]
    if sliding_window is not None:
        mask &= (pos[:, None] - pos[None, :] < sliding_window)[None]
    mask |= (pos[None, None, :] == 0) & (lengths == 0)[:, None, None]
    out = F.scaled_dot_product_attention(*(pad(x).transpose(1, 2) for x in (q, k, v)), attn_mask=mask[:, None],
                                         dropout_p=dropout, scale=scale)  # [S, H, L, D]
    return out.transpose(1, 2).reshape(s * longest, *q.shape[1:]).index_select(0, slot)  # [N, H, D]


def _flash_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, dropout, sliding_window):
    fn = _flash_attn_func()
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    return fn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p=dropout, softmax_scale=scale, causal=True, window_size=window,
    )


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, *, scale, dropout, sliding_window):
    fn, params = _torch_varlen_func()
    if dropout:
        raise NotImplementedError("torch_varlen attention has no dropout; use flash_attn or sdpa when training with it")
    kw = {}
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None:  # early versions take no scale: fold the ratio to the default 1/sqrt(D) into q
        q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if "window_size" in params:  # torch >= 2.11: causal is window (-1, 0)
        kw["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
    elif sliding_window is not None:
        raise NotImplementedError(f"torch {torch.__version__} varlen_attn has no sliding window; use another backend")
    if "is_causal" in params:
        kw["is_causal"] = True
    return fn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kw)


_BACKEND_FNS = {"flash_attn": _flash_varlen, "torch_varlen": _torch_varlen, "sdpa": _sdpa_varlen}


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    backend: str = "auto",
    scale: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence.

    q: [N, H, D]; k, v: [N, Hk, D] with ``H % Hk == 0``; cu_seqlens: [S+1] int32 with ``cu_seqlens[-1] == N``;
    max_seqlen: the longest sequence. Returns [N, H, D] in q's dtype.
    """
    chosen = resolve_backend(backend, q.device, q.dtype)
    _log_choice(backend, chosen, q.device, q.dtype)
    return _BACKEND_FNS[chosen](
        q, k, v, cu_seqlens, max_seqlen, scale=scale, dropout=dropout, sliding_window=sliding_window
    )


# --------------------------------------------------------------------------------------------------------------------
# transformers integration


def _attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    *,
    _backend: str,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query [B, H, Tq, D], key/value [B, Hk, Tk, D] -> [B, Tq, H, D]."""
    b, h, t, d = query.shape
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("vpgea packed attention does not support attention sinks (s_aux)")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if attention_mask is not None or key.shape[2] != t or not is_causal:
        # Padding mask, KV cache (generation) or bidirectional attention: not the packed causal case; transformers'
        # own SDPA path handles it exactly.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs
        )
    if softcap is not None:
        raise NotImplementedError("vpgea packed attention does not support attention logit softcapping")
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        # fp32 weights under autocast: the projections come out in the autocast dtype but RoPE (whose cos/sin follow
        # the fp32 residual stream) hands back fp32 q and k. Attention runs in the autocast dtype, as transformers'
        # own flash path does; otherwise flash/varlen would be refused and the masked-SDPA fallback would build an
        # [N, N] mask in every layer.
        dt = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    cu_seqlens, max_seqlen = _boundaries(query, kwargs)
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], value.shape[3])
    out = varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, backend=_backend, scale=scaling, dropout=dropout,
        sliding_window=sliding_window,
    )
    return out.reshape(b, t, h, -1), None


def _mask_function(batch_size: int, *, kv_length: int, kv_offset: int = 0, attention_mask=None, **kwargs):
    """Mask interface for the vpgea names: no mask at all for unpadded, uncached input (attention derives the
    block-diagonal structure itself, so no ``[T, T]`` mask is built); transformers' SDPA mask otherwise.

    transformers 5 passes the query span as ``q_length``/``q_offset``, 4.5x as ``cache_position``; both are accepted
    and passed on unchanged to ``sdpa_mask``, whose signature follows the same version.
    """
    from transformers.masking_utils import sdpa_mask

    if "q_length" in kwargs:
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
    else:
        cache_position = kwargs["cache_position"]  # [q_length] absolute positions of the queries
        q_length, q_offset = cache_position.shape[0], None  # None: "not known to be 0" without a device sync
    no_padding = attention_mask is None or (attention_mask.shape[-1] == kv_length and bool(attention_mask.all()))
    no_cache = kv_length == q_length and kv_offset == 0 and (q_offset is None or (
        not isinstance(q_offset, torch.Tensor) and q_offset == 0))
    if no_padding and no_cache:
        return None
    kwargs.pop("dtype", None)
    kwargs.pop("config", None)
    return sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, attention_mask=attention_mask,
                     **kwargs)


_registered = False


def register() -> None:
    """Register the vpgea attention functions and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for attn_impl, name in IMPL_NAMES.items():
        fn = functools.partial(_attention_forward, _backend=attn_impl)
        functools.update_wrapper(fn, _attention_forward)
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _mask_function)
    _registered = True

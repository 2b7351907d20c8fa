"""The VPG-EA loss over packed reasoning paths (DESIGN.md step 7), its fused linear form, and the GRPO loss.

``vpgea_loss(teacher_logps, student_logps, advantages, cu_seqlens, *, beta)`` takes per-token log-probs of S packed
paths under the teacher view ``q`` (prompt with the reference answer as a hint) and the student view ``pi``, and
returns ``(loss, metrics)`` with

    loss = sum_i c_i [ -A_i log q_i + beta 1[A_i > 0] (sg[log q_i] - log pi_i) ]

where ``log q_i``, ``log pi_i`` are the token sums over path i and ``c_i`` is the normaliser:

- ``"sum"``:          ``c_i = 1/S``          (the formula of the issue: mean over paths of sequence log-likelihoods)
- ``"token"``:        ``c_i = 1/(S n_i)``    (each path's mean token log-prob; an empty path weighs 0)
- ``"global-token"``: ``c_i = 1/T``          (token sums over all paths divided by the total number of tokens T)

The teacher log-probs get gradient only from the first term, the student log-probs only from the second.

Implementations (``impl=``): ``"triton"`` (one segment-reduction kernel each for forward and backward, CUDA or CPU
under ``TRITON_INTERPRET=1``), ``"cuda"`` (the CUDA C++ twin in ``csrc/``, built on first use), ``"torch"`` (the
reference below), ``"auto"`` (Triton on CUDA, torch elsewhere).

``vpgea_loss_fused_linear`` goes from hidden states and the LM head straight to the loss through
``vpgea.token_logprobs``, so no ``[tokens, vocab]`` logits exist. ``grpo_loss`` (from ``vpgea.grpo``) is the GRPO
clipped surrogate on packed tokens, used by the grpo-lp baseline.
"""

from __future__ import annotations


import torch

from vpgea.grpo import grpo_loss
from vpgea.logprobs import bad_targets, linear_logprob_loss

__all__ = ["vpgea_loss", "vpgea_loss_reference", "vpgea_loss_fused_linear", "grpo_loss", "path_coefficients",
           "NORMALIZE_MODES"]

NORMALIZE_MODES = ("sum", "token", "global-token")
_NORMALIZE_CODES = {"sum": 0, "token": 1, "global-token": 2}
_IMPLS = ("auto", "triton", "cuda", "torch")
_METRIC_KEYS = ("kl", "adv_logq", "gate_frac")


# --------------------------------------------------------------------------------------------------------------------
# validation


def _check_loss_inputs(teacher_logps, student_logps, advantages, cu_seqlens, beta, normalize, impl) -> None:
    name = "vpgea_loss"
    if impl not in _IMPLS:
        raise ValueError(f"{name}: impl must be one of {_IMPLS}, got {impl!r}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"{name}: normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    try:
        beta_f = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: beta must be a number, got {beta!r}") from None
    if beta_f != beta_f or beta_f in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: beta must be finite, got {beta!r}")
    for arg, t in (("teacher_logps", teacher_logps), ("student_logps", student_logps), ("advantages", advantages),
                   ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name}: {arg} must be 1-D, got shape {tuple(t.shape)}")
    if teacher_logps.shape != student_logps.shape:
        raise ValueError(
            f"{name}: teacher_logps has {teacher_logps.numel()} tokens but student_logps has "
            f"{student_logps.numel()}; both must be [T] over the same packed paths"
        )
    for arg, t in (("teacher_logps", teacher_logps), ("student_logps", student_logps), ("advantages", advantages)):
        if not t.is_floating_point():
            raise ValueError(f"{name}: {arg} must be a float tensor, got {t.dtype}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.numel() != advantages.numel() + 1:
        raise ValueError(
            f"{name}: cu_seqlens must have S + 1 = {advantages.numel() + 1} entries for S = {advantages.numel()} "
            f"advantages, got {cu_seqlens.numel()}"
        )
    devices = {t.device for t in (teacher_logps, student_logps, advantages, cu_seqlens)}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if teacher_logps.numel() >= 2**31:  # the boundaries go to the kernels as int32
        raise ValueError(f"{name}: at most 2**31 - 1 packed tokens per call, got T = {teacher_logps.numel()}")
    if torch.compiler.is_compiling():  # data-dependent checks would break the graph
        return
    # One device sync for all data checks; the specific message is worked out only on failure.
    num_tokens = teacher_logps.numel()
    cu = cu_seqlens.long()
    diffs = cu[1:] - cu[:-1]
    ok = torch.stack([
        cu[0] == 0,
        (diffs >= 0).all(),
        cu[-1] == num_tokens,
        torch.isfinite(advantages).all(),
    ]).cpu()
    if bool(ok.all()):
        return
    if not ok[0]:
        raise ValueError(f"{name}: cu_seqlens must start at 0, got {int(cu[0])}")
    if not ok[1]:
        i = int((diffs < 0).nonzero()[0, 0])
        raise ValueError(
            f"{name}: cu_seqlens must be non-decreasing; cu_seqlens[{i}] = {int(cu[i])} > "
            f"cu_seqlens[{i + 1}] = {int(cu[i + 1])}"
        )
    if not ok[2]:
        raise ValueError(
            f"{name}: cu_seqlens must end at T = {num_tokens} (the number of log-probs), got {int(cu[-1])}"
        )
    bad = (~torch.isfinite(advantages)).nonzero()[:, 0]
    raise ValueError(
        f"{name}: advantages must be finite; advantages[{int(bad[0])}] = {float(advantages[bad[0]])} "
        f"({bad.numel()} non-finite of {advantages.numel()})"
    )


def _scale(normalize: str, num_seqs: int, num_tokens: int) -> float:
    """``c_i`` numerator: 1/S for "sum" and "token" (which divides by n_i too), 1/T for "global-token". The kernels
    (``vpgea/kernels/vpgea_loss.py``, ``csrc/vpgea_loss.cu``) take it with the mode's code and divide by ``n_i`` for
    "token" themselves: the same rule as ``path_coefficients``."""
    if normalize == "global-token":
        return 1.0 / max(num_tokens, 1)
    return 1.0 / max(num_seqs, 1)


def path_coefficients(normalize: str, lengths: torch.Tensor) -> torch.Tensor:
    """The normaliser ``c_i`` of each path's summed log-likelihood (the one definition; see the module docstring):
    ``1/S`` ("sum"), ``1/(S n_i)`` ("token"; an empty path weighs 0), ``1/T`` ("global-token"), for ``lengths [S]``
    (the paths' token counts ``n_i``, ``T = sum n_i``). Returns ``[S]`` float32."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    lengths = lengths.float()
    c = torch.full_like(lengths, _scale(normalize, lengths.numel(), int(lengths.sum())))
    if normalize == "token":
        c = torch.where(lengths > 0, c / lengths.clamp(min=1.0), 0.0)
    return c


# --------------------------------------------------------------------------------------------------------------------
# torch reference


def _segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[T]`` int64 path index of every token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=num_tokens)


def vpgea_loss_reference(
    teacher_logps: torch.Tensor,
    student_logps: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    beta: float,
    normalize: str = "sum",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pure-PyTorch VPG-EA loss, differentiable by autograd; same arguments and returns as ``vpgea_loss``.

    Inputs are not validated here (``vpgea_loss(impl="torch")`` validates and then calls this).
    """
    num_tokens, num_seqs = teacher_logps.numel(), advantages.numel()
    seg = _segment_ids(cu_seqlens, num_tokens)
    zeros = teacher_logps.new_zeros(num_seqs, dtype=torch.float32)
    log_q = zeros.index_add(0, seg, teacher_logps.float())  # [S]
    log_pi = zeros.index_add(0, seg, student_logps.float())  # [S]
    adv = advantages.detach().float()
    c = path_coefficients(normalize, (cu_seqlens[1:] - cu_seqlens[:-1]).to(adv.device))
    gate = adv > 0
    live = c != 0
    # `where` instead of multiplying by a zero weight: a -inf log-prob in a zero-weight path must not give NaN.
    pg = torch.where(live & (adv != 0), -adv * log_q, 0.0)
    kl_sg = torch.where(live, log_q.detach() - log_pi, 0.0)
    loss = (c * (pg + torch.where(gate, beta * kl_sg, 0.0))).sum()
    with torch.no_grad():
        metrics = {
            "kl": (c * kl_sg).sum(),
            "adv_logq": -(c * pg).sum(),
            "gate_frac": gate.float().mean() if num_seqs > 0 else zeros.sum(),
        }
    return loss, metrics


# --------------------------------------------------------------------------------------------------------------------
# fused kernels as custom ops (opaque to torch.compile, with fake implementations), autograd registered on them


@torch.library.custom_op("vpgea::vpgea_loss_fwd", mutates_args=())
def _loss_fwd(
    teacher: torch.Tensor, student: torch.Tensor, advantages: torch.Tensor, cu_seqlens: torch.Tensor, beta: float,
    normalize: str, backend: str,
) -> torch.Tensor:
    """``[4]`` fp32: loss, kl, adv_logq, gate_frac. advantages fp32 ``[S]``, cu_seqlens int32 ``[S+1]``."""
    if backend == "cuda":
        from vpgea._ext import load_loss_ext

        dtype = torch.promote_types(teacher.dtype, student.dtype)
        return load_loss_ext().vpgea_loss_fwd_cuda(
            teacher.to(dtype), student.to(dtype), advantages, cu_seqlens, beta,
            _scale(normalize, advantages.numel(), teacher.numel()), _NORMALIZE_CODES[normalize],
        )
    from vpgea.kernels.vpgea_loss import vpgea_loss_forward

    return vpgea_loss_forward(teacher, student, advantages, cu_seqlens, beta, normalize)


@_loss_fwd.register_fake
def _(teacher, student, advantages, cu_seqlens, beta, normalize, backend):
    return teacher.new_empty(4, dtype=torch.float32)


@torch.library.custom_op("vpgea::vpgea_loss_bwd", mutates_args=())
def _loss_bwd(
    grad: torch.Tensor, advantages: torch.Tensor, cu_seqlens: torch.Tensor, num_tokens: int, beta: float,
    normalize: str, backend: str, teacher_dtype: torch.dtype, student_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d_teacher [T], d_student [T])`` in the given dtypes; ``grad`` is the ``[1]`` upstream gradient."""
    if backend == "cuda":
        from vpgea._ext import load_loss_ext

        dtype = torch.promote_types(teacher_dtype, student_dtype)
        proto = advantages.new_empty(num_tokens, dtype=dtype)
        gq, gp = load_loss_ext().vpgea_loss_bwd_cuda(
            grad, proto, proto, advantages, cu_seqlens, beta, _scale(normalize, advantages.numel(), num_tokens),
            _NORMALIZE_CODES[normalize],
        )
        return gq.to(teacher_dtype), gp.to(student_dtype)
    from vpgea.kernels.vpgea_loss import vpgea_loss_backward

    return vpgea_loss_backward(grad, advantages, cu_seqlens, num_tokens, beta, normalize, teacher_dtype,
                               student_dtype)


@_loss_bwd.register_fake
def _(grad, advantages, cu_seqlens, num_tokens, beta, normalize, backend, teacher_dtype, student_dtype):
    return (advantages.new_empty(num_tokens, dtype=teacher_dtype),
            advantages.new_empty(num_tokens, dtype=student_dtype))


def _loss_setup_context(ctx, inputs, output):
    teacher, student, advantages, cu_seqlens, beta, normalize, backend = inputs
    ctx.save_for_backward(advantages, cu_seqlens)
    ctx.opts = (teacher.numel(), beta, normalize, backend, teacher.dtype, student.dtype)


def _loss_backward(ctx, grad_out):
    advantages, cu_seqlens = ctx.saved_tensors
    num_tokens, beta, normalize, backend, t_dtype, s_dtype = ctx.opts
    # Only element 0 (the loss) carries gradient; the metrics are detached by vpgea_loss.
    gq, gp = _loss_bwd(grad_out[:1].float().contiguous(), advantages, cu_seqlens, num_tokens, beta, normalize,
                       backend, t_dtype, s_dtype)
    need_t, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (gq if need_t else None), (gp if need_s else None), None, None, None, None, None


torch.library.register_autograd("vpgea::vpgea_loss_fwd", _loss_backward, setup_context=_loss_setup_context)


# --------------------------------------------------------------------------------------------------------------------
# fused linear form with the head gradient produced in the forward sweep


def _token_coefs(advantages, cu_seqlens, num_tokens: int, beta: float, normalize: str):
    """``(dL/dq [T], dL/dpi [T])`` fp32: the loss is linear in the log-probs, so these are known before any logit."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    adv = advantages.detach().float()
    c = path_coefficients(normalize, lengths.to(adv.device))
    per_seq_q = -c * adv
    per_seq_p = torch.where(adv > 0, -c * beta, 0.0)
    expand = lambda v: torch.repeat_interleave(v, lengths, output_size=num_tokens)  # noqa: E731
    return expand(per_seq_q), expand(per_seq_p)


# --------------------------------------------------------------------------------------------------------------------
# public functions


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton":
        from vpgea.kernels._utils import triton_runnable

        if not triton_runnable(device):
            raise RuntimeError(
                f"vpgea_loss(impl='triton') needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
                f"for CPU tensors; got device {device}. Use impl='torch' or impl='auto'."
            )
    if impl == "cuda":
        from vpgea._ext import load_error, load_loss_ext

        if device.type != "cuda" or load_loss_ext() is None:
            why = load_error() if device.type == "cuda" else f"tensors are on {device}"
            raise RuntimeError(f"vpgea_loss(impl='cuda') is unavailable: {why}. Use impl='triton' or 'auto'.")
    return impl


def vpgea_loss(
    teacher_logps: torch.Tensor,
    student_logps: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    beta: float,
    normalize: str = "sum",
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VPG-EA loss of S packed reasoning paths.

    Args:
        teacher_logps: ``[T]`` float, per-token log-probs of the paths under the teacher view ``q(z | x, y*)``.
        student_logps: ``[T]`` float, log-probs of the same tokens under the student view ``pi(z | x)``.
        advantages: ``[S]`` float, one per path; treated as constants (no gradient); must be finite.
        cu_seqlens: ``[S+1]`` int32, path boundaries: starts at 0, non-decreasing (empty paths allowed), ends at T.
        beta: weight of the gated distillation term ``1[A_i > 0] (sg[log q_i] - log pi_i)``.
        normalize: ``"sum"`` (divide by S), ``"token"`` (each path's mean token log-prob, then divide by S) or
            ``"global-token"`` (divide by T). See the module docstring.
        impl: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"torch"``.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d float32 tensor; ``metrics`` a dict of detached 0-d float32 tensors,
        all with the loss's normaliser ``c_i``:
        ``"gate_frac"`` fraction of paths with ``A_i > 0``; ``"kl"`` ``sum_i c_i (log q_i - log pi_i)``, a
        KL(q || pi) estimate over all paths (they are sampled from q); ``"adv_logq"`` ``sum_i c_i A_i log q_i``.

    Empty paths, all-zero advantages and all gates closed give finite results (zero contribution), never NaN.
    """
    _check_loss_inputs(teacher_logps, student_logps, advantages, cu_seqlens, beta, normalize, impl)
    impl = _resolve_impl(impl, teacher_logps.device)
    if impl == "torch":
        return vpgea_loss_reference(teacher_logps, student_logps, advantages, cu_seqlens, beta=float(beta),
                                    normalize=normalize)
    out = _loss_fwd(
        teacher_logps.contiguous(), student_logps.contiguous(), advantages.detach().float().contiguous(),
        cu_seqlens.to(torch.int32).contiguous(), float(beta), normalize, impl,
    )
    loss = out[0]
    metrics = out[1:].detach()
    return loss, {k: metrics[i] for i, k in enumerate(_METRIC_KEYS)}


def vpgea_loss_fused_linear(
    teacher_hidden: torch.Tensor,
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_targets: torch.Tensor,
    student_targets: torch.Tensor,
    advantages: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    beta: float,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    normalize: str = "sum",
    ignore_index: int = -100,
    impl: str = "auto",
    grad_in_forward: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VPG-EA loss straight from hidden states and the LM head; never materialises ``[T, V]`` logits.

    Args:
        teacher_hidden: ``[T, D]`` hidden states (final norm applied) whose next tokens are the path tokens, teacher
            view; student_hidden: ``[T, D]`` the same for the student view. float32 / bf16 / fp16.
        weight: ``[V, D]`` LM head (same dtype); bias: ``[V]`` or None.
        teacher_targets / student_targets: ``[T]`` int64 path tokens (normally equal), or ``ignore_index``.
        advantages: ``[S]``; cu_seqlens: ``[S+1]`` int32 over the T rows.
        beta, normalize: as in ``vpgea_loss``. temperature: logits are divided by it.
        ignore_index: rows with this target contribute log-prob 0 (they still count in "token"/"global-token"
            lengths: pack only path tokens).
        impl: ``"auto"``, ``"triton"``, ``"cuda"`` (CUDA C++ loss reduction, Triton log-probs) or ``"torch"``.
        grad_in_forward: produce the hidden/head gradients in the forward sweep (the loss is linear in the
            log-probs, so ``dL/dlogp`` is known up front): chunked ``[rows, V]`` logits through cuBLAS, 3 GEMMs instead
            of 4, at the cost of one fp32 logits chunk (<= 1 GiB), an fp32 ``[V, D]`` head-gradient accumulator and
            gradients held from forward to backward.
            The backward then only scales them. ``impl`` then picks the loss reduction only.

    Returns:
        ``(loss, metrics)`` as ``vpgea_loss``. Gradients flow to both hidden inputs, ``weight`` and ``bias``.

    Both views go through one ``token_logprobs`` call (rows concatenated), so the head gradient is one GEMM. Under
    ``torch.autocast`` the hidden states, head and bias are cast to the autocast dtype first (see ``token_logprobs``).
    """
    from vpgea.logprobs import autocast_inputs, token_logprobs

    (th, sh, w, b), guard = autocast_inputs(teacher_hidden, student_hidden, weight, bias)
    if guard is not None:
        with guard:  # autocast off: the call below sees plain half-precision inputs
            return vpgea_loss_fused_linear(
                th, sh, w, teacher_targets, student_targets, advantages, cu_seqlens, beta=beta, bias=b,
                temperature=temperature, normalize=normalize, ignore_index=ignore_index, impl=impl,
                grad_in_forward=grad_in_forward,
            )

    name = "vpgea_loss_fused_linear"
    if teacher_hidden.dim() != 2 or student_hidden.dim() != 2:
        raise ValueError(
            f"{name}: hidden states must be [T, D], got teacher {tuple(teacher_hidden.shape)} and student "
            f"{tuple(student_hidden.shape)}"
        )
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"{name}: teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden {tuple(student_hidden.shape)} "
            f"must have the same shape [T, D]"
        )
    num_tokens = teacher_hidden.shape[0]
    for arg, t in (("teacher_targets", teacher_targets), ("student_targets", student_targets)):
        if t.shape != (num_tokens,):
            raise ValueError(f"{name}: {arg} must be [T] = ({num_tokens},), got shape {tuple(t.shape)}")
    if impl not in _IMPLS:
        raise ValueError(f"{name}: impl must be one of {_IMPLS}, got {impl!r}")
    lp_impl = {"cuda": "triton"}.get(impl, impl)
    hidden = torch.cat([teacher_hidden, student_hidden], dim=0)  # [2T, D]
    targets = torch.cat([teacher_targets, student_targets], dim=0)  # [2T]
    if grad_in_forward:
        if isinstance(temperature, torch.Tensor) or not float(temperature) > 0:
            raise ValueError(f"{name}: grad_in_forward needs a float temperature > 0, got {temperature!r}")
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.dtype != hidden.dtype:
            raise ValueError(
                f"{name}: weight must be [V, D] with D = {hidden.shape[1]} and dtype {hidden.dtype}, got "
                f"{tuple(weight.shape)} {weight.dtype}"
            )
        _check_loss_inputs(hidden[:num_tokens, 0], hidden[num_tokens:, 0], advantages, cu_seqlens, beta, normalize,
                           impl)
        if not torch.compiler.is_compiling():
            vocab = weight.shape[0]
            bad = bad_targets(targets, vocab, ignore_index)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                view, row = ("teacher", i) if i < num_tokens else ("student", i - num_tokens)
                raise ValueError(
                    f"{name}: targets must be in [0, {vocab}) or ignore_index={ignore_index}; {view}_targets[{row}] = "
                    f"{int(targets[i])}"
                )
        coef_q, coef_p = _token_coefs(advantages, cu_seqlens, num_tokens, float(beta), normalize)
        lin, logps = linear_logprob_loss(hidden, weight, targets.long(), torch.cat([coef_q, coef_p]), bias=bias,
                                         temperature=float(temperature), ignore_index=ignore_index, route="sweep",
                                         impl=lp_impl)
        value, metrics = vpgea_loss(logps[:num_tokens], logps[num_tokens:], advantages, cu_seqlens, beta=beta,
                                    normalize=normalize, impl=impl)
        # The value of the VPG-EA loss (its sg[log q] term has no gradient), the gradient of the linear part.
        return lin + (value - lin).detach(), metrics
    logps = token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
                           impl=lp_impl)  # [2T] fp32
    return vpgea_loss(logps[:num_tokens], logps[num_tokens:], advantages, cu_seqlens, beta=beta,
                      normalize=normalize, impl=impl)

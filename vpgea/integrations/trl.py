"""``patch_trl()``: the installed TRL computes its per-token log-probs through ``vpgea.token_logprobs``.

Where TRL computes them, by release (read from TRL's sources):

- TRL >= 1.14: every trainer that scores tokens from hidden states (GRPO, RLOO, SFT, DPO, KTO and the experimental
  async GRPO in 1.16) calls ``_ChunkedLogProbFunction.apply(...)`` from ``trl.trainer.utils`` (1.16 re-exports
  ``trl.kernels.ChunkedLogProbFunction`` under that name; 1.14 also imports it into ``grpo_trainer``). The call
  carries the temperature, the model's final-logit softcapping and logit scale, and in 1.16 the extra outputs the
  trainer wants (``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``). ``patch_trl`` replaces every
  binding of that class in the loaded ``trl`` modules with an object whose ``apply`` takes the same arguments and
  returns the same values: log-probs and entropy from ``vpgea.token_logprobs``, the no-gradient extras from
  ``vpgea.logprobs.token_logprob_stats`` (one extra forward pass over the vocabulary, paid only by SFT / DPO / KTO,
  which log them).
- TRL 1.7-1.13 (``use_liger_kernel=True``; ``use_liger_loss`` in 1.7): ``GRPOTrainer`` builds Liger's
  ``LigerFusedLinearGRPOLoss`` (1.13: TRL's copy, ``trl.losses.FusedLinearGRPOLoss``) as ``self.liger_loss``
  (``self.liger_grpo_loss`` in 1.7). ``patch_trl`` makes the trainer build ``vpgea.nn.FusedLinearGRPOLoss``, which
  takes the same arguments. These releases also define a ``_ChunkedLogProbFunction`` (no bias), patched the same way.

``patch_trl`` returns what it replaced (``{"module.attribute": original}``) and raises, naming the TRL version, when
it finds nothing it knows. ``unpatch_trl(replaced)`` puts the originals back.

Under DeepSpeed ZeRO-3 the head is partitioned outside its own module's forward. TRL gathers it around the call;
the replacement keeps the head parameter itself (not a copy of the gathered data) and gathers it again in the
backward with TRL's ``maybe_gather_lm_head_ctx``, recomputing the forward there (about 25% more head FLOPs, ZeRO-3
only), as TRL's own kernel does.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys

import torch

from vpgea import logprobs as _lp

__all__ = ["patch_trl", "unpatch_trl", "VpgeaChunkedLogProb"]

_TRAINER_MODULES = ("trl.trainer.utils", "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer",
                    "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer", "trl.trainer.kto_trainer")
# TRL >= 1.16: the per-token outputs besides the log-probs, in the order of the returned tuple.
_EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _trl_version() -> str:
    import trl

    return getattr(trl, "__version__", "unknown")


def _call_kind(original) -> str:
    """Which of TRL's call signatures ``original.forward`` has: "outputs" (1.16+), "bias" (1.14-1.15) or "plain"
    (up to 1.13)."""
    params = list(inspect.signature(original.forward).parameters)[1:]  # without ctx
    if len(params) >= 5 and params[2] == "targets":
        return "plain"
    if len(params) >= 6 and params[2:4] == ["bias", "targets"]:
        return "outputs" if "outputs" in params else "bias"
    raise RuntimeError(
        f"patch_trl: TRL {_trl_version()}'s {original.__qualname__}.forward takes {params}, a call vpgea does not "
        f"know; expected (hidden, weight, [bias,] targets, temperature, chunk_size, final_logit_softcapping, "
        f"logit_scale[, outputs])"
    )


# --------------------------------------------------------------------------------------------------------------------
# ZeRO-3: gather the head again in the backward


def _gather_ctx(*params):
    """TRL's ``maybe_gather_lm_head_ctx`` (a null context unless ZeRO-3 is on), looked up at call time."""
    utils = sys.modules.get("trl.trainer.utils")
    fn = getattr(utils, "maybe_gather_lm_head_ctx", None)
    return fn(*params) if fn is not None else contextlib.nullcontext()


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


class _RegatheredLogprobs(torch.autograd.Function):
    """``token_logprobs`` whose backward gathers the (ZeRO-3 partitioned) head again and recomputes the forward from
    the head parameter, so no reference to the gathered data outlives the gather."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, kwargs):
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.kwargs = kwargs
        with torch.no_grad():
            return _lp.token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, **kwargs)

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, bias, targets = ctx.saved_tensors
        with _gather_ctx(weight, bias), torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip((hidden, weight, bias), ctx.needs_input_grad[:3])]
            lp, ent = _lp.token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True,
                                         **ctx.kwargs)
            outs = [o for o, g in ((lp, g_lp), (ent, g_ent)) if g is not None]
            grads_out = [g for g in (g_lp, g_ent) if g is not None]
            wanted = [t for t, need in zip(leaves, ctx.needs_input_grad[:3]) if t is not None and need]
            got = iter(torch.autograd.grad(outs, wanted, grads_out, allow_unused=True)) if outs else iter(())
        grads = [next(got, None) if t is not None and need else None
                 for t, need in zip(leaves, ctx.needs_input_grad[:3])]
        return (*grads, None, None)


# --------------------------------------------------------------------------------------------------------------------
# the replacement


class VpgeaChunkedLogProb:
    """Stands in for TRL's ``_ChunkedLogProbFunction``: ``apply`` takes the original's arguments (per ``kind``) and
    returns what it returns, computed by vpgea.

    Args:
        original: the TRL class replaced (kept for ``unpatch_trl`` and for the signature).
        impl: passed to ``vpgea.token_logprobs`` ("auto": Triton on CUDA, the torch reference elsewhere).
    """

    def __init__(self, original, impl: str = "auto"):
        self.original = original
        self.kind = _call_kind(original)
        self.impl = impl
        self.calls = 0  # how many times TRL called vpgea through this object

    def apply(self, *args):
        if self.kind == "plain":  # (hidden, weight, targets, temperature, chunk_size, softcap=None, scale=1.0)
            hidden, weight, targets, temperature, _chunk, *rest = args
            bias, outputs = None, ("entropy",)
        else:  # (hidden, weight, bias, targets, temperature, chunk_size, softcap=None, scale=1.0[, outputs])
            hidden, weight, bias, targets, temperature, _chunk, *rest = args
            outputs = rest[2] if self.kind == "outputs" and len(rest) > 2 else (
                _EXTRA_OUTPUTS if self.kind == "outputs" else ("entropy",))
        softcap = rest[0] if len(rest) > 0 else None
        logit_scale = rest[1] if len(rest) > 1 else 1.0
        unknown = [o for o in outputs if o not in ("log_probs", *_EXTRA_OUTPUTS)]
        if unknown:  # TRL's kernel skips names it does not know; a new output must not go missing silently
            raise ValueError(f"vpgea (patch_trl): TRL asked for per-token outputs {unknown}, which vpgea does not "
                             f"compute; known: {('log_probs', *_EXTRA_OUTPUTS)}")
        self.calls += 1
        # TRL computes in the autocast dtype when autocast is on, else in the hidden states' dtype, casting the head.
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        weight_c = weight if weight.dtype == dtype else weight.to(dtype)
        kwargs = dict(temperature=float(temperature), logit_scale=float(logit_scale),
                      softcap=None if softcap is None else float(softcap), impl=self.impl)
        with torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else contextlib.nullcontext():
            h = hidden.to(dtype)
            if _zero3_enabled() and weight_c is weight:
                lp, ent = _RegatheredLogprobs.apply(h, weight, bias, targets, kwargs)
            else:
                lp, ent = _lp.token_logprobs(h, weight_c, targets, bias=bias, return_entropy=True, **kwargs)
            extras = [o for o in outputs if o not in ("log_probs", "entropy")]
            stats = _lp.token_logprob_stats(h.detach(), weight_c.detach(), targets, stats=tuple(extras),
                                            bias=None if bias is None else bias.detach(), **{
                                                k: v for k, v in kwargs.items() if k != "impl"}) if extras else {}
        if self.kind != "outputs":
            return lp, ent
        return (lp, ent if "entropy" in outputs else None, stats.get("log_sum_sq_probs"), stats.get("mean_logits"),
                stats.get("is_top1"))


def _import_trainer_modules() -> None:
    for name in _TRAINER_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a trainer this release does not have
            pass


def _loaded_trl_modules():
    return [m for name, m in list(sys.modules.items()) if m is not None and (name == "trl" or name.startswith("trl."))]


def patch_trl(*, impl: str = "auto") -> dict[str, object]:
    """Route the installed TRL's per-token log-probs (TRL >= 1.14; also 1.7-1.13's chunked function) and its Liger GRPO
    loss (TRL 1.7-1.13) through vpgea. Call it before building the trainer.

    Args:
        impl: ``vpgea.token_logprobs``'s implementation ("auto", "triton" or "torch").

    Returns:
        ``{"module.attribute": original object}`` for everything replaced (give it to ``unpatch_trl`` to undo).

    Raises:
        ImportError: TRL is not installed.
        RuntimeError: nothing to replace was found in this TRL (the message names its version).
    """
    try:
        import trl  # noqa: F401
    except ImportError as err:
        raise ImportError("patch_trl: TRL is not installed (pip install trl)") from err
    _import_trainer_modules()
    replaced: dict[str, object] = {}

    # 1. the chunked log-prob function, wherever a trl module holds it
    utils = sys.modules.get("trl.trainer.utils")
    original = getattr(utils, "_ChunkedLogProbFunction", None)
    if isinstance(original, VpgeaChunkedLogProb):
        raise RuntimeError("patch_trl: TRL is already patched (call unpatch_trl with what the first call returned)")
    if original is not None:
        replacement = VpgeaChunkedLogProb(original, impl=impl)
        for module in _loaded_trl_modules():
            for attr, value in list(vars(module).items()):
                if value is original:
                    replaced[f"{module.__name__}.{attr}"] = original
                    setattr(module, attr, replacement)

    # 2. TRL 1.7-1.13: the GRPO trainer's Liger loss module
    grpo = sys.modules.get("trl.trainer.grpo_trainer")
    trainer_cls = getattr(grpo, "GRPOTrainer", None)
    if trainer_cls is not None:
        from vpgea.nn import FusedLinearGRPOLoss

        try:
            src = inspect.getsource(trainer_cls.__init__)
        except (OSError, TypeError):  # no source (e.g. a compiled install): nothing to read the loss from
            src = ""
        for name in ("LigerFusedLinearGRPOLoss", "FusedLinearGRPOLoss"):
            if f"= {name}(" in src:
                replaced[f"{grpo.__name__}.{name}"] = getattr(grpo, name, None)
                setattr(grpo, name, FusedLinearGRPOLoss)
                # TRL checks that liger-kernel is importable before building the loss; vpgea's does not need it.
                if hasattr(grpo, "is_liger_kernel_available"):
                    replaced[f"{grpo.__name__}.is_liger_kernel_available"] = grpo.is_liger_kernel_available
                    grpo.is_liger_kernel_available = lambda *a, **k: True
                break

    if not replaced:
        raise RuntimeError(
            f"patch_trl: found nothing to replace in TRL {_trl_version()}: no trl.trainer.utils._ChunkedLogProbFunction "
            f"(TRL >= 1.14 computes per-token log-probs with it) and no Liger GRPO loss built by "
            f"trl.trainer.grpo_trainer.GRPOTrainer (TRL 1.7-1.13). vpgea knows TRL 1.7 to 1.16."
        )
    return replaced


def unpatch_trl(replaced: dict[str, object]) -> None:
    """Undo ``patch_trl``: put back every original it returned."""
    for key, original in replaced.items():
        module_name, attr = key.rsplit(".", 1)
        module = sys.modules.get(module_name)
        if module is None:
            continue
        if original is None:
            if hasattr(module, attr):
                delattr(module, attr)
        else:
            setattr(module, attr, original)

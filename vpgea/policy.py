"""``PolicyModel``: any Hugging Face causal LM, run on packed sequences, returning last hidden states.

The wrapped model's attention is switched to a vpgea varlen implementation (:mod:`vpgea.attention`), so stock
Llama / Qwen2 / Qwen3 / Mistral code runs ``S`` packed sequences as one ``[1, T]`` row with no padding. The forward
stops at the final norm: the ``[T, V]`` logits are never formed; log-probs come from the hidden states and the
output-head weight through :func:`vpgea.token_logprobs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from . import attention
from .packing import ROLE_ANSWER, ROLE_COMPLETION, PackedBatch, micro_batches, pack_sequences

__all__ = ["PolicyModel"]

_MIN_MICRO_BATCH_TOKENS = 4096  # default token budget per packed micro-batch (raised to the longest sequence)


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
            dtype, dtype
        )
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"dtype must be a torch.dtype or a name like 'bfloat16', got {dtype!r}")


class PolicyModel(torch.nn.Module):
    """A causal LM that maps a :class:`~vpgea.packing.PackedBatch` to last hidden states ``[T, D]``.

    Build it with :meth:`from_pretrained` (a local directory) or :meth:`from_model` (an in-memory
    ``PreTrainedModel``). ``attn_impl`` is "auto" (flash-attn, then PyTorch varlen attention on CUDA, masked SDPA
    elsewhere; chosen per call from the activations' device and dtype and logged) or one of
    :data:`vpgea.attention.BACKENDS`.
    """

    def __init__(self, model: torch.nn.Module, *, attn_impl: str = "auto", gradient_checkpointing: bool = False):
        super().__init__()
        name = attention.impl_name(attn_impl)  # validates attn_impl
        attention.register()
        self.model = model
        self.attn_impl = attn_impl
        self._hf_attn_impl = model.config._attn_implementation  # restored for save_pretrained
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise RuntimeError(
                f"{type(model).__name__} does not accept a custom attention implementation (it does not dispatch "
                "through transformers' AttentionInterface), so it cannot run packed"
            )
        if gradient_checkpointing:
            self.gradient_checkpointing_enable()

    # ----------------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        attn_impl: str = "auto",
        gradient_checkpointing: bool = False,
    ) -> PolicyModel:
        """Load a local Hugging Face causal-LM directory (never the network). ``dtype`` defaults to the checkpoint's
        dtype ("auto"); ``device`` to the CPU."""
        from .modeldir import check_model_dir

        path = check_model_dir(path, "PolicyModel.from_pretrained")
        from transformers import AutoModelForCausalLM

        dtype = _as_dtype(dtype)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype if dtype is not None else "auto", local_files_only=True
        )
        if device is not None:
            model = model.to(device)
        return cls(model, attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing)

    @classmethod
    def from_model(cls, hf_model: torch.nn.Module, *, attn_impl: str = "auto", gradient_checkpointing: bool = False):
        """Wrap an in-memory causal LM (its attention implementation is switched in place)."""
        return cls(hf_model, attn_impl=attn_impl, gradient_checkpointing=gradient_checkpointing)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in the backward (non-reentrant checkpointing)."""
        kw = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.model, "activation_checkpointing_disable"):
            self.model.activation_checkpointing_disable()
        else:
            self.model.gradient_checkpointing_disable()

    # ----------------------------------------------------------------------------------------------------------------
    # properties

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight.dtype

    @property
    def decoder(self) -> torch.nn.Module:
        """The base model (embeddings, layers, final norm) without the LM head."""
        return self.model.get_decoder()

    @property
    def head_weight(self) -> torch.Tensor:
        """Output-head weight ``[V, D]`` (the input embedding matrix when embeddings are tied)."""
        return self.model.get_output_embeddings().weight

    @property
    def head_bias(self) -> torch.Tensor | None:
        """Output-head bias ``[V]`` or None."""
        return getattr(self.model.get_output_embeddings(), "bias", None)

    # ----------------------------------------------------------------------------------------------------------------
    # forward

    def forward(
        self, batch: PackedBatch, *, logprobs: bool = False, temperature: float = 1.0, impl: str = "auto", head=None
    ):
        """Last hidden states ``[T, D]`` (final norm applied) of the packed batch; no logits.

        With ``logprobs=True``: float32 ``[T]``, the log-prob of each position's target (0 where it is -100),
        computed from the hidden states and the head weight by :func:`vpgea.token_logprobs` inside this forward, so
        that under FSDP2 (this module is the root unit, which owns the head) the kernel sees the gathered weight.
        With ``head``: returns ``head(hidden [T, D], weight [V, D], bias [V] | None)``, likewise called inside the
        forward (the trainer's loss from hidden states: ``vpgea.losses.linear_logprob_loss``).
        """
        device = self.device
        cu = batch.cu_seqlens.to(device, torch.int32)
        out = self.decoder(
            input_ids=batch.input_ids.to(device)[None],  # [1, T]
            position_ids=batch.position_ids.to(device)[None],  # [1, T]
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=int(batch.max_seqlen),
            max_length_k=int(batch.max_seqlen),
        )
        hidden = out.last_hidden_state[0]  # [T, D]
        if head is not None:
            return head(hidden, self.head_weight, self.head_bias)
        if not logprobs:
            return hidden
        from .logprobs import token_logprobs

        # Under autocast the residual stream (and so the final norm's output) stays fp32; token_logprobs casts it and
        # the head to the autocast dtype, as autocast would for the linear head it replaces.
        return token_logprobs(
            hidden, self.head_weight, batch.targets.to(hidden.device), bias=self.head_bias, temperature=temperature,
            impl=impl,
        )

    def forward_hidden(self, batch: PackedBatch) -> torch.Tensor:
        """Last hidden states ``[T, D]``; goes through ``__call__`` so module hooks (FSDP) fire."""
        return self(batch)

    def packed_logprobs(self, batch: PackedBatch, *, temperature: float = 1.0, impl: str = "auto") -> torch.Tensor:
        """float32 ``[T]``: log-prob of each position's target under the model (0 where the target is -100)."""
        return self(batch, logprobs=True, temperature=temperature, impl=impl)

    def sequence_logprobs(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        *,
        answers: Sequence[Sequence[int]] | None = None,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        impl: str = "auto",
        min_micro_batches: int = 1,
    ) -> list[torch.Tensor]:
        """Per-token float32 log-probs of each completion (then its answer tail, when ``answers`` is given).

        Sequences are packed into micro-batches of at most ``max_tokens`` tokens (default: 4096, or the longest
        sequence if longer), at least ``min_micro_batches`` of them (data-parallel ranks pass an agreed count: see
        ``vpgea.packing.micro_batches``). Differentiable when grad is enabled; each micro-batch's graph stays alive
        until the caller's backward, so use a budget the memory allows.
        """
        n = len(prompts)
        if len(completions) != n or (answers is not None and len(answers) != n):
            raise ValueError(
                f"sequence_logprobs: {n} prompts, {len(completions)} completions"
                + ("" if answers is None else f", {len(answers)} answers")
            )
        if n == 0:
            return []
        lengths = [
            len(prompts[i]) + len(completions[i]) + (len(answers[i]) if answers is not None else 0) for i in range(n)
        ]
        if max_tokens is None:
            max_tokens = max(_MIN_MICRO_BATCH_TOKENS, max(lengths))
        roles = (ROLE_COMPLETION, ROLE_ANSWER) if answers is not None else ROLE_COMPLETION
        out: list[torch.Tensor | None] = [None] * n
        for idx in micro_batches(lengths, max_tokens, min_batches=min_micro_batches):
            batch = pack_sequences(
                [prompts[i] for i in idx],
                [completions[i] for i in idx],
                None if answers is None else [answers[i] for i in idx],
            )
            logps = self.packed_logprobs(batch, temperature=temperature, impl=impl)
            for i, lp in zip(idx, batch.scatter(logps, role=roles)):
                out[i] = lp
        return out

    # ----------------------------------------------------------------------------------------------------------------
    # export

    @contextlib.contextmanager
    def _stock_attention(self):
        """Temporarily restore the model's original attention implementation (for export)."""
        current = self.model.config._attn_implementation
        self.model.set_attn_implementation(self._hf_attn_impl or "sdpa")
        try:
            yield
        finally:
            self.model.set_attn_implementation(current)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write the wrapped model in Hugging Face format (loadable without vpgea)."""
        with self._stock_attention():
            self.model.save_pretrained(str(save_directory), **kwargs)

"""A transformers-based rollout engine: batched sampling with a KV cache (a ``DynamicCache``), on CPU or GPU.

A hand-written decode loop rather than ``model.generate`` so that seeded sampling is per prompt (each row draws
from its own ``torch.Generator``; ``generate`` only uses the global RNG) and so that the loop stays the same across
transformers versions. Prompts are left-padded; position ids restart at 0 at each prompt's first real token, so a
padded prompt sees the same positions as it would alone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence

import torch

from vpgea.distributed import full_tensor
from vpgea.engines.base import GenerationOutput, check_generate_args, resolve_seeds, stop_ids, unwrap_model

__all__ = ["HFEngine", "new_kv_cache", "sample_next"]


@functools.cache
def _cache_keyword(forward) -> str:
    """The keyword a model's ``forward`` takes its KV ``Cache`` under: ``cache`` since transformers renamed it
    (5.25 warns that ``past_key_values`` goes away in 5.40), ``past_key_values`` before (5.17 on the GPU machine,
    4.56, the oldest we support). ``inspect.signature`` sees through the renaming decorator (``functools.wraps``)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def new_kv_cache(model) -> dict:
    """Keyword arguments that make ``model(...)`` fill a new, empty ``DynamicCache`` (the documented ``Cache`` API;
    the model updates the object in place, so the decode loop passes the same object on every step and never
    reads a cache back from the outputs). The cache is built from the model's config, so sliding-window and
    hybrid layers get the layer types they need."""
    from transformers import DynamicCache

    return {_cache_keyword(type(model).forward): DynamicCache(config=model.config)}


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Draw one token per row.

    logits: [B, V] float. temperature 0 means greedy. top_p < 1 keeps the smallest set of tokens whose probability
    reaches top_p (the most likely token is always kept). ``row_generators`` (B CPU generators): row b inverts its
    CDF at one uniform draw from its own generator, so a row's samples depend only on its logits and its seed;
    otherwise ``torch.multinomial`` with ``generator`` (or the global RNG). Returns [B] int64.
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if row_generators is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(row_generators) != probs.shape[0]:
        raise ValueError(f"sample_next: {len(row_generators)} row generators for {probs.shape[0]} rows")
    u = torch.stack([torch.rand((), generator=g) for g in row_generators]).to(probs.device)  # [B] in [0, 1)
    cdf = probs.cumsum(dim=-1)  # [B, V]; tokens removed by top_p add nothing, so they are never picked
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return idx.clamp(max=probs.shape[-1] - 1)


class HFEngine:
    """Rollouts from an in-memory Hugging Face causal LM (the trainer's own module; weights are shared).

    model: a ``transformers`` causal LM, or any object with a ``.model`` attribute holding one (``PolicyModel``).
    tokenizer: supplies ``eos_token_id`` and ``pad_token_id`` unless given explicitly.
    batch_size: prompts decoded together; prompts are sorted by length first to limit padding.
    stop_token_ids: ids that end a response (default: the tokenizer's EOS, plus the model's generation-config EOS).
    replica: decode from a private copy of the model (made here, so build the engine before sharding the trainer's
        model) that ``update_weights`` refreshes. Under FSDP2 the trainer's module gathers each layer's weights on
        every forward, a collective that would hang as soon as two ranks stop decoding at different steps; the
        replica decodes alone, as a vLLM engine would.
    dtype: decode in this floating dtype (``torch.bfloat16`` on a GPU): a replica is stored in it (half the memory of
        an fp32 copy), and a shared fp32 module decodes under autocast to it (the KV cache and matmuls in ``dtype``).
        None: the module's own dtype.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        batch_size: int = 64,
        stop_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        replica: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"HFEngine: dtype must be a floating torch.dtype or None, got {dtype!r}")
        self.dtype = dtype
        self.model = unwrap_model(model)
        self.replica = bool(replica)
        if self.replica:
            import copy

            self.model = copy.deepcopy(self.model)
            self.model.requires_grad_(False)
            if dtype is not None:
                self.model.to(dtype)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if stop_token_ids is None:
            stop_token_ids = stop_ids("HFEngine", tokenizer, getattr(self.model, "generation_config", None))
        self.stop_token_ids = [int(i) for i in stop_token_ids]
        if not self.stop_token_ids:
            raise ValueError("HFEngine: stop_token_ids is empty; a response needs a token that ends it")
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else self.stop_token_ids[0])

    # --- interface -----------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | Sequence[int] | None = None,
    ) -> list[GenerationOutput]:
        """See ``RolloutEngine.generate``: with a seed, prompt i samples from its own generator."""
        check_generate_args(prompts, max_new_tokens, top_p)
        if not prompts:
            return []
        if max_new_tokens == 0:
            return [GenerationOutput([], "length") for _ in prompts]
        seeds = resolve_seeds(seed, len(prompts))
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        results: list[GenerationOutput | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        amp = contextlib.nullcontext()
        param = next(self.model.parameters())
        if self.dtype is not None and self.dtype != param.dtype:  # a shared module in another dtype: autocast
            amp = torch.autocast(param.device.type, dtype=self.dtype)
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                gens = None
                if seeds is not None:  # CPU generators: cheap to make, and the draws are device-independent
                    gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
                with amp:
                    outs = self._generate_batch([prompts[i] for i in idx], max_new_tokens, temperature, top_p, gens)
                for i, out in zip(idx, outs):
                    results[i] = out
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def update_weights(self, model) -> None:
        """Without ``replica`` the engine shares the trainer's module: nothing to copy (a different module replaces
        ours). With it, copy ``model``'s parameters into the replica, gathering FSDP2 shards (``DTensor``) one tensor
        at a time: a collective, so every rank calls it."""
        model = unwrap_model(model)
        if not self.replica:
            if model is not self.model:
                self.model = model
            return
        mine = dict(self.model.named_parameters())
        theirs = dict(model.named_parameters())
        if set(mine) != set(theirs):
            raise ValueError(
                f"HFEngine.update_weights: parameter names differ from the replica's "
                f"(only in the model: {sorted(set(theirs) - set(mine))[:3]}, only in the replica: "
                f"{sorted(set(mine) - set(theirs))[:3]})"
            )
        with torch.no_grad():
            for name, p in theirs.items():  # a fixed order on every rank: the gathers must line up
                mine[name].copy_(full_tensor(p.detach()))

    def sleep(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        pass

    # --- decode loop ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate_batch(self, prompts, max_new_tokens, temperature, top_p, gens) -> list[GenerationOutput]:
        device = next(self.model.parameters()).device
        B, P = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((B, P), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding
            input_ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[b, P - len(p) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
        next_pos = position_ids[:, -1:] + 1  # [B, 1]
        stop = torch.tensor(self.stop_token_ids, device=device)

        cache = new_kv_cache(self.model)  # {"cache" | "past_key_values": DynamicCache}, filled in place
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **cache)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        tokens = []
        for step in range(max_new_tokens):
            # Every row draws every step (finished ones too), so each row's stream is independent of the others.
            tok = sample_next(out.logits[:, -1, :], temperature=temperature, top_p=top_p, row_generators=gens)
            tok = torch.where(finished, torch.full_like(tok, self.pad_token_id), tok)  # [B]
            tokens.append(tok)
            hit = torch.isin(tok, stop) & ~finished
            stopped |= hit
            finished |= hit
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                             **cache)
            next_pos = next_pos + 1
        gen = torch.stack(tokens, dim=1).cpu()  # [B, n]
        stopped = stopped.cpu()
        outputs = []
        stop_set = set(self.stop_token_ids)
        for b in range(B):
            ids = gen[b].tolist()
            if stopped[b]:
                end = next(i for i, t in enumerate(ids) if t in stop_set)
                outputs.append(GenerationOutput(ids[: end + 1], "stop"))
            else:
                outputs.append(GenerationOutput(ids, "length"))
        return outputs

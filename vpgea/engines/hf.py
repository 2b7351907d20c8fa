"""A transformers-based rollout engine: batched sampling with a KV cache, on CPU or GPU.

A hand-written decode loop rather than ``model.generate`` so that sampling draws from one seeded
``torch.Generator`` (``generate`` only uses the global RNG) and so that the loop stays the same across transformers
versions. Prompts are left-padded; position ids restart at 0 at each prompt's first real token, so a padded prompt
sees the same positions as it would alone.
"""

from __future__ import annotations

import torch

from vpgea.engines.base import GenerationOutput

__all__ = ["HFEngine", "sample_next"]


def sample_next(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Draw one token per row.

    logits: [B, V] float. temperature 0 means greedy. top_p < 1 keeps the smallest set of tokens whose probability
    reaches top_p (the most likely token is always kept). Returns [B] int64.
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
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class HFEngine:
    """Rollouts from an in-memory Hugging Face causal LM (the trainer's own module; weights are shared).

    model: a ``transformers`` causal LM, or any object with a ``.model`` attribute holding one (``PolicyModel``).
    tokenizer: supplies ``eos_token_id`` and ``pad_token_id`` unless given explicitly.
    batch_size: prompts decoded together; prompts are sorted by length first to limit padding.
    stop_token_ids: ids that end a response (default: the tokenizer's EOS, plus the model's generation-config EOS).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        batch_size: int = 64,
        stop_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.model = getattr(model, "model", model) if not hasattr(model, "generate") else model
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if stop_token_ids is None:
            stop_token_ids = []
            for source in (tokenizer, getattr(self.model, "generation_config", None)):
                eos = getattr(source, "eos_token_id", None)
                if eos is None:
                    continue
                for i in eos if isinstance(eos, (list, tuple)) else [eos]:
                    if i not in stop_token_ids:
                        stop_token_ids.append(int(i))
        if not stop_token_ids:
            raise ValueError("HFEngine: no stop token; the tokenizer has no eos_token_id and none was given")
        self.stop_token_ids = list(stop_token_ids)
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
        seed: int | None = None,
    ) -> list[GenerationOutput]:
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; a prompt needs at least one token")
        if not prompts:
            return []
        if max_new_tokens == 0:
            return [GenerationOutput([], "length") for _ in prompts]
        device = next(self.model.parameters()).device
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(int(seed))
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        results: list[GenerationOutput | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                outs = self._generate_batch([prompts[i] for i in idx], max_new_tokens, temperature, top_p, generator)
                for i, out in zip(idx, outs):
                    results[i] = out
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def update_weights(self, model) -> None:
        """The engine shares the trainer's module, so there is nothing to copy; a different module replaces ours."""
        model = getattr(model, "model", model) if not hasattr(model, "generate") else model
        if model is not self.model:
            self.model = model

    def sleep(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        pass

    # --- decode loop ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _generate_batch(self, prompts, max_new_tokens, temperature, top_p, generator) -> list[GenerationOutput]:
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

        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1
        )
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        tokens = []
        for step in range(max_new_tokens):
            tok = sample_next(out.logits[:, -1, :], temperature=temperature, top_p=top_p, generator=generator)
            tok = torch.where(finished, torch.full_like(tok, self.pad_token_id), tok)  # [B]
            tokens.append(tok)
            hit = torch.isin(tok, stop) & ~finished
            stopped |= hit
            finished |= hit
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
            out = self.model(
                input_ids=tok[:, None],
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
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

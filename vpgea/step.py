"""One training step as named stages over packed data: rollouts, scoring, update.

``vpgea.train`` runs them in order, then steps the optimizer, logs and checkpoints::

    groups, gen = rollouts(ctx, batch, positions)   # sample every question's draws, split paths, grade answers
    score(ctx, groups)                              # no-grad scoring pass (VPG-EA: U of the prior paths)
    stats = update(ctx, groups, scale)              # packed training pass: forward, loss weights, backward

The method (``vpgea.methods``) decides what is sampled, scored and trained and with which weights; this module only
packs sequences into token-budget micro-batches (many questions per forward, a question's sequences together when they
fit), runs the policy, and keeps every rank of an FSDP2 run in step: each runs the same number of forwards and
backwards (``_agreed``, ``_backward``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vpgea import algorithm as alg
from vpgea.rng import derive_seed
from vpgea.methods import Group, Method, Sample, Seq, StepStats, Weights
from vpgea.packing import ROLE_ANSWER, ROLE_COMPLETION, micro_batches, pack_groups, pack_sequences

__all__ = ["StepContext", "rollouts", "score", "update"]

_DUMMY = Seq([0], [0])  # what a rank with nothing left runs so that every FSDP2 rank runs the same passes


@dataclass
class StepContext:
    """What the stages share: the run's config, the model and sampler, this process's place, the method, the step."""

    cfg: object  # vpgea.config.TrainConfig
    policy: torch.nn.Module  # vpgea.policy.PolicyModel (FSDP2-sharded under torchrun)
    tokenizer: object
    engine: object  # vpgea.engines.RolloutEngine
    info: object  # vpgea.distributed.DistInfo
    method: Method
    amp: Callable[[], contextlib.AbstractContextManager]  # bf16 autocast on one GPU, else a null context
    step: int = 0
    leak_fn: Callable[[str, str], bool] | None = None  # the toy: does a response box an answer it did not derive?


# ----------------------------------------------------------------------------------------------------------------------
# rollouts


def rollouts(ctx: StepContext, batch: list, positions: list[int]) -> tuple[list[Group], int]:
    """Draw every question's samples in one engine call, split each response's path, grade its answer.

    ``batch``: this rank's questions (``vpgea.train.Item``); ``positions``: their places in the step's global batch,
    which name the seeds, so a question's rollouts are the same on whichever rank draws them.
    Returns the groups and the number of generated tokens."""
    from vpgea.rewards import load_reward

    cfg, tok, method = ctx.cfg, ctx.tokenizer, ctx.method
    grade = load_reward(cfg.reward)  # issue 18: the --reward check (cached; imported and checked at start-up)
    method.begin_step(ctx.step)
    groups = [Group(index=j, item=it) for it, j in zip(batch, positions)]
    prompts, seeds, owners, examples = [], [], [], []
    for d in method.draws():
        for g in groups:
            g.samples[d.tag] = []
            prompt = g.prompts[d.tag] = method.prompt(g, d)
            for k in range(d.count):
                prompts.append(prompt)
                seeds.append(derive_seed(cfg.seed, ctx.step, g.index, d.tag, k))
                owners.append(g.samples[d.tag])
                examples.append(g.item.example)
    ctx.engine.wake()
    outs = ctx.engine.generate(prompts, max_new_tokens=method.max_new_tokens(), temperature=cfg.temperature,
                               top_p=cfg.top_p, seed=seeds)
    ctx.engine.sleep()
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    for out, owner, example in zip(outs, owners, examples):
        ids = list(out.token_ids)
        body = ids[:-1] if out.finish_reason == "stop" and ids else ids
        path = body[: alg.split_at_marker(body, decode, cfg.answer_marker)]
        text = tok.decode(ids, skip_special_tokens=True)
        leak = ctx.leak_fn(example.question, text) if ctx.leak_fn is not None else None
        owner.append(Sample(ids, path, grade(text, example), leak))
    return groups, sum(len(o.token_ids) for o in outs)


# ----------------------------------------------------------------------------------------------------------------------
# scoring (no gradient)


def score(ctx: StepContext, groups: list[Group]) -> None:
    """The no-grad scoring pass: each group's ``score_sequences`` (packed across questions), their summed
    answer-token log-probs handed back to the method."""
    seqs = [ctx.method.score_sequences(g) for g in groups]
    sums = answer_logprob_sums(ctx, [s for ss in seqs for s in ss])
    at = 0
    for g, ss in zip(groups, seqs):
        if ss:
            ctx.method.scored(g, sums[at : at + len(ss)])
            at += len(ss)


def answer_logprob_sums(ctx: StepContext, seqs: list[Seq]) -> torch.Tensor:
    """``[n]`` float32 (CPU): the summed log-probs of each sequence's answer tokens, no gradient. Collective under
    FSDP2 (every rank runs the agreed number of forwards, even with nothing to score)."""
    plan = micro_batches([len(s) for s in seqs], ctx.cfg.max_tokens_per_micro_batch) if seqs else []
    out = torch.zeros(len(seqs))
    for idx in _agreed(plan, ctx.info):
        part = [seqs[i] for i in idx] if idx is not None else [_DUMMY]
        batch = pack_sequences([s.prompt for s in part], [s.completion for s in part], [s.answer for s in part])
        spans = [s.u_span for s in part]
        with torch.no_grad(), ctx.amp():
            sums = ctx.policy(batch, head=lambda h, w, b, batch=batch, spans=spans:
                              _answer_sums(ctx, batch, h, w, b, spans))
        if idx is not None:
            out[idx] = sums
    return out


def _answer_sums(ctx, batch, hidden, weight, bias, spans=None) -> torch.Tensor:
    """Per packed sequence, the summed log-probs of its answer tokens (``[S]`` float32 CPU); ``spans[s]`` (when not
    None) keeps only the answer tokens ``[start, end)`` of sequence ``s``."""
    from vpgea.logprobs import token_logprobs

    is_ans = batch.roles == ROLE_ANSWER
    if spans is not None and any(sp is not None for sp in spans):
        # offset of each answer token within its sequence's answer (answer tokens are contiguous, in order)
        first = torch.full((batch.num_seqs,), batch.num_tokens, dtype=torch.int64)
        pos = torch.arange(batch.num_tokens)
        first.scatter_reduce_(0, batch.seq_idx[is_ans], pos[is_ans], reduce="amin")
        offset = pos - first[batch.seq_idx]
        lo = torch.tensor([sp[0] if sp is not None else 0 for sp in spans])[batch.seq_idx]
        hi = torch.tensor([sp[1] if sp is not None else batch.num_tokens for sp in spans])[batch.seq_idx]
        is_ans = is_ans & (offset >= lo) & (offset < hi)
    rows = is_ans.nonzero()[:, 0]
    sums = torch.zeros(batch.num_seqs, dtype=torch.float64)
    if rows.numel():
        dev = hidden.device
        with torch.no_grad():
            lp = token_logprobs(hidden[rows.to(dev)], weight, batch.targets[rows].to(dev), bias=bias,
                                impl=ctx.cfg.logprob_impl)
        sums.index_add_(0, batch.seq_idx[rows], lp.detach().double().cpu())
    return sums.float()


# ----------------------------------------------------------------------------------------------------------------------
# update (the training pass)


def update(ctx: StepContext, groups: list[Group], scale: float) -> StepStats:
    """Forward and backward over the groups' training sequences, packed across questions into token-budget
    micro-batches, with the method's loss weights; returns the questions' stats summed.

    A group whose weights need ``U`` of some of its own sequences (VPG-EA) is kept in one micro-batch when it fits, and
    its ``U`` comes from that forward, before the loss; a group too large for one micro-batch gets ``U`` from a
    no-grad pass first. Groups whose weights are all zero (and whose stats need no log-probs) are not run at all.
    Each micro-batch's backward runs right after its forward, so memory holds one micro-batch's activations."""
    cfg, method = ctx.cfg, ctx.method
    n = len(groups)
    method.prepare(groups)
    seqs = [method.train_sequences(g) for g in groups]
    need_u = [method.u_sequences(g) for g in groups]
    weights: list[Weights | None] = [None if need_u[q] else method.weights(groups[q], None, scale) for q in range(n)]
    active = [q for q in range(n) if weights[q] is None or weights[q].any() or method.values_needed]
    budget = cfg.max_tokens_per_micro_batch
    lengths = [[len(s) for s in seqs[q]] if q in active else [] for q in range(n)]
    too_big = [q for q in active if need_u[q] and sum(lengths[q]) > budget]
    u_pre = answer_logprob_sums(ctx, [seqs[q][j] for q in too_big for j in need_u[q]])
    at = 0
    for q in too_big:
        weights[q] = method.weights(groups[q], u_pre[at : at + len(need_u[q])], scale)
        at += len(need_u[q])

    comp = [torch.zeros(len(s), dtype=torch.float64) for s in seqs]  # per sequence: summed completion log-probs
    ans = [torch.zeros(len(s), dtype=torch.float64) for s in seqs]  # ... and answer log-probs
    train_tokens = forwards = forward_tokens = 0
    for mb in _agreed(pack_groups(lengths, budget), ctx.info):
        pairs = mb if mb is not None else []
        part = [seqs[q][j] for q, j in pairs] or [_DUMMY]
        batch = pack_sequences([s.prompt for s in part], [s.completion for s in part], [s.answer for s in part])
        head = _TrainHead(ctx, groups, seqs, weights, need_u, pairs, batch, scale)
        with ctx.amp():
            loss = ctx.policy(batch, head=head)
        _backward(loss, head.any_weight, ctx.info)
        for s, (q, j) in enumerate(pairs):
            comp[q][j] = head.comp_sums[s]
            ans[q][j] = head.ans_sums[s]
        train_tokens += head.train_tokens
        forwards += 1
        forward_tokens += batch.num_tokens
    stats = StepStats(train_tokens=train_tokens, forwards=forwards, forward_tokens=forward_tokens)
    for q, g in enumerate(groups):
        if weights[q] is None:
            raise RuntimeError(f"update: question {g.index} was never weighed (its sequences were not run)")
        ran = q in active
        stats.add(method.finish(g, weights[q], comp[q] if ran else None, ans[q] if ran else None))
    return stats


class _TrainHead:
    """The loss of one micro-batch from its last hidden states, called inside the policy's forward (where FSDP2 has
    the head weight gathered): ``U`` for groups still unweighed, then the per-row weights, then
    ``linear_logprob_loss`` over the completion and answer rows; keeps the per-sequence log-prob sums."""

    def __init__(self, ctx, groups, seqs, weights, need_u, pairs, batch, scale):
        self.ctx, self.groups, self.weights, self.need_u = ctx, groups, weights, need_u
        self.pairs, self.batch, self.scale = pairs, batch, scale
        self.spans = [seqs[q][j].u_span for q, j in pairs] or None
        self.any_weight = False
        self.train_tokens = 0
        self.comp_sums = self.ans_sums = None

    def __call__(self, hidden, weight, bias):
        from vpgea.logprobs import linear_logprob_loss

        ctx, batch, pairs = self.ctx, self.batch, self.pairs
        pending = sorted({q for q, _ in pairs if self.weights[q] is None})
        if pending:  # U of these groups' sequences from this forward (they are whole in this micro-batch)
            sums = _answer_sums(ctx, batch, hidden, weight, bias, self.spans)
            pos = {pair: s for s, pair in enumerate(pairs)}
            for q in pending:
                u = sums[[pos[(q, j)] for j in self.need_u[q]]]
                self.weights[q] = ctx.method.weights(self.groups[q], u, self.scale)
        num = batch.num_seqs
        w_comp, w_ans = torch.zeros(num), torch.zeros(num)
        for s, (q, j) in enumerate(pairs):
            w_comp[s] = self.weights[q].completion[j]
            w_ans[s] = self.weights[q].answer[j]
        roles, seq = batch.roles, batch.seq_idx
        is_comp, is_ans = roles == ROLE_COMPLETION, roles == ROLE_ANSWER
        rows = (is_comp | is_ans).nonzero()[:, 0]
        coefs = torch.where(is_comp, w_comp[seq], torch.where(is_ans, w_ans[seq], 0.0))[rows]
        self.any_weight = bool((coefs != 0).any())
        in_loss = is_comp | (is_ans if ctx.method.answer_in_loss else torch.zeros_like(is_ans))
        self.train_tokens = int(in_loss.sum()) if pairs else 0
        dev = hidden.device
        loss, logp = linear_logprob_loss(
            hidden[rows.to(dev)], weight, batch.targets[rows].to(dev), coefs.to(dev), bias=bias,
            route=ctx.cfg.loss_route, impl=ctx.cfg.logprob_impl,
        )
        lp = logp.double().cpu()
        self.comp_sums = torch.zeros(num, dtype=torch.float64).index_add_(0, seq[rows][is_comp[rows]], lp[is_comp[rows]])
        self.ans_sums = torch.zeros(num, dtype=torch.float64).index_add_(0, seq[rows][is_ans[rows]], lp[is_ans[rows]])
        return loss


# ----------------------------------------------------------------------------------------------------------------------
# every FSDP2 rank runs the same passes


def _agreed(plan: list, info) -> list:
    """``plan`` padded with ``None`` (a dummy pass) to the largest number of micro-batches over ranks: under FSDP2
    each forward gathers every unit's parameters, so every rank must run as many forwards (and backwards)."""
    from vpgea.distributed import all_reduce_max

    if not info.enabled:
        return list(plan)
    return list(plan) + [None] * (all_reduce_max(len(plan), info) - len(plan))


def _backward(loss: torch.Tensor, needed: bool, info) -> None:
    """The one rule for backwards: one process skips a backward whose loss has no weight (all-zero advantages give
    a zero loss), while every FSDP2 rank runs it (each backward reduce-scatters every unit's gradients)."""
    if info.enabled or needed:
        loss.backward()

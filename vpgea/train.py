"""``python -m vpgea.train``: the VPG-EA trainer (and the grpo-lp baseline) as one flat loop.

With no arguments it runs the self-contained toy run on CPU: a tiny model and tokenizer built in code, a cached
supervised warm start on deliberately verbose traces, evaluation, VPG-EA training, evaluation, the grpo-lp baseline
on the same budget, evaluation, and ``summary.json``. With ``--model DIR --train-data FILE`` it trains a real model.
Under ``torchrun`` with several processes the policy is sharded with FSDP2 and each rank takes its share of the
step's questions (``vpgea.distributed``). The algorithm is in ../shared/DESIGN.md; the per-question arithmetic is in
``vpgea.algorithm``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from vpgea import algorithm as alg
from vpgea.checkpoint import (
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    load_optimizer_state,
    load_trainer_state,
    recover_leftovers,
    restore_rng,
    save_checkpoint,
)
from vpgea.config import TrainConfig, check_resume, parse_args, saved_config
from vpgea.data import read_jsonl_log
from vpgea.distributed import (
    DistInfo,
    all_ranks_agree,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    clip_grad_norm,
    gather_objects,
    init_distributed,
    loss_scale,
    shutdown,
)
from vpgea.engines.base import derive_seed
from vpgea.rundir import RunLock, RunLocked, atomic_write_text
from vpgea.toy import WarmStartError

__all__ = ["main", "train"]

# Logs and progress bars come from rank 0 only (torchrun sets RANK; a plain process is rank 0).
_IS_MAIN = os.environ.get("RANK", "0") == "0"


def log(msg: str) -> None:
    if _IS_MAIN:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# prompts and questions


def encode_user(tokenizer, content: str) -> list[int]:
    """Chat-template a single user message (generation prompt added) and tokenize it without extra specials."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(content)["input_ids"])


def student_prompt(cfg: TrainConfig, tokenizer, question: str) -> list[int]:
    content = cfg.student_template.format(question=question, instruction=cfg.instruction)
    return encode_user(tokenizer, content)


@dataclasses.dataclass
class Item:
    """A prepared training question: token ids of both views and of the answer tail (stop token included)."""

    example: object
    student: list[int]
    teacher: list[int]
    tail: list[int]


def prepare(cfg: TrainConfig, tokenizer, examples) -> tuple[list[Item], int]:
    """Tokenize both views and the tail. Returns (items, skipped): prompts over ``max_prompt_tokens`` are skipped."""
    eos = tokenizer.eos_token_id
    items, skipped = [], 0
    for ex in examples:
        s = student_prompt(cfg, tokenizer, ex.question)
        t = encode_user(
            tokenizer, cfg.teacher_template.format(question=ex.question, instruction=cfg.instruction, answer=ex.answer)
        )
        if max(len(s), len(t)) > cfg.max_prompt_tokens:
            skipped += 1
            continue
        tail = list(tokenizer(cfg.answer_tail.format(answer=ex.answer), add_special_tokens=False)["input_ids"])
        items.append(Item(ex, s, t, tail + ([eos] if eos is not None else [])))
    return items, skipped


def batch_indices(step: int, per_step: int, n: int, seed: int) -> list[int]:
    """Questions of ``step``: a fresh seeded permutation per epoch, read in order (a pure function of the step,
    so a resumed run sees the same data order)."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[i]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# rollouts


@dataclasses.dataclass
class Rollout:
    ids: list[int]  # everything generated (stop token included)
    z: list[int]  # the reasoning path: response before its last answer marker
    correct: bool


def rollout(engine, tokenizer, cfg: TrainConfig, prompts: list[list[int]], golds: list[str], seeds: list[int]):
    """Sample one response per prompt (prompt i with seed i), split off its path ``z`` and grade its answer."""
    from vpgea.grading import extract_answer, is_correct

    outs = engine.generate(
        prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seeds
    )
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    result = []
    for out, gold in zip(outs, golds):
        ids = list(out.token_ids)
        body = ids[:-1] if out.finish_reason == "stop" and ids else ids
        z = body[: alg.split_at_marker(body, decode, cfg.answer_marker)]
        pred = extract_answer(tokenizer.decode(ids, skip_special_tokens=True))
        result.append(Rollout(ids, z, bool(is_correct(pred, gold))))
    return result


def questions_per_rank(cfg: TrainConfig, info: DistInfo) -> int:
    """Each rank's share of ``--questions-per-step`` (the global batch), which must divide evenly."""
    if cfg.questions_per_step % info.world_size:
        raise ValueError(f"--questions-per-step {cfg.questions_per_step} must be a multiple of the number of "
                         f"processes ({info.world_size}): each rank takes the same number of questions")
    return cfg.questions_per_step // info.world_size


def micro_batch_count(lengths: list[int], max_tokens: int, info: DistInfo) -> int:
    """How many packed micro-batches one forward over sequences of ``lengths`` uses: the fewest that fit in one
    process; under FSDP2 the largest such count over ranks, since every rank must run as many forwards (each one
    gathers every unit's parameters) and, for the training pass, as many backwards."""
    from vpgea.packing import micro_batches

    if not info.enabled:
        return 1
    k = all_reduce_max(len(micro_batches(lengths, max_tokens)), info)
    while True:  # the greedy packer may need more than k batches on some rank: agree on the largest
        k_next = all_reduce_max(len(micro_batches(lengths, max_tokens, min_batches=k)), info)
        if k_next == k:
            return k
        k = k_next


# ----------------------------------------------------------------------------------------------------------------------
# the training loop


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits with 128 + signal.

    A second signal aborts the step at once (no save; the last checkpoint stays) and still exits with the first
    signal's code. A signal that arrives while a checkpoint is being written waits for the save to finish: a save
    is never cut off half-way (if it fails for another reason it is rolled back, and the previous checkpoint
    stays). ``kill -9`` remains the way to stop at once; the newest published checkpoint is complete either way."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}
        self._saving = False

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            log(f"signal {signum}: finishing this step, saving a checkpoint, then exiting"
                + (" (after the save under way)" if self._saving else ""))
        elif self._saving:
            log(f"signal {signum}: a checkpoint is being written; exiting when it is complete")
        else:  # a second signal: give up this step; the last checkpoint stays
            raise Interrupted(self.signum, None)

    @contextlib.contextmanager
    def saving(self):
        """Signals inside this block are recorded, never raised: the save finishes (or rolls itself back)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    def __init__(self, signum: int, checkpoint: Path | None):
        where = f"checkpoint at {checkpoint}" if checkpoint else "stopped before saving; the last checkpoint stays"
        super().__init__(f"interrupted by signal {signum}; {where}")
        self.signum, self.checkpoint = signum, checkpoint


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def train(cfg: TrainConfig, policy, tokenizer, items: list[Item], out_dir: Path, *, engine, skipped: int = 0,
          resume: dict | None = None, info: DistInfo | None = None) -> dict:
    """Train ``policy`` (a ``PolicyModel``, FSDP2-sharded when ``info`` has several ranks) in ``cfg.mode`` for
    ``cfg.max_steps`` steps; rank 0 writes ``metrics.jsonl``, every rank takes part in the checkpoints in ``out_dir``.
    Returns the last step's metrics (the same on every rank)."""
    from tqdm.auto import tqdm

    from vpgea.grpo import grpo_loss
    from vpgea.losses import vpgea_loss

    info = info or DistInfo(device=policy.device)
    if not items:
        raise ValueError("no training questions left (all prompts were over --max-prompt-tokens?)")
    n_q = cfg.questions_per_step
    n_local = questions_per_rank(cfg, info)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = policy.device
    # bf16 autocast on one GPU; under FSDP2 its mixed-precision policy casts the parameters instead.
    use_amp = device.type == "cuda" and cfg.bf16 and not info.enabled
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start = 0
    metrics_path = out_dir / "metrics.jsonl"
    if info.is_main:  # what an interrupted save or keep-last deletion left (the caller holds the run lock)
        for line in recover_leftovers(out_dir):
            log(f"{out_dir}: {line}")
    if resume is not None:
        load_optimizer_state(resume["_dir"], policy, opt)
        sched.load_state_dict(resume["scheduler"])
        restore_rng(resume["rng"])
        start = int(resume["step"])
        if info.is_main and metrics_path.exists():  # drop lines past the checkpoint (recomputed) and a partial one
            keep = [r for r in read_jsonl_log(metrics_path) if r.get("step", 0) <= start]
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in keep))
    elif info.is_main and metrics_path.exists():
        metrics_path.unlink()
    barrier(info)
    vpgea = cfg.mode == "vpgea"
    K, G = cfg.prior_samples, cfg.group_size
    budget = cfg.max_tokens_per_micro_batch
    scale = loss_scale(n_local, n_q, info)  # rank-local sum of question losses -> its share of the global mean

    def state(step: int) -> dict:
        return {"scheduler": sched.state_dict(), "rng": capture_rng(), "data_position": step * n_q,
                "mode": cfg.mode, "config": saved_config(cfg)}

    last: dict = {}
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=cfg.mode, file=sys.stderr,
               dynamic_ncols=True, disable=not info.is_main)
    mfile = open(metrics_path, "a") if info.is_main else contextlib.nullcontext()
    with _Stop() as stop, mfile:
        for step in bar:
            t0 = time.perf_counter()
            order = batch_indices(step, n_q, len(items), cfg.seed)  # the step's questions, the same on every rank
            mine = range(info.rank * n_local, (info.rank + 1) * n_local)  # the positions this rank takes
            batch = [items[order[j]] for j in mine]
            golds = [it.example.answer for it in batch]
            # A rollout's seed names it (step, question position, view, sample): it is drawn the same on any rank.
            seed = lambda j, view, k: derive_seed(cfg.seed, step, j, view, k)  # noqa: B023, E731

            # --- rollouts: K prior (student view) + G posterior (teacher view) per question; grpo-lp: G + K student
            engine.wake()
            if vpgea:
                prompts = [it.student for it in batch for _ in range(K)] + [it.teacher for it in batch for _ in range(G)]
                gold_rep = [g for g in golds for _ in range(K)] + [g for g in golds for _ in range(G)]
                seeds = [seed(j, "prior", k) for j in mine for k in range(K)]
                seeds += [seed(j, "post", k) for j in mine for k in range(G)]
            else:
                prompts = [it.student for it in batch for _ in range(K + G)]
                gold_rep = [g for g in golds for _ in range(K + G)]
                seeds = [seed(j, "grpo", k) for j in mine for k in range(K + G)]
            outs = rollout(engine, tokenizer, cfg, prompts, gold_rep, seeds)
            engine.sleep()
            t_gen = time.perf_counter() - t0

            # Rank-local sums; all-reduced into the step's metrics below.
            tot = {"questions": float(n_local), "loss": 0.0, "reward": 0.0, "passed": 0.0, "gate": 0.0, "kl": 0.0,
                   "no_pass": 0.0, "gen_tokens": float(sum(len(o.ids) for o in outs)), "train_tokens": 0.0,
                   "prior_len": 0.0, "prior_n": 0.0, "prior_correct": 0.0, "post_len": 0.0, "post_n": 0.0,
                   "post_correct": 0.0}
            if vpgea:
                prior = [outs[q * K : (q + 1) * K] for q in range(n_local)]
                post = [outs[n_local * K + q * G : n_local * K + (q + 1) * G] for q in range(n_local)]

                # --- prior-view scoring, no grad: U(z) = log P(a(y*) | S(x) + z) for every prior path
                s_prompts = [it.student for it in batch for _ in range(K)]
                s_paths = [o.z for ps in prior for o in ps]
                s_tails = [it.tail for it in batch for _ in range(K)]
                lengths = [len(a) + len(b) + len(c) for a, b, c in zip(s_prompts, s_paths, s_tails)]
                with torch.no_grad(), amp:
                    lps = policy.sequence_logprobs(s_prompts, s_paths, answers=s_tails, max_tokens=budget,
                                                   impl=cfg.logprob_impl,
                                                   min_micro_batches=micro_batch_count(lengths, budget, info))
                u_prior = [torch.stack([lps[q * K + k][-len(batch[q].tail):].sum() for k in range(K)]).float().cpu()
                           for q in range(n_local)]

                # --- per question: one packed forward of both views, cross-view validation, eta, advantages, loss
                for q, it in enumerate(batch):
                    zs = [o.z for o in post[q]]
                    q_prompts = [it.teacher] * G + [it.student] * G
                    lengths = [len(p) + len(z) + len(it.tail) for p, z in zip(q_prompts, zs + zs)]
                    with amp:
                        lps = policy.sequence_logprobs(q_prompts, zs + zs, answers=[it.tail] * (2 * G),
                                                       max_tokens=budget, impl=cfg.logprob_impl,
                                                       min_micro_batches=micro_batch_count(lengths, budget, info))
                    teacher, student = lps[:G], lps[G:]
                    # The student-view forward of z + a(y*) already holds U(z_i): no separate scoring pass.
                    u_post = torch.stack([s[-len(it.tail):].sum().detach() for s in student]).float().cpu()
                    sc = alg.vpgea_scores(
                        u_post=u_post, u_prior=u_prior[q],
                        post_lengths=torch.tensor([len(o.ids) for o in post[q]]),
                        prior_lengths=torch.tensor([len(o.ids) for o in prior[q]]),
                        alpha=cfg.alpha, cross_view=cfg.cross_view,
                        post_correct=torch.tensor([o.correct for o in post[q]]),
                    )
                    if not cfg.loss_on_tail:
                        teacher = [t[: len(z)] for t, z in zip(teacher, zs)]
                        student = [s[: len(z)] for s, z in zip(student, zs)]
                    lens = torch.tensor([0] + [t.numel() for t in teacher])
                    cu = lens.cumsum(0).to(torch.int32).to(device)
                    loss, m = vpgea_loss(torch.cat(teacher), torch.cat(student), sc.advantage.to(device), cu,
                                         beta=cfg.beta, normalize=cfg.normalize, impl=cfg.logprob_impl)
                    # All-zero advantages give a zero loss; one process skips its backward, FSDP2 ranks must not
                    # (every rank runs the same backwards).
                    if info.enabled or bool((sc.advantage != 0).any()):
                        (loss * scale).backward()
                    tot["loss"] += float(loss.detach())
                    tot["train_tokens"] += int(lens.sum()) * 2
                    tot["reward"] += sc.reward.mean().item()
                    tot["passed"] += sc.passed.float().mean().item()
                    tot["gate"] += float(m["gate_frac"])
                    tot["kl"] += float(m["kl"])
                    tot["no_pass"] += float(not bool(sc.passed.any()))
                    tot["post_len"] += sum(len(o.ids) for o in post[q])
                    tot["post_n"] += G
                    tot["post_correct"] += sum(o.correct for o in post[q])
                    tot["prior_len"] += sum(len(o.ids) for o in prior[q])
                    tot["prior_n"] += K
                    tot["prior_correct"] += sum(o.correct for o in prior[q])
            else:
                # --- grpo-lp: correctness + group-relative length penalty, GRPO advantages, on-policy surrogate
                n = K + G
                for q, it in enumerate(batch):
                    group = outs[q * n : (q + 1) * n]
                    reward = alg.length_penalty_reward(torch.tensor([o.correct for o in group]),
                                                       torch.tensor([len(o.ids) for o in group]), cfg.length_penalty)
                    adv = alg.group_advantages(reward)
                    tot["reward"] += reward.mean().item()
                    tot["prior_len"] += sum(len(o.ids) for o in group)
                    tot["prior_n"] += n
                    tot["prior_correct"] += sum(o.correct for o in group)
                    if not info.enabled and not bool((adv != 0).any()):
                        continue  # zero advantages: zero loss; FSDP2 ranks run it anyway (same backwards)
                    lengths = [len(it.student) + len(o.ids) for o in group]
                    with amp:
                        lps = policy.sequence_logprobs([it.student] * n, [o.ids for o in group], max_tokens=budget,
                                                       impl=cfg.logprob_impl,
                                                       min_micro_batches=micro_batch_count(lengths, budget, info))
                    lens = torch.tensor([0] + [t.numel() for t in lps])
                    cu = lens.cumsum(0).to(torch.int32).to(device)
                    loss, _ = grpo_loss(torch.cat(lps), adv.to(device), cu, loss_type="grpo")
                    (loss * scale).backward()
                    tot["loss"] += float(loss.detach())
                    tot["train_tokens"] += int(lens.sum())

            # --- optimizer step
            grad_norm = clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            engine.update_weights(policy)  # a collective under FSDP2 (the shards are gathered)

            # --- log (sums over every rank's questions)
            tot = all_reduce_sum(tot, info)
            dt = time.perf_counter() - t0
            ratio = lambda a, b: tot[a] / tot[b] if tot[b] else None  # noqa: E731
            per_q = (lambda k: tot[k] / tot["questions"]) if vpgea else (lambda k: None)  # noqa: E731
            last = {
                "step": step + 1,
                "loss": tot["loss"] / tot["questions"],
                "reward_mean": tot["reward"] / tot["questions"],
                "prior_len": ratio("prior_len", "prior_n"),
                "posterior_len": ratio("post_len", "post_n"),
                "cross_view_pass": per_q("passed"),
                "gate_frac": per_q("gate"),
                "kl": per_q("kl"),
                "tokens_per_s": (tot["gen_tokens"] + tot["train_tokens"]) / dt,
                "step_time": dt,
                "gen_time": t_gen,
                "gen_tokens": int(tot["gen_tokens"]),
                "train_tokens": int(tot["train_tokens"]),
                "acc_prior": ratio("prior_correct", "prior_n"),
                "acc_posterior": ratio("post_correct", "post_n"),
                "no_pass_questions": int(tot["no_pass"]) if vpgea else None,
                "skipped_prompts": skipped,
                "lr": sched.get_last_lr()[0],
                "grad_norm": grad_norm,
            }
            if not math.isfinite(last["loss"]):  # the reduced loss: every rank raises together
                raise FloatingPointError(f"step {step + 1}: loss is {last['loss']}")
            if info.is_main:
                mfile.write(json.dumps(last) + "\n")
                mfile.flush()
                if last["no_pass_questions"]:
                    bar.write(f"step {step + 1}: {last['no_pass_questions']}/{n_q} questions had no posterior path "
                              "passing cross-view validation (zero advantages)", file=sys.stderr)
                if (step + 1) % cfg.log_every == 0:
                    post_s = f" teacher {last['posterior_len']:5.1f}" if vpgea else ""
                    bar.set_postfix_str(f"loss {last['loss']:+.4f} | len student {last['prior_len']:5.1f}{post_s} | "
                                        f"student acc {last['acc_prior']:.2f} | {last['tokens_per_s']:.0f} tok/s")
            # --- checkpoint (a signal on any rank stops every rank)
            interrupted = not all_ranks_agree(stop.signum is None, info)
            done = step + 1 == cfg.max_steps
            if interrupted or done or (step + 1) % cfg.save_every == 0:
                with stop.saving():
                    path = save_checkpoint(out_dir, step + 1, model=policy, tokenizer=tokenizer,
                                           trainer_state=state(step + 1), optimizer=opt, keep_last=cfg.keep_last,
                                           info=info)
                interrupted = interrupted or not all_ranks_agree(stop.signum is None, info)  # one during the save
                if interrupted:
                    bar.close()
                    raise Interrupted(stop.signum or signal.SIGTERM, path)
    bar.close()
    return last


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate(cfg: TrainConfig, engine, tokenizer, examples, results_path: Path | None = None,
             info: DistInfo | None = None, desc: str = "eval") -> dict:
    """ACC, A.Tok and eps3 through ``vpgea.eval`` with the training student-view prompt. Under torchrun each rank
    answers its share of the problems; rank 0 gathers the records, writes ``results_path`` and summarises, and every
    rank returns the summary."""
    from vpgea.eval import generate_records, summarize

    info = info or DistInfo()
    kw = dict(samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
              batch_size=cfg.rollout_batch_size, prompt_fn=lambda ex: student_prompt(cfg, tokenizer, ex.question),
              seed=cfg.seed, shard=(info.rank, info.world_size), progress=desc if info.is_main else False)
    part = results_path
    if info.enabled and results_path is not None:
        part = results_path.with_name(f"{results_path.stem}.rank{info.rank}.jsonl")
    parts = gather_objects(generate_records(engine, tokenizer, examples, results_path=part, **kw), info)
    res = None
    if info.is_main:
        records = sorted((r for p in parts for r in p), key=lambda r: (r["problem"], r["sample"]))
        if info.enabled and results_path is not None:
            atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in records))
            for r in range(info.world_size):
                results_path.with_name(f"{results_path.stem}.rank{r}.jsonl").unlink(missing_ok=True)
        full = summarize(records)
        res = {k: full[k] for k in ("acc", "avg_tokens", "eps3")} | {
            k: v for k, v in full.items() if k not in ("acc", "avg_tokens", "eps3") and isinstance(v, (int, float))
        }
    return broadcast_object(res, info)


def fmt(r: dict) -> str:
    return f"acc {r['acc']:.3f} | avg tokens {r['avg_tokens']:.1f} | eps3 {r['eps3']:.5f}"


TABLE_ROWS = {"before": "warm start", "vpgea": "VPG-EA", "grpo_lp": "grpo-lp", "after": "after training"}


def table(summary: dict) -> str:
    """The run's evaluations as the Markdown table the README shows."""
    lines = ["| model | ACC | A.Tok | eps3 = ACC^2 / A.Tok |", "|---|---|---|---|"]
    for key, label in TABLE_ROWS.items():
        if isinstance(r := summary.get(key), dict) and "acc" in r:
            lines.append(f"| {label} | {r['acc']:.3f} | {r['avg_tokens']:.1f} | {r['eps3']:.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# entry points


def build(cfg: TrainConfig, hf_model, tokenizer, info: DistInfo):
    """The policy on this rank's device (sharded with FSDP2 under torchrun) and its rollout engine."""
    from vpgea.distributed import apply_fsdp
    from vpgea.engines import make_engine
    from vpgea.policy import PolicyModel

    policy = PolicyModel.from_model(hf_model.to(info.device), attn_impl=cfg.attn_impl)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    engine = None
    if cfg.engine == "hf":  # built before sharding: under FSDP2 it decodes from its own full copy
        # bf16 decoding on a GPU: a bf16 replica under FSDP2, autocast over the shared fp32 module on one GPU.
        half = torch.bfloat16 if info.device.type == "cuda" and cfg.bf16 else None
        engine = make_engine("hf", policy, tokenizer, batch_size=cfg.rollout_batch_size, replica=info.enabled,
                             dtype=half)
    apply_fsdp(policy, hf_model, info, mixed_precision=info.device.type == "cuda" and cfg.bf16)
    if cfg.engine == "vllm":  # built from the policy: its current weights (a resumed run's) are pushed at once
        # The context vLLM must hold: the longest prompt (either view) and the longest response. Without it vLLM
        # takes the checkpoint's own (131072 for the R1 distills) and may refuse to start on a share of the GPU.
        engine = make_engine("vllm", policy, tokenizer, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                             max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens, seed=cfg.seed)
    return policy, engine


def _load_weights(hf_model, checkpoint_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32, local_files_only=True)
    hf_model.load_state_dict(src.state_dict())


def _resume_state(cfg: TrainConfig, modes: tuple[str, ...] | None = None) -> dict | None:
    """The ``--resume`` checkpoint's trainer state, its settings checked against ``cfg`` (ValueError naming each
    difference). ``modes``: the toy run's sequence of trainers; the checkpoint may be any one of them."""
    if not cfg.resume:
        return None
    state = load_trainer_state(cfg.resume)
    mode = state.get("mode", cfg.mode)
    ref = dataclasses.replace(cfg, mode=mode) if modes is not None and mode in modes else cfg
    for line in check_resume(ref, state.get("config", {})):
        log(f"--resume: accepted {line}")
    return state


def run_toy(cfg: TrainConfig, info: DistInfo) -> dict:
    """The default run: warm start (cached), evaluate, VPG-EA, evaluate, grpo-lp from the same start, evaluate."""
    from transformers import AutoModelForCausalLM

    from vpgea import toy

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    modes = tuple([cfg.mode] + (["grpo-lp"] if cfg.baseline and cfg.mode == "vpgea" else []))
    resume = _resume_state(cfg, modes)  # before the warm start: a refused resume fails in seconds
    task = toy.ToyTask(sft_steps=cfg.toy_sft_steps, sft_max_steps=cfg.toy_sft_max_steps,
                       min_accuracy=cfg.toy_min_accuracy)
    if info.is_main:  # one rank trains the warm start; the others load it from the cache
        toy.warm_start(task, log=log)
    barrier(info)
    model_dir, _, tokenizer = toy.warm_start(task, log=None)
    train_ex = toy.make_examples(cfg.toy_train_size, seed=cfg.seed + 1, task=task, split="train")
    eval_ex = toy.make_examples(cfg.eval_limit or 500, seed=cfg.seed + 2, task=task, split="eval")
    items, skipped = prepare(cfg, tokenizer, train_ex)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if resume is not None and summary_path.exists() else {}

    def fresh_model():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)

    def save_summary():
        if info.is_main:
            atomic_write_text(summary_path, json.dumps(summary, indent=1))

    if "before" not in summary:
        policy, engine = build(cfg, fresh_model(), tokenizer, info)
        summary["before"] = evaluate(cfg, engine, tokenizer, eval_ex, out / "eval_before.jsonl", info,
                                     desc="eval warm start")
        log(f"before   | {fmt(summary['before'])}")
    for mode in modes:
        key = mode.replace("-", "_")
        if key in summary:
            continue
        mcfg = dataclasses.replace(cfg, mode=mode)
        hf = fresh_model()
        r = None
        if resume is not None and resume["mode"] == mode:
            _load_weights(hf, resume["_dir"])
            r = resume
        policy, engine = build(mcfg, hf, tokenizer, info)
        train(mcfg, policy, tokenizer, items, out / key, engine=engine, skipped=skipped, resume=r, info=info)
        summary[key] = evaluate(mcfg, engine, tokenizer, eval_ex, out / f"eval_{key}.jsonl", info,
                                desc=f"eval {mode}")
        log(f"{key:8s} | {fmt(summary[key])}")
        save_summary()
    summary["wall_time_s"] = summary.get("wall_time_s", 0.0) + time.perf_counter() - t_start
    save_summary()
    return summary


def run_real(cfg: TrainConfig, info: DistInfo) -> dict:
    """Train a local Hugging Face model on a JSONL data set; evaluate before/after when --eval-data is given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vpgea.data import load_jsonl_dataset

    model_dir = Path(cfg.model)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {cfg.model}: directory does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model {cfg.model}: no config.json; expected a Hugging Face model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # OSError / ValueError, or ImportError when transformers falls back to a slow tokenizer
        raise FileNotFoundError(
            f"--model {cfg.model}: no usable tokenizer in the directory ({type(e).__name__}: {e})"
        ) from e
    if cfg.train_data is None:
        raise ValueError("--train-data is required with --model")
    examples = load_jsonl_dataset(cfg.train_data, question_field=cfg.question_field, answer_field=cfg.answer_field)
    eval_ex = None
    if cfg.eval_data:  # read before any model is loaded: a bad file fails in seconds
        eval_ex = load_jsonl_dataset(cfg.eval_data, question_field=cfg.question_field, answer_field=cfg.answer_field,
                                     limit=cfg.eval_limit)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    items, skipped = prepare(cfg, tokenizer, examples)
    if skipped:
        log(f"skipped {skipped} of {len(examples)} training prompts longer than --max-prompt-tokens "
            f"{cfg.max_prompt_tokens}")
    resume = _resume_state(cfg)
    src = resume["_dir"] if resume is not None else model_dir
    # fp32 master weights; bf16 comes from autocast (one GPU) or FSDP2's mixed precision (several).
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    policy, engine = build(cfg, hf, tokenizer, info)
    summary: dict = {}
    if eval_ex is not None and resume is None:
        summary["before"] = evaluate(cfg, engine, tokenizer, eval_ex, out / "eval_before.jsonl", info,
                                     desc="eval before")
        log(f"before | {fmt(summary['before'])}")
    summary["train"] = train(cfg, policy, tokenizer, items, out, engine=engine, skipped=skipped, resume=resume,
                             info=info)
    if eval_ex is not None:
        summary["after"] = evaluate(cfg, engine, tokenizer, eval_ex, out / "eval_after.jsonl", info,
                                    desc="eval after")
        log(f"after  | {fmt(summary['after'])}")
    if info.is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


@contextlib.contextmanager
def run_lock(cfg: TrainConfig, info: DistInfo):
    """Hold the output directory's run lock for the run (rank 0 takes it; every rank stops if it cannot)."""
    lock, refused = None, None
    if info.is_main:
        try:
            lock = RunLock(cfg.output_dir, "vpgea.train run").acquire()
        except RunLocked as e:
            refused = str(e)
    refused = broadcast_object(refused, info)
    if refused:
        raise RunLocked(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _where(cfg: TrainConfig, summary: dict) -> str:
    """Where the run wrote its summary and checkpoints."""
    out = Path(cfg.output_dir)
    dirs = [out / k for k in ("vpgea", "grpo_lp") if k in summary] if cfg.is_toy else [out]
    ckpts = [str(c) for d in dirs if (c := latest_checkpoint(d)) is not None]
    return f"wrote {out / 'summary.json'}; checkpoints: {', '.join(ckpts) or 'none'}"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ValueError as e:  # argparse's own errors exit 2 with its usage line; config checks the same way
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for w in cfg.warnings():
        log(f"warning: {w}")
    if cfg.engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:  # fail at start-up, not after the model has loaded
            print("error: --engine vllm: the vllm package is not installed (pip install 'vpgea[vllm]')",
                  file=sys.stderr, flush=True)
            return 2
    if cfg.device != "auto" and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        log(f"error: --device {cfg.device}: CUDA is not available on this machine")
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bar per model load and save
    info = init_distributed(None if cfg.device == "auto" else cfg.device)
    where = f"rank {info.rank}: " if info.enabled else ""
    try:
        questions_per_rank(cfg, info)  # before any model is loaded
        with run_lock(cfg, info):
            summary = run_toy(cfg, info) if cfg.is_toy else run_real(cfg, info)
    except Interrupted as e:
        log(str(e))
        shutdown(info)
        return 128 + e.signum
    except (FileNotFoundError, ValueError, RunLocked) as e:
        # Printed by every rank that hits it (input errors hit them all alike); torchrun then stops the others.
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 2
    except (WarmStartError, CheckpointError, FloatingPointError) as e:  # the run failed; its last checkpoint stays
        print(f"{where}error: {e}", file=sys.stderr, flush=True)
        return 1
    shutdown(info)
    if info.is_main:
        log(_where(cfg, summary))
        if cfg.is_toy:
            print(table(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from vpgea.config import TrainConfig, check_resume, parse_args, save_config, saved_config
from vpgea.data import read_jsonl_log
from vpgea.distributed import (
    DistInfo,
    all_ranks_agree,
    barrier,
    broadcast_object,
    clip_grad_norm,
    gather_objects,
    init_distributed,
    loss_scale,
    shutdown,
)
from vpgea.methods import make_method
from vpgea.modeldir import require_vllm
from vpgea.prompts import answer_tail, eval_extra, student_prompt, teacher_prompt
from vpgea.rundir import RunLock, RunLocked, atomic_write_text
from vpgea.step import StepContext, rollouts, score, update
from vpgea.toy import WarmStartError
from vpgea.tracking import check_report_to, open_tracker

__all__ = ["main", "train"]

# Logs and progress bars come from rank 0 only (torchrun sets RANK; a plain process is rank 0).
_IS_MAIN = os.environ.get("RANK", "0") == "0"


def log(msg: str) -> None:
    if _IS_MAIN:
        print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# questions


@dataclasses.dataclass
class Item:
    """A prepared training question: token ids of both views and of the answer tail (stop token included), and the
    span of the tail that U scores (``vpgea.prompts.answer_tail``)."""

    example: object
    student: list[int]
    teacher: list[int]
    tail: list[int]
    u_span: tuple[int, int] = (0, 0)


def prepare(cfg: TrainConfig, tokenizer, examples) -> tuple[list[Item], int]:
    """Tokenize both views and the tail. Returns (items, skipped): prompts over ``max_prompt_tokens`` are skipped."""
    items, skipped = [], 0
    for ex in examples:
        history = getattr(ex, "history", ())  # issue 18: a chat-message question's earlier messages
        s = student_prompt(cfg, tokenizer, ex.question, history=history)
        t = teacher_prompt(cfg, tokenizer, ex.question, ex.answer, history=history)
        if max(len(s), len(t)) > cfg.max_prompt_tokens:
            skipped += 1
            continue
        tail, u_span = answer_tail(cfg, tokenizer, ex.answer)
        items.append(Item(ex, s, t, tail, u_span))
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


def questions_per_rank(cfg: TrainConfig, info: DistInfo) -> int:
    """Each rank's share of ``--questions-per-step`` (the global batch), which must divide evenly."""
    if cfg.questions_per_step % info.world_size:
        raise ValueError(f"--questions-per-step {cfg.questions_per_step} must be a multiple of the number of "
                         f"processes ({info.world_size}): each rank takes the same number of questions")
    return cfg.questions_per_step // info.world_size


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
          resume: dict | None = None, info: DistInfo | None = None, leak_fn=None) -> dict:
    """Train ``policy`` (a ``PolicyModel``, FSDP2-sharded when ``info`` has several ranks) in ``cfg.mode`` for
    ``cfg.max_steps`` steps; rank 0 writes ``metrics.jsonl``, every rank takes part in the checkpoints in ``out_dir``.
    Returns the last step's metrics (the same on every rank)."""
    from tqdm.auto import tqdm

    info = info or DistInfo(device=policy.device)
    if not items:
        raise ValueError("no training questions left (all prompts were over --max-prompt-tokens?)")
    n_q = cfg.questions_per_step
    n_local = questions_per_rank(cfg, info)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # bf16 autocast on one GPU; under FSDP2 its mixed-precision policy casts the parameters instead.
    use_amp = policy.device.type == "cuda" and cfg.bf16 and not info.enabled
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
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
    ctx = StepContext(cfg, policy, tokenizer, engine, info, make_method(cfg, tokenizer), amp, leak_fn=leak_fn)
    scale = loss_scale(n_local, n_q, info)  # a rank's sum of question losses -> its share of the global mean

    def state(step: int) -> dict:
        return {"scheduler": sched.state_dict(), "rng": capture_rng(), "data_position": step * n_q,
                "mode": cfg.mode, "config": saved_config(cfg)}

    last: dict = {}
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=cfg.mode, file=sys.stderr,
               dynamic_ncols=True, disable=not info.is_main)
    mfile = open(metrics_path, "a") if info.is_main else contextlib.nullcontext()
    tracker = open_tracker(cfg, out_dir, enabled=info.is_main, resume_step=start)  # issue 18: --report-to
    with _Stop() as stop, mfile, tracker:
        for step in bar:
            t0 = time.perf_counter()
            ctx.step = step
            # --- the step's questions: the same global order on every rank, each rank takes its share
            order = batch_indices(step, n_q, len(items), cfg.seed)
            positions = list(range(info.rank * n_local, (info.rank + 1) * n_local))
            batch = [items[order[j]] for j in positions]

            # --- rollouts, scoring, update
            groups, gen_tokens = rollouts(ctx, batch, positions)
            t_gen = time.perf_counter() - t0
            score(ctx, groups)
            stats = update(ctx, groups, scale)
            stats.gen_tokens = gen_tokens

            # --- optimizer step
            grad_norm = clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            engine.update_weights(policy)  # a collective under FSDP2 (the shards are gathered)

            # --- log (sums over every rank's questions)
            stats = stats.reduce(info)
            dt = time.perf_counter() - t0
            last = {"step": step + 1, **stats.record(), "tokens_per_s": (stats.gen_tokens + stats.train_tokens) / dt,
                    "step_time": dt, "gen_time": t_gen, "skipped_prompts": skipped, "lr": sched.get_last_lr()[0],
                    "grad_norm": grad_norm}
            if not math.isfinite(last["loss"]):  # the reduced loss: every rank raises together
                raise FloatingPointError(f"step {step + 1}: loss is {last['loss']}")
            if info.is_main:
                mfile.write(json.dumps(last) + "\n")
                mfile.flush()
                tracker.log(last)  # issue 18: the same record to TensorBoard / W&B
                if last["no_pass_questions"]:
                    bar.write(f"step {step + 1}: {last['no_pass_questions']}/{n_q} questions had no posterior path "
                              "passing cross-view validation (zero advantages)", file=sys.stderr)
                if (step + 1) % cfg.log_every == 0:
                    post = last["posterior_len"]
                    post_s = "" if post is None else f" teacher {post:5.1f}"
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

    from vpgea.rewards import load_reward

    info = info or DistInfo()
    # issue 18: chat-message examples keep their earlier messages; responses are graded by --reward
    kw = dict(samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature,
              batch_size=cfg.rollout_batch_size,
              prompt_fn=lambda ex: student_prompt(cfg, tokenizer, ex.question,
                                                  history=getattr(ex, "history", ()), extra=eval_extra(cfg)),
              seed=cfg.seed, shard=(info.rank, info.world_size), grade=load_reward(cfg.reward),
              progress=desc if info.is_main else False)
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
    """The run's evaluations as the Markdown table the README shows: the start, then every trained mode."""
    lines = ["| model | ACC | A.Tok | eps3 = ACC^2 / A.Tok |", "|---|---|---|---|"]
    for key, r in summary.items():
        if isinstance(r, dict) and "acc" in r:
            label = TABLE_ROWS.get(key, key.replace("_", "-"))
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
    modes = tuple(cfg.mode_list())
    resume = _resume_state(cfg, modes)  # before the warm start: a refused resume fails in seconds
    if info.is_main:  # the resolved config as <output_dir>/config.json, once the directory is ours and resume agreed
        save_config(cfg, cfg.output_dir)
    task = toy.ToyTask(sft_steps=cfg.toy_sft_steps, sft_max_steps=cfg.toy_sft_max_steps,
                       min_accuracy=cfg.toy_min_accuracy, variant=cfg.toy_variant)
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
        train(mcfg, policy, tokenizer, items, out / key, engine=engine, skipped=skipped, resume=r, info=info,
              leak_fn=toy.is_leak)
        summary[key] = evaluate(mcfg, engine, tokenizer, eval_ex, out / f"eval_{key}.jsonl", info,
                                desc=f"eval {mode}")
        log(f"{key:8s} | {fmt(summary[key])}")
        save_summary()
    summary["wall_time_s"] = summary.get("wall_time_s", 0.0) + time.perf_counter() - t_start
    save_summary()
    return summary


def run_real(cfg: TrainConfig, info: DistInfo) -> dict:
    """Train a local Hugging Face model on a JSONL data set; evaluate before/after when --eval-data is given."""
    from transformers import AutoModelForCausalLM

    from vpgea.data import load_jsonl_dataset
    from vpgea.modeldir import check_model_dir, load_tokenizer

    model_dir = check_model_dir(cfg.model, "--model")
    tokenizer = load_tokenizer(model_dir, "--model")
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
    modes = cfg.mode_list()
    resume = _resume_state(cfg, tuple(modes) if len(modes) > 1 else None)
    if info.is_main:  # the resolved config as <output_dir>/config.json, once the directory is ours and resume agreed
        save_config(cfg, cfg.output_dir)
    if len(modes) > 1:
        return _compare_real(cfg, info, modes, model_dir, tokenizer, items, skipped, eval_ex, resume)
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


def _compare_real(cfg, info, modes, model_dir, tokenizer, items, skipped, eval_ex, resume) -> dict:
    """``--modes`` on a real model: each mode trained from ``--model`` on the same data, budget and seeds, into
    ``<output_dir>/<mode>/``, and evaluated on ``--eval-data``; ``summary.json`` gets ``before`` and one entry per
    mode (``-`` written ``_``). A resumed run skips the modes its summary already has."""
    from transformers import AutoModelForCausalLM

    out = Path(cfg.output_dir)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if resume is not None and summary_path.exists() else {}

    def fresh(src):
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)

    if eval_ex is not None and "before" not in summary:
        _, engine = build(cfg, fresh(model_dir), tokenizer, info)
        summary["before"] = evaluate(cfg, engine, tokenizer, eval_ex, out / "eval_before.jsonl", info,
                                     desc="eval before")
        log(f"before   | {fmt(summary['before'])}")
    for mode in modes:
        key = mode.replace("-", "_")
        if key in summary:
            continue
        mcfg = dataclasses.replace(cfg, mode=mode)
        r = resume if resume is not None and resume["mode"] == mode else None
        policy, engine = build(mcfg, fresh(r["_dir"] if r is not None else model_dir), tokenizer, info)
        last = train(mcfg, policy, tokenizer, items, out / key, engine=engine, skipped=skipped, resume=r, info=info)
        summary[key] = evaluate(mcfg, engine, tokenizer, eval_ex, out / f"eval_{key}.jsonl", info,
                                desc=f"eval {mode}") if eval_ex is not None else {"train": last}
        if eval_ex is not None:
            log(f"{key:8s} | {fmt(summary[key])}")
        if info.is_main:
            atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return summary


def startup_checks(cfg: TrainConfig) -> None:
    """What can fail fast, before any model or data is loaded: the --report-to packages, the --reward function
    (imported and its signature checked). ValueError with the reason."""
    from vpgea.rewards import load_reward

    check_report_to(cfg.report_to)
    load_reward(cfg.reward)


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
    dirs = [out / k for k in summary if (out / k).is_dir()] if cfg.is_toy else [out]
    ckpts = [str(c) for d in dirs if (c := latest_checkpoint(d)) is not None]
    return f"wrote {out / 'summary.json'}; checkpoints: {', '.join(ckpts) or 'none'}"


def main(argv: list[str] | None = None) -> int:
    # A bad config file or value, a missing tracker package or a bad --reward exits 2 before any model loads.
    try:
        cfg = parse_args(argv)
        startup_checks(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for w in cfg.warnings():
        log(f"warning: {w}")
    if cfg.engine == "vllm":
        try:
            require_vllm("--engine vllm")  # at start-up, not after the model has loaded
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
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

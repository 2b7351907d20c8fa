"""``python -m vpgea.train``: the VPG-EA trainer (and the grpo-lp baseline) as one flat loop.

With no arguments it runs the self-contained toy run on CPU: a tiny model and tokenizer built in code, a cached
supervised warm start on deliberately verbose traces, evaluation, VPG-EA training, evaluation, the grpo-lp baseline
on the same budget, evaluation, and ``summary.json``. With ``--model DIR --train-data FILE`` it trains a real model.
The algorithm is in ../shared/DESIGN.md; the per-question arithmetic is in ``vpgea.algorithm``.
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
from vpgea.checkpoint import capture_rng, load_trainer_state, restore_rng, save_checkpoint
from vpgea.config import TrainConfig, parse_args

__all__ = ["main", "train"]


def log(msg: str) -> None:
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


def rollout(engine, tokenizer, cfg: TrainConfig, prompts: list[list[int]], golds: list[str], seed: int):
    try:
        from vpgea.grading import extract_answer, is_correct
    except ImportError:  # TEMPORARY
        extract_answer, is_correct = _fallback_extract, lambda p, g: p is not None and p == g

    outs = engine.generate(
        prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed
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


# ----------------------------------------------------------------------------------------------------------------------
# the training loop


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits cleanly."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.signum = signum
        log(f"signal {signum}: finishing this step, saving a checkpoint, then exiting")

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"interrupted by signal {signum}; checkpoint at {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def train(cfg: TrainConfig, policy, tokenizer, items: list[Item], out_dir: Path, *, engine, skipped: int = 0,
          resume: dict | None = None) -> dict:
    """Train ``policy`` (a ``PolicyModel``) in ``cfg.mode`` for ``cfg.max_steps`` steps; writes ``metrics.jsonl``
    and checkpoints into ``out_dir``. Returns the last step's metrics."""
    from tqdm.auto import tqdm

    from vpgea.grpo import grpo_loss
    from vpgea.losses import vpgea_loss

    if not items:
        raise ValueError("no training questions left (all prompts were over --max-prompt-tokens?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = policy.device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16 else contextlib.nullcontext()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start = 0
    metrics_path = out_dir / "metrics.jsonl"
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        restore_rng(resume["rng"])
        start = int(resume["step"])
        if metrics_path.exists():  # drop lines past the checkpoint: they are recomputed
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
    elif metrics_path.exists():
        metrics_path.unlink()
    vpgea = cfg.mode == "vpgea"
    n_q = cfg.questions_per_step
    K, G = cfg.prior_samples, cfg.group_size

    def state(step: int) -> dict:
        return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": capture_rng(),
                "data_position": step * n_q, "mode": cfg.mode, "config": dataclasses.asdict(cfg)}

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out_dir, step, model=policy, tokenizer=tokenizer, trainer_state=state(step),
                               keep_last=cfg.keep_last)

    last: dict = {}
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=cfg.mode, file=sys.stderr,
               dynamic_ncols=True, disable=None)
    with _Stop() as stop, open(metrics_path, "a") as mfile:
        for step in bar:
            t0 = time.perf_counter()
            batch = [items[i] for i in batch_indices(step, n_q, len(items), cfg.seed)]
            golds = [it.example.answer for it in batch]

            # --- rollouts: K prior (student view) + G posterior (teacher view) per question; grpo-lp: G + K student
            engine.wake()
            if vpgea:
                prompts = [it.student for it in batch for _ in range(K)] + [it.teacher for it in batch for _ in range(G)]
                gold_rep = [g for g in golds for _ in range(K)] + [g for g in golds for _ in range(G)]
            else:
                prompts = [it.student for it in batch for _ in range(K + G)]
                gold_rep = [g for g in golds for _ in range(K + G)]
            outs = rollout(engine, tokenizer, cfg, prompts, gold_rep, seed=cfg.seed * 1_000_003 + step)
            engine.sleep()
            gen_tokens = sum(len(o.ids) for o in outs)
            t_gen = time.perf_counter() - t0

            loss_sum, train_tokens = 0.0, 0
            rec: dict[str, list] = {k: [] for k in ("reward", "passed", "gate", "kl", "no_pass")}
            if vpgea:
                prior = [outs[q * K : (q + 1) * K] for q in range(n_q)]
                post = [outs[n_q * K + q * G : n_q * K + (q + 1) * G] for q in range(n_q)]

                # --- prior-view scoring, no grad: U(z) = log P(a(y*) | S(x) + z) for every prior path
                with torch.no_grad(), amp:
                    lps = policy.sequence_logprobs(
                        [it.student for it in batch for _ in range(K)], [o.z for ps in prior for o in ps],
                        answers=[it.tail for it in batch for _ in range(K)],
                        max_tokens=cfg.max_tokens_per_micro_batch, impl=cfg.logprob_impl,
                    )
                u_prior = [torch.stack([lps[q * K + k][-len(batch[q].tail):].sum() for k in range(K)]).float().cpu()
                           for q in range(n_q)]

                # --- per question: one packed forward of both views, cross-view validation, eta, advantages, loss
                for q, it in enumerate(batch):
                    zs = [o.z for o in post[q]]
                    tails = [it.tail] * G
                    with amp:
                        lps = policy.sequence_logprobs(
                            [it.teacher] * G + [it.student] * G, zs + zs, answers=tails + tails,
                            max_tokens=cfg.max_tokens_per_micro_batch, impl=cfg.logprob_impl,
                        )
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
                    if bool((sc.advantage != 0).any()):  # all-zero advantages: zero loss, nothing to backpropagate
                        (loss / n_q).backward()
                    loss_sum += float(loss.detach())
                    train_tokens += int(lens.sum()) * 2
                    rec["reward"].append(sc.reward.mean().item())
                    rec["passed"].append(sc.passed.float().mean().item())
                    rec["gate"].append(float(m["gate_frac"]))
                    rec["kl"].append(float(m["kl"]))
                    rec["no_pass"].append(int(not bool(sc.passed.any())))
                prior_len = sum(len(o.ids) for ps in prior for o in ps) / (n_q * K)
                post_len = sum(len(o.ids) for ps in post for o in ps) / (n_q * G)
                acc_prior = sum(o.correct for ps in prior for o in ps) / (n_q * K)
                acc_post = sum(o.correct for ps in post for o in ps) / (n_q * G)
            else:
                # --- grpo-lp: correctness + group-relative length penalty, GRPO advantages, on-policy surrogate
                n = K + G
                for q, it in enumerate(batch):
                    group = outs[q * n : (q + 1) * n]
                    reward = alg.length_penalty_reward(torch.tensor([o.correct for o in group]),
                                                       torch.tensor([len(o.ids) for o in group]), cfg.length_penalty)
                    adv = alg.group_advantages(reward)
                    rec["reward"].append(reward.mean().item())
                    if not bool((adv != 0).any()):
                        continue
                    with amp:
                        lps = policy.sequence_logprobs([it.student] * n, [o.ids for o in group],
                                                       max_tokens=cfg.max_tokens_per_micro_batch, impl=cfg.logprob_impl)
                    lens = torch.tensor([0] + [t.numel() for t in lps])
                    cu = lens.cumsum(0).to(torch.int32).to(device)
                    loss, _ = grpo_loss(torch.cat(lps), adv.to(device), cu, loss_type="grpo")
                    (loss / n_q).backward()
                    loss_sum += float(loss.detach())
                    train_tokens += int(lens.sum())
                prior_len = gen_tokens / len(outs)
                post_len = None
                acc_prior = sum(o.correct for o in outs) / len(outs)
                acc_post = None

            # --- optimizer step
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            engine.update_weights(policy)

            # --- log
            dt = time.perf_counter() - t0
            mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
            last = {
                "step": step + 1,
                "loss": loss_sum / n_q,
                "reward_mean": mean(rec["reward"]),
                "prior_len": prior_len,
                "posterior_len": post_len,
                "cross_view_pass": mean(rec["passed"]),
                "gate_frac": mean(rec["gate"]),
                "kl": mean(rec["kl"]),
                "tokens_per_s": (gen_tokens + train_tokens) / dt,
                "step_time": dt,
                "gen_time": t_gen,
                "gen_tokens": gen_tokens,
                "train_tokens": train_tokens,
                "acc_prior": acc_prior,
                "acc_posterior": acc_post,
                "no_pass_questions": sum(rec["no_pass"]) if vpgea else None,
                "skipped_prompts": skipped,
                "lr": sched.get_last_lr()[0],
                "grad_norm": float(grad_norm),
            }
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"step {step + 1}: loss is {last['loss']}")
            mfile.write(json.dumps(last) + "\n")
            mfile.flush()
            if last["no_pass_questions"]:
                bar.write(f"step {step + 1}: {last['no_pass_questions']}/{n_q} questions had no posterior path "
                          "passing cross-view validation (zero advantages)")
            if (step + 1) % cfg.log_every == 0:
                post_s = f"{post_len:5.1f}" if post_len is not None else "  -  "
                bar.set_postfix_str(f"loss {last['loss']:+.4f} | len {prior_len:5.1f}/{post_s} | acc {acc_prior:.2f}"
                                    f" | {last['tokens_per_s']:.0f} tok/s")
            # --- checkpoint
            done = step + 1 == cfg.max_steps
            if stop.signum is not None or done or (step + 1) % cfg.save_every == 0:
                path = checkpoint(step + 1)
                if stop.signum is not None:
                    bar.close()
                    raise Interrupted(stop.signum, path)
    bar.close()
    return last


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


def evaluate(cfg: TrainConfig, engine, tokenizer, examples, results_path: Path | None = None) -> dict:
    """ACC, A.Tok and eps3 through ``vpgea.eval.evaluate`` with the training student-view prompt."""
    try:
        from vpgea.eval import evaluate as eval_fn
    except ImportError:  # TEMPORARY
        eval_fn = _fallback_evaluate

    res = eval_fn(engine, tokenizer, examples, samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.eval_temperature, batch_size=cfg.rollout_batch_size,
                  prompt_fn=lambda ex: student_prompt(cfg, tokenizer, ex.question), results_path=results_path)
    return {k: res[k] for k in ("acc", "avg_tokens", "eps3")} | {
        k: v for k, v in res.items() if k not in ("acc", "avg_tokens", "eps3") and isinstance(v, (int, float))
    }


def fmt(r: dict) -> str:
    return f"acc {r['acc']:.3f} | avg tokens {r['avg_tokens']:.1f} | eps3 {r['eps3']:.5f}"


# ----------------------------------------------------------------------------------------------------------------------
# entry points


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return dev


def build(cfg: TrainConfig, hf_model, tokenizer, device):
    from vpgea.engines import make_engine
    from vpgea.policy import PolicyModel

    policy = PolicyModel.from_model(hf_model.to(device), attn_impl=cfg.attn_impl)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if cfg.engine == "hf":
        engine = make_engine("hf", policy, tokenizer, batch_size=cfg.rollout_batch_size)
    else:
        engine = make_engine("vllm", cfg.model, tokenizer)
    return policy, engine


def _load_weights(hf_model, checkpoint_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32, local_files_only=True)
    hf_model.load_state_dict(src.state_dict())


def run_toy(cfg: TrainConfig) -> dict:
    """The default run: warm start (cached), evaluate, VPG-EA, evaluate, grpo-lp from the same start, evaluate."""
    from transformers import AutoModelForCausalLM

    from vpgea import toy

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    task = toy.ToyTask(sft_steps=cfg.toy_sft_steps)
    model_dir, _, tokenizer = toy.warm_start(task, log=log)
    train_ex = toy.make_examples(cfg.toy_train_size, seed=cfg.seed + 1, task=task, split="train")
    eval_ex = toy.make_examples(cfg.eval_limit or 500, seed=cfg.seed + 2, task=task, split="eval")
    items, skipped = prepare(cfg, tokenizer, train_ex)
    summary_path = out / "summary.json"
    resume = load_trainer_state(cfg.resume) if cfg.resume else None
    summary = json.loads(summary_path.read_text()) if resume is not None and summary_path.exists() else {}

    def fresh_model():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)

    if "before" not in summary:
        policy, engine = build(cfg, fresh_model(), tokenizer, device)
        summary["before"] = evaluate(cfg, engine, tokenizer, eval_ex, out / "eval_before.jsonl")
        log(f"before   | {fmt(summary['before'])}")
    modes = [cfg.mode] + (["grpo-lp"] if cfg.baseline and cfg.mode == "vpgea" else [])
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
        policy, engine = build(mcfg, hf, tokenizer, device)
        train(mcfg, policy, tokenizer, items, out / key, engine=engine, skipped=skipped, resume=r)
        summary[key] = evaluate(mcfg, engine, tokenizer, eval_ex, out / f"eval_{key}.jsonl")
        log(f"{key:8s} | {fmt(summary[key])}")
        summary_path.write_text(json.dumps(summary, indent=1))
    summary["wall_time_s"] = summary.get("wall_time_s", 0.0) + time.perf_counter() - t_start
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def run_real(cfg: TrainConfig) -> dict:
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
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--model {cfg.model}: no usable tokenizer in the directory ({e})") from e
    if cfg.train_data is None:
        raise ValueError("--train-data is required with --model")
    examples = load_jsonl_dataset(cfg.train_data, question_field=cfg.question_field, answer_field=cfg.answer_field)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items, skipped = prepare(cfg, tokenizer, examples)
    if skipped:
        log(f"skipped {skipped} of {len(examples)} training prompts longer than --max-prompt-tokens "
            f"{cfg.max_prompt_tokens}")
    resume = load_trainer_state(cfg.resume) if cfg.resume else None
    src = resume["_dir"] if resume is not None else model_dir
    # fp32 master weights; bf16 comes from autocast on GPU.
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    policy, engine = build(cfg, hf, tokenizer, device)
    eval_ex = None
    summary: dict = {}
    if cfg.eval_data:
        eval_ex = load_jsonl_dataset(cfg.eval_data, question_field=cfg.question_field, answer_field=cfg.answer_field,
                                     limit=cfg.eval_limit)
        if resume is None:
            summary["before"] = evaluate(cfg, engine, tokenizer, eval_ex, out / "eval_before.jsonl")
            log(f"before | {fmt(summary['before'])}")
    summary["train"] = train(cfg, policy, tokenizer, items, out, engine=engine, skipped=skipped, resume=resume)
    if eval_ex is not None:
        summary["after"] = evaluate(cfg, engine, tokenizer, eval_ex, out / "eval_after.jsonl")
        log(f"after  | {fmt(summary['after'])}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.engine == "vllm":
        from vpgea.engines import make_engine  # noqa: F401 - fail at start-up when vllm is missing
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise SystemExit("--engine vllm: the vllm package is not installed (pip install 'vpgea[vllm]')")
    try:
        summary = run_toy(cfg) if cfg.is_toy else run_real(cfg)
    except Interrupted as e:
        log(str(e))
        return 128 + e.signum
    except (FileNotFoundError, ValueError) as e:
        log(f"error: {e}")
        return 2
    if cfg.is_toy:
        print(json.dumps({k: summary[k] for k in ("before", "vpgea", "grpo_lp") if k in summary}, indent=1))
    return 0



# ----------------------------------------------------------------------------------------------------------------------
# TEMPORARY fallbacks until vpgea.grading / vpgea.eval (EVAL) land
def _fallback_extract(text):
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    j, depth = i + len("\\boxed{"), 1
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j:k].strip()
    return None


def _fallback_evaluate(engine, tokenizer, examples, *, samples=1, max_new_tokens=256, temperature=0.0,
                       batch_size=64, prompt_fn=None, results_path=None, resume=False):
    prompts = [prompt_fn(ex) for ex in examples for _ in range(samples)]
    outs = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
    golds = [ex.answer for ex in examples for _ in range(samples)]
    correct = [_fallback_extract(tokenizer.decode(o.token_ids, skip_special_tokens=True)) == g
               for o, g in zip(outs, golds)]
    acc = sum(correct) / len(correct)
    tok = sum(len(o.token_ids) for o in outs) / len(outs)
    return {"acc": acc, "avg_tokens": tok, "eps3": acc * acc / max(tok, 1e-9)}


if __name__ == "__main__":
    sys.exit(main())

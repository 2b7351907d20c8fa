"""The self-contained default run's pieces, all built in code: a word-level tokenizer with a chat template, a tiny
Llama, a synthetic multi-step arithmetic task with deliberately verbose warm-start traces, and a cached supervised
warm start.

The task: a start digit and 2-4 signed digits, e.g. ``7 +3 -5 +8``; the answer is the running value mod 10. A
warm-start trace works through the operations one step at a time (``7 +3 = 0 ;``). Like a verbose reasoning model it
repeats redundant checks (``check 7 +3 = 0 ok ;``) and takes detours (``wait 7 +3 = 1 no 7 +3 = 0 ;``), and it makes a
wrong step now and then, which the checks never catch (they only repeat the step): checks and detours neither help
nor hurt accuracy.

The toy is a miniature of VPG-EA's premise, and nothing more (variant ``answer-aware``, the default):

- conciseness is a property of the whole trace. A concise trace has no check and no detour in any step; a verbose
  one checks every step one to three times. Under the student view (the question alone) the concise style is rare
  (``student_concise_prob``, a few percent): the prior faces the sampling bottleneck the paper describes;
- under the teacher view (the question plus ``hint <answer>``) a model that knows the target verifies less: the
  concise style is common (``teacher_concise_prob``), and some traces are pseudo-efficient (``leak_prob``): a partial
  derivation that then boxes the hint without deriving it. Cross-view validation is there to reject those.

Variant ``same-hint`` is the earlier toy, kept for comparison: hinted traces are drawn from the student's
distribution, with per-step checks (0-3, independent) and no whole-trace style, so the teacher view is no shorter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "ToyTask",
    "WarmStartError",
    "build_tokenizer",
    "build_model",
    "make_examples",
    "heldout_accuracy",
    "read_record",
    "is_leak",
    "trace",
    "verbose_trace",
    "warm_start",
]

_SPECIALS = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>"]
_WORDS = ["=", ";", "check", "ok", "wait", "no", "hint", "\\boxed{", "}", "budget"]
_NUMBERS = [str(n) for n in range(10, 200)]  # L1's length targets ("budget 48"); the digits 0-9 are below
_DIGITS = [str(d) for d in range(10)]
_OPERANDS = [f"{s}{d}" for s in "+-" for d in range(1, 10)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


VARIANTS = ("answer-aware", "same-hint")


@dataclass(kw_only=True, slots=True)
class ToyTask:
    """Settings of the synthetic task, the tiny model and its warm start (all part of the cache key)."""

    min_ops: int = 2
    """Fewest operations per question."""
    max_ops: int = 4
    """Most operations per question."""
    variant: str = "answer-aware"
    """"answer-aware" (the paper's premise, see the module docstring) or "same-hint" (hinted traces drawn from the
    student's distribution: nothing short to distil; the earlier toy)."""
    check_probs: tuple[float, ...] = (0.25, 0.35, 0.25, 0.15)
    """same-hint: probability of 0, 1, 2, ... redundant checks after each step, independently per step."""
    verbose_check_probs: tuple[float, ...] = (0.0, 0.75, 0.2, 0.05)
    """answer-aware: probability of 0, 1, 2, 3 checks after each step of a verbose trace. Never 0: skipping the checks
    is the concise style, a choice for the whole trace. Mean 1.3 checks per step, as same-hint's, so the student
    view stays as verbose as before."""
    student_concise_prob: float = 0.03
    """answer-aware: share of concise traces (no check, no detour in any step) under the student view: rare, so the
    prior seldom samples a short correct path (same-hint's per-step draws give about 0.5% with 3 operations)."""
    teacher_concise_prob: float = 0.5
    """answer-aware: share of concise traces under the teacher view: a model that knows the target verifies less."""
    leak_prob: float = 0.2
    """answer-aware: share of pseudo-efficient teacher-view traces: the first 1 .. n-1 steps written concisely, then
    the hint boxed without deriving it (the answer is right; the path does not get there)."""
    detour_prob: float = 0.3
    """Probability that a step of a verbose trace starts with a wrong attempt that it then corrects."""
    error_prob: float = 0.08
    """Probability that a step of a warm-start trace writes a wrong result (kept, and repeated by its checks)."""
    hint_frac: float = 0.3
    """Fraction of warm-start examples shown with the teacher-view hint in the prompt."""
    hidden_size: int = 64
    """Tiny Llama width."""
    num_layers: int = 3
    """Tiny Llama depth."""
    num_heads: int = 4
    """Attention heads (2 KV heads)."""
    sft_examples: int = 4000
    """Warm-start training traces."""
    sft_steps: int = 1200
    """Warm-start optimizer steps per round: one warmup and cosine-decay cycle, then the held-out accuracy check."""
    sft_max_steps: int = 4800
    """Bound on the warm start: while the check fails, another round of ``sft_steps`` continues from the weights and
    optimizer state reached (a fresh cycle: warm restarts), up to this many steps in all; then it stops with an
    error. Grokking is fragile: with torch 2.13 and transformers 5.25 one 1200-step cycle left the arithmetic at
    chance where transformers 5.23 had learned it."""
    min_accuracy: float = 0.5
    """Held-out accuracy the warm start must reach: the fraction of ``check_questions`` eval-split questions whose one
    response, sampled at temperature 1 (as the run evaluates), boxes the right answer. Chance is about 0.1; a model
    that has learned the traces' step distribution scores about 0.6. 0 accepts any model (tests)."""
    check_questions: int = 200
    """Held-out questions the accuracy check samples (never trained on; drawn apart from the run's evaluation)."""
    sft_batch_size: int = 64
    """Warm-start batch size."""
    sft_lr: float = 3e-3
    """Warm-start peak learning rate (cosine decay)."""
    sft_weight_decay: float = 0.1
    """Warm-start AdamW weight decay on the weight matrices. Without it the tiny model learns the format and the
    copying within ~400 steps but the mod-10 arithmetic stays at chance (10% per step after 1200 steps); with 0.1 it
    "groks" the table between steps 600 and 1000 (99% per step at 1200, teacher-forced on error-free traces)."""
    seed: int = 0
    """Seed for the data, the initial weights and the warm start."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("check_probs", "verbose_check_probs"):
            if abs(sum(getattr(self, name)) - 1.0) > 1e-6:
                raise ValueError(f"{name} must sum to 1, got {getattr(self, name)}")
        if self.teacher_concise_prob + self.leak_prob > 1.0:
            raise ValueError(f"teacher_concise_prob + leak_prob must be <= 1, got "
                             f"{self.teacher_concise_prob} + {self.leak_prob}")
        if not 1 <= self.sft_steps <= self.sft_max_steps:
            raise ValueError(f"need 1 <= sft_steps <= sft_max_steps, got {self.sft_steps}, {self.sft_max_steps}")
        if self.check_questions < 1:
            raise ValueError(f"check_questions must be >= 1, got {self.check_questions}")
        for name in ("detour_prob", "error_prob", "hint_frac", "min_accuracy", "student_concise_prob",
                     "teacher_concise_prob", "leak_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def key(self) -> str:
        """Short hash of every setting: the warm-start cache key."""
        blob = json.dumps(asdict(self), sort_keys=True) + "|v5"  # v5: trace styles, L1's vocabulary
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --- tokenizer and model --------------------------------------------------------------------------------------------


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` (whitespace split) with EOS, padding and a minimal chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_SPECIALS + _WORDS + _DIGITS + _OPERANDS + _NUMBERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(task: ToyTask, tokenizer):
    """A tiny random Llama sized for the toy vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=task.hidden_size,
        intermediate_size=task.hidden_size * 4,
        num_hidden_layers=task.num_layers,
        num_attention_heads=task.num_heads,
        num_key_value_heads=max(1, task.num_heads // 2),
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(task.seed)
    return LlamaForCausalLM(config)


# --- the task -------------------------------------------------------------------------------------------------------


def in_eval_split(question: str) -> bool:
    """A fixed tenth of all questions (by hash) is held out for evaluation: never trained on, in any phase."""
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % 10 == 0


def make_examples(n: int, *, seed: int, task: ToyTask | None = None, split: str = "train") -> list:
    """``n`` questions of ``split`` ("train" or "eval") with answers, as ``vpgea.data.Example``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    from vpgea.data import Example

    task = task or ToyTask()
    rng = random.Random(seed)
    out = []
    i = 0
    while len(out) < n:
        i += 1
        n_ops = rng.randint(task.min_ops, task.max_ops)
        start = rng.randint(0, 9)
        ops = [rng.choice(_OPERANDS) for _ in range(n_ops)]
        value = start
        for op in ops:
            value = (value + int(op)) % 10
        question = " ".join([str(start), *ops])
        if in_eval_split(question) != (split == "eval"):
            continue
        out.append(Example(question=question, answer=str(value), source=f"toy:{seed}:{i}"))
    return out


def _steps(question: str, rng: random.Random, task: ToyTask, checks, n_steps: int | None = None):
    """The trace's steps: ``checks()`` draws each step's number of checks; detours only in steps with checks (a
    concise step has neither). Returns (parts, the last value written)."""
    start, *ops = question.split()
    value = int(start)
    parts = []
    for op in ops[:n_steps]:
        true = (value + int(op)) % 10
        result = true
        if rng.random() < task.error_prob:
            result = (true + rng.randint(1, 9)) % 10
        step = f"{value} {op} = "
        n_checks = checks()
        if n_checks and rng.random() < task.detour_prob:
            wrong = (result + rng.randint(1, 9)) % 10
            parts.append(f"wait {step}{wrong} no")
        parts.append(f"{step}{result} ;")
        parts.extend(f"check {step}{result} ok ;" for _ in range(n_checks))
        value = result
    return parts, value


def verbose_trace(question: str, rng: random.Random, task: ToyTask) -> str:
    """The same-hint toy's warm-start response: per step 0-3 checks (``check_probs``) and detours, independently."""
    n = len(task.check_probs)
    parts, value = [], None
    start, *ops = question.split()
    value = int(start)
    for op in ops:
        true = (value + int(op)) % 10
        result = true
        if rng.random() < task.error_prob:
            result = (true + rng.randint(1, 9)) % 10
        step = f"{value} {op} = "
        if rng.random() < task.detour_prob:
            wrong = (result + rng.randint(1, 9)) % 10
            parts.append(f"wait {step}{wrong} no")
        parts.append(f"{step}{result} ;")
        n_checks = rng.choices(range(n), weights=task.check_probs)[0]
        parts.extend(f"check {step}{result} ok ;" for _ in range(n_checks))
        value = result
    parts.append(f"\\boxed{{ {value} }}")
    return " ".join(parts)


def trace(question: str, rng: random.Random, task: ToyTask, *, hint: str | None = None) -> tuple[str, str]:
    """A warm-start response for ``question`` under the student view (``hint=None``) or the teacher view, and its
    style: "verbose", "concise" or "leak" (answer-aware); "verbose" for every same-hint trace."""
    if task.variant == "same-hint":
        return verbose_trace(question, rng, task), "verbose"
    n_ops = len(question.split()) - 1
    u = rng.random()
    if hint is None:
        style = "concise" if u < task.student_concise_prob else "verbose"
    elif u < task.teacher_concise_prob:
        style = "concise"
    elif u < task.teacher_concise_prob + task.leak_prob and n_ops > 1:
        style = "leak"
    else:
        style = "verbose"
    if style == "verbose":
        weights = task.verbose_check_probs
        parts, value = _steps(question, rng, task, lambda: rng.choices(range(len(weights)), weights=weights)[0])
    elif style == "concise":
        parts, value = _steps(question, rng, task, lambda: 0)
    else:  # leak: a partial concise derivation, then the hint
        parts, _ = _steps(question, rng, task, lambda: 0, n_steps=rng.randint(1, n_ops - 1))
        value = hint
    parts.append(f"\\boxed{{ {value} }}")
    return " ".join(parts), style


def is_leak(question: str, response: str) -> bool:
    """Whether a response boxes an answer without deriving it: it stops writing steps (``a op = r ;``, checks and
    detours aside) before the question's last operation. The toy knows, so the run can report how often cross-view
    validation lets such paths through (``pass_leak``)."""
    ops = question.split()[1:]
    body = response.split("\\boxed{")[0]
    if "\\boxed{" not in response:
        return False
    done = 0
    for chunk in body.split(";"):
        words = chunk.split()
        if len(words) >= 4 and words[0] not in ("check", "wait") and words[2] == "=":
            if done < len(ops) and words[1] == ops[done]:
                done += 1
        elif len(words) >= 5 and words[0] == "wait":  # "wait a op = w no a op = r"
            rest = words[words.index("no") + 1:] if "no" in words else []
            if len(rest) >= 3 and done < len(ops) and rest[1] == ops[done]:
                done += 1
    return done < len(ops)


# --- supervised warm start ------------------------------------------------------------------------------------------


class WarmStartError(RuntimeError):
    """The warm start did not reach ``ToyTask.min_accuracy`` within ``ToyTask.sft_max_steps``."""


RECORD = "warm_start.json"


def _encode_prompt(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def max_trace_tokens(task: ToyTask) -> int:
    """The longest warm-start trace in tokens (EOS included): per operation a detour (6), the step (5) and the most
    checks (7 each); then the boxed answer (3)."""
    return task.max_ops * (6 + 5 + 7 * (len(task.check_probs) - 1)) + 3 + 1


def heldout_accuracy(model, tokenizer, task: ToyTask) -> float:
    """The fraction of ``task.check_questions`` eval-split questions (student view, no hint) whose response, sampled
    at temperature 1 with a seed per question, boxes the right answer."""
    from vpgea.rng import derive_seed
    from vpgea.engines.hf import HFEngine
    from vpgea.grading import extract_answer, is_correct

    questions = make_examples(task.check_questions, seed=task.seed + 3000, task=task, split="eval")
    engine = HFEngine(model, tokenizer, batch_size=256)
    outs = engine.generate([_encode_prompt(tokenizer, q.question) for q in questions],
                           max_new_tokens=max_trace_tokens(task), temperature=1.0,
                           seed=[derive_seed(task.seed, "check", i) for i in range(len(questions))])
    right = sum(is_correct(extract_answer(tokenizer.decode(o.token_ids, skip_special_tokens=True)), q.answer)
                for o, q in zip(outs, questions))
    return right / len(questions)


def _sft(model, tokenizer, task: ToyTask, progress: bool) -> dict:
    """Supervised rounds of ``task.sft_steps`` until the held-out check passes. Returns the record to cache."""
    from tqdm.auto import tqdm

    rng = random.Random(task.seed + 1)
    examples = make_examples(task.sft_examples, seed=task.seed + 1000, task=task, split="train")
    seqs = []
    for ex in examples:
        hint = ex.answer if rng.random() < task.hint_frac else None
        content = ex.question + (f" hint {hint}" if hint is not None else "")
        prompt = _encode_prompt(tokenizer, content)
        response = tokenizer(trace(ex.question, rng, task, hint=hint)[0], add_special_tokens=False)["input_ids"]
        seqs.append((prompt, response + [tokenizer.eos_token_id]))
    matrices = [p for p in model.parameters() if p.dim() >= 2]  # embeddings and projections; not norms
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": task.sft_weight_decay},
                             {"params": others, "weight_decay": 0.0}], lr=task.sft_lr, betas=(0.9, 0.98))
    n, warmup = task.sft_steps, max(1, task.sft_steps // 20)
    gen = torch.Generator().manual_seed(task.seed + 2)
    t0 = time.perf_counter()
    done, history = 0, []
    while True:
        # One round: a fresh warmup + cosine cycle; AdamW's moments and the data stream carry on.
        for group in opt.param_groups:
            group["lr"] = task.sft_lr
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / n))))
        model.train()
        bar = tqdm(range(n), desc=f"warm start, round {done // n + 1} (at most {task.sft_max_steps // n})",
                   file=sys.stderr, dynamic_ncols=True, disable=not progress, leave=False)
        for _ in bar:
            idx = torch.randint(len(seqs), (task.sft_batch_size,), generator=gen).tolist()
            T = max(len(seqs[i][0]) + len(seqs[i][1]) for i in idx)
            ids = torch.full((len(idx), T), tokenizer.pad_token_id)
            labels = torch.full((len(idx), T), -100)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for b, i in enumerate(idx):
                p, r = seqs[i]
                ids[b, : len(p) + len(r)] = torch.tensor(p + r)
                labels[b, len(p) : len(p) + len(r)] = torch.tensor(r)
                mask[b, : len(p) + len(r)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
        bar.close()
        done += n
        model.eval()
        acc = heldout_accuracy(model, tokenizer, task)
        history.append({"steps": done, "accuracy": acc, "loss": loss.item()})
        if progress:
            print(f"warm start: {done} steps, loss {loss.item():.3f}, held-out accuracy {acc:.3f} "
                  f"(needs {task.min_accuracy}) [{time.perf_counter() - t0:.0f}s]", file=sys.stderr, flush=True)
        if acc >= task.min_accuracy:
            break
        if done + n > task.sft_max_steps:
            raise WarmStartError(
                f"the toy warm start reached held-out accuracy {acc:.3f} after {done} steps, below the required "
                f"{task.min_accuracy} (chance is about 0.1), and another round of {n} steps would pass the bound "
                f"of {task.sft_max_steps} (--toy-sft-max-steps); raise the bound, or lower --toy-min-accuracy "
                f"to accept this model (history: {history})"
            )
    import transformers

    return {"accuracy": acc, "steps": done, "min_accuracy": task.min_accuracy,
            "check_questions": task.check_questions, "history": history,
            "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
            "transformers": transformers.__version__, "task": asdict(task)}


def default_cache_dir() -> Path:
    """``$VPGEA_CACHE``, else ``~/.cache/vpgea``."""
    return Path(os.environ.get("VPGEA_CACHE", Path.home() / ".cache" / "vpgea"))


def read_record(model_dir: str | os.PathLike) -> dict | None:
    """The cached warm start's record (accuracy reached, steps, versions), or None when there is none."""
    path = Path(model_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def warm_start(task: ToyTask | None = None, *, cache_dir: str | os.PathLike | None = None, log=print):
    """The warm-started tiny model and its tokenizer, trained once and cached under ``cache_dir/toy-<hash>``.

    Training runs in rounds of ``task.sft_steps`` until the held-out accuracy reaches ``task.min_accuracy``, within
    ``task.sft_max_steps`` (else :class:`WarmStartError`); the entry's ``warm_start.json`` records the accuracy
    reached. ``log``: a callable for progress lines (and a progress bar), or None for silence.
    Returns ``(model_dir, model, tokenizer)``; ``model_dir`` holds a Hugging Face checkpoint with the tokenizer.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    task = task or ToyTask()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_dir = root / f"toy-{task.key()}"
    record = read_record(model_dir)
    if record is not None and (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file():
        if log is not None:
            log(f"warm start: cached at {model_dir} (held-out accuracy {record['accuracy']:.3f} after "
                f"{record['steps']} steps)")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
        return model_dir, AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tokenizer
    if log is not None:
        log(f"warm start: training the toy model (cached afterwards in {model_dir}; set VPGEA_CACHE to move it)")
    tokenizer = build_tokenizer()
    model = build_model(task, tokenizer)
    record = _sft(model, tokenizer, task, progress=log is not None)
    # Atomic publish: a crash mid-save never leaves a half-written cache entry behind.
    tmp = root / f".tmp-{model_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / RECORD).write_text(json.dumps(record, indent=1))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
    if log is not None:
        log(f"warm start: held-out accuracy {record['accuracy']:.3f} after {record['steps']} steps; cached at "
            f"{model_dir}")
    return model_dir, model, tokenizer

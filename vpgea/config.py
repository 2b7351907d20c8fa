"""Training configuration: one dataclass, named presets (functions returning a config) and CLI overrides.

Every field's docstring is its ``--help`` text (read from this file's source), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import os
import typing
from dataclasses import dataclass

__all__ = ["PRESETS", "TrainConfig", "check_resume", "parse_args", "preset_r1_distill_1p5b", "preset_r1_distill_7b",
           "preset_toy", "saved_config"]

MODES = ("vpgea", "grpo-lp")
NORMALIZE = ("sum", "token", "global-token")


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    # --- run ---
    mode: str = "vpgea"
    """Trainer: "vpgea" (dual-stream VPG-EA) or "grpo-lp" (GRPO on the student view, length-penalised reward)."""
    model: str | None = None
    """Local Hugging Face model directory (weights + tokenizer). None: the self-contained toy run."""
    train_data: str | None = None
    """Training JSONL (GSM8K question/answer '#### n', MATH problem/answer, or see --question-field). None: toy task."""
    question_field: str | None = None
    """JSONL field holding the question (default: auto-detect)."""
    answer_field: str | None = None
    """JSONL field holding the reference answer (default: auto-detect)."""
    eval_data: str | None = None
    """JSONL evaluated before and after training (real runs; the toy run evaluates its own held-out split)."""
    eval_limit: int | None = 200
    """Evaluate at most this many problems (None: all)."""
    eval_samples: int = 1
    """Samples per evaluation problem (ACC and A.Tok are averaged over them)."""
    eval_temperature: float = 0.0
    """Sampling temperature for evaluation (0: greedy)."""
    output_dir: str = "runs/default"
    """Where metrics.jsonl, summary.json and checkpoint-<step>/ go."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    engine: str = "hf"
    """Rollout engine: "hf" (transformers, everywhere) or "vllm" (needs the vllm extra)."""
    vllm_gpu_memory_utilization: float = 0.3
    """--engine vllm: fraction of the GPU vLLM may take while awake (weights + KV cache); it sleeps while training."""
    baseline: bool = True
    """Toy run only: after VPG-EA, also train grpo-lp from the same warm start on the same budget and compare."""
    resume: str | None = None
    """Checkpoint directory (checkpoint-<step>/) to continue from, with the same data order and RNG state. Settings
    that change what is trained (mode, model, data, seed, group sizes, questions per step, evaluation samples and
    limit, learning rate, ...) must equal the checkpoint's; the run refuses and names each difference."""
    allow_config_change: bool = False
    """--resume: also accept changes that leave the trained rollouts and losses alone: --max-steps, logging and
    checkpointing (--log-every, --save-every, --keep-last), the device, engine, attention and log-prob backends,
    batching and memory settings. (--max-steps moves the cosine schedule's end; the steps done stay as they were.)"""

    # --- algorithm ---
    max_steps: int = 200
    """Optimizer steps."""
    questions_per_step: int = 16
    """Questions per step."""
    group_size: int = 8
    """G: posterior (teacher-view) paths per question; in grpo-lp, the group has G + K student-view paths."""
    prior_samples: int = 4
    """K: prior (student-view) paths per question, for L_base and the cross-view baseline mean U_prior."""
    alpha: float = 0.5
    """Efficiency exponent: eta = (L_base / L)^alpha; 0 disables efficiency."""
    beta: float = 1.0
    """Weight of the gated distillation term (student view learns from positive-advantage posterior paths); 0 disables."""
    cross_view: bool = True
    """Cross-view validation R = max(0, U - mean U_prior); --no-cross-view uses rule-checked correctness instead."""
    normalize: str = "sum"
    """Sequence log-likelihood normalisation in the loss: "sum", "token" or "global-token"."""
    loss_on_tail: bool = True
    """Train on z + answer tail (the ELBO's log P(y*, z | x)); --no-loss-on-tail trains on z only."""
    length_penalty: float = 1.0
    """grpo-lp: weight of the group-relative length penalty added to correctness."""

    # --- prompts ---
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    """Instruction appended to each question (both views)."""
    student_template: str = "{question}\n{instruction}"
    """User message of the student view S(x). Fields: {question}, {instruction}."""
    teacher_template: str = (
        "{question}\n{instruction}\nThe reference answer is {answer}. Explain the most direct reasoning that reaches it."
    )
    """User message of the teacher view T(x, y*). Fields: {question}, {instruction}, {answer}."""
    answer_tail: str = "\\boxed{{{answer}}}"
    """Answer tail a(y*) appended after a path (format string with {answer}); the stop token follows it."""
    answer_marker: str = "\\boxed{"
    """A response's path z ends before the last occurrence of this text."""

    # --- sampling ---
    max_new_tokens: int = 1024
    """Longest response (training rollouts and evaluation)."""
    max_prompt_tokens: int = 1024
    """Prompts longer than this are skipped and counted (never truncated)."""
    temperature: float = 1.0
    """Rollout sampling temperature."""
    top_p: float = 1.0
    """Rollout nucleus sampling."""
    rollout_batch_size: int = 256
    """Prompts decoded together by the hf engine."""

    # --- optimisation ---
    lr: float = 1e-6
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    warmup_steps: int = 10
    """Linear warmup steps, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of --lr."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    max_tokens_per_micro_batch: int = 16384
    """Token budget of a packed training micro-batch."""
    gradient_checkpointing: bool = False
    """Recompute decoder layers in the backward."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    attn_impl: str = "auto"
    """Packed attention backend (see vpgea.attention)."""
    logprob_impl: str = "auto"
    """token_logprobs / loss implementation: "auto", "triton", "torch"."""

    # --- output ---
    save_every: int = 50
    """Checkpoint every N steps (and at the end, and on SIGINT/SIGTERM)."""
    keep_last: int = 1
    """Checkpoints kept."""
    log_every: int = 1
    """Print a log line every N steps (metrics.jsonl gets every step)."""

    # --- toy run ---
    toy_train_size: int = 2000
    """Toy run: training questions generated."""
    toy_sft_steps: int = 1200
    """Toy run: warm-start SFT steps per round (the warm start is cached by the task's settings, under $VPGEA_CACHE
    or ~/.cache/vpgea)."""
    toy_sft_max_steps: int = 4800
    """Toy run: bound on warm-start steps; rounds continue until the held-out accuracy check passes, else an error."""
    toy_min_accuracy: float = 0.5
    """Toy run: held-out accuracy (sampled at temperature 1) the warm start must reach; 0 accepts any model."""

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"config: {msg}")

        for f in dataclasses.fields(self):  # no NaN or inf anywhere: they pass every comparison below unnoticed
            v = getattr(self, f.name)
            for x in v if isinstance(v, tuple) else (v,):
                need(not isinstance(x, float) or math.isfinite(x), f"{f.name} must be a finite number, got {v}")
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.engine in ("hf", "vllm"), f"engine must be 'hf' or 'vllm', got {self.engine!r}")
        need(self.normalize in NORMALIZE, f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        need(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        for name in ("questions_per_step", "group_size", "prior_samples", "max_new_tokens", "max_prompt_tokens",
                     "eval_samples", "save_every", "keep_last", "log_every", "rollout_batch_size",
                     "max_tokens_per_micro_batch"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.temperature > 0, f"temperature must be > 0 for training rollouts, got {self.temperature}")
        need(self.eval_temperature >= 0, f"eval_temperature must be >= 0 (0: greedy), got {self.eval_temperature}")
        need(self.eval_limit is None or self.eval_limit >= 1, f"eval_limit must be >= 1, got {self.eval_limit}")
        need(self.toy_train_size >= 1 and self.toy_sft_steps >= 1, "toy_train_size and toy_sft_steps must be >= 1")
        need(self.toy_sft_steps <= self.toy_sft_max_steps,
             f"toy_sft_max_steps ({self.toy_sft_max_steps}) must be >= toy_sft_steps ({self.toy_sft_steps})")
        need(0 <= self.toy_min_accuracy <= 1, f"toy_min_accuracy must be in [0, 1], got {self.toy_min_accuracy}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 < self.vllm_gpu_memory_utilization <= 1,
             f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup_steps >= 0 and self.grad_clip >= 0, "warmup_steps and grad_clip must be >= 0")
        need(bool(self.answer_marker), "answer_marker must not be empty")
        _check_device(self.device)
        _check_templates(self)
        need((self.model is None) == (self.train_data is None) or self.model is not None,
             "--train-data needs --model (the toy run generates its own data)")

    @property
    def is_toy(self) -> bool:
        return self.model is None

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not what was meant."""
        out = []
        if self.eval_samples > 1 and self.eval_temperature == 0:
            out.append(f"--eval-samples {self.eval_samples} at --eval-temperature 0: greedy decoding repeats the same "
                       "response, so every sample is the same")
        return out


# Sentinel values for the template check: a template must format with them and show each where it belongs.
_PROBE = {"question": "‹question›", "instruction": "‹instruction›", "answer": "‹answer›"}


def _format_probe(name: str, template: str, fields: tuple[str, ...], must_show: tuple[str, ...]) -> str:
    """``template`` formatted with the probe values of ``fields``; a ValueError names the template and the problem
    when it uses another field, is malformed, or does not show each of ``must_show`` verbatim (``{{answer}}``
    is the literal text "{answer}", and ``{answer:.1}`` cuts the answer)."""
    allowed = ", ".join("{" + f + "}" for f in fields)
    try:
        text = template.format(**{f: _PROBE[f] for f in fields})
    except KeyError as e:
        raise ValueError(f"config: {name} {template!r} uses the unknown field {{{e.args[0]}}}; its fields are "
                         f"{allowed}") from None
    except (IndexError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"config: {name} {template!r} is not a valid format string ({e}); its fields are {allowed}, "
                         "and a literal brace is written twice ({{ or }})") from None
    for f in must_show:
        if _PROBE[f] not in text:
            raise ValueError(f"config: {name} {template!r} does not put the {f} into the text: it formats to "
                             f"{text!r}; write {{{f}}} where the {f} goes, with no format spec")
    return text


def _check_templates(cfg: TrainConfig) -> None:
    _format_probe("student_template", cfg.student_template, ("question", "instruction"), ("question",))
    _format_probe("teacher_template", cfg.teacher_template, ("question", "instruction", "answer"),
                  ("question", "answer"))
    tail = _format_probe("answer_tail", cfg.answer_tail, ("answer",), ("answer",))
    if cfg.answer_marker not in tail[: tail.index(_PROBE["answer"])]:
        raise ValueError(f"config: answer_tail {cfg.answer_tail!r} must contain answer_marker {cfg.answer_marker!r} "
                         "before the answer: a sampled path z ends where the marker starts, and the tail follows z "
                         "in training")


def _check_device(device: str) -> None:
    if device == "auto":
        return
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"config: device must be 'auto', 'cpu', 'cuda', 'cuda:<index>' or another torch device, got "
                         f"{device!r}") from None


# --- resuming ------------------------------------------------------------------------------------------------------

# Never compared: where the output goes and the resume flags themselves.
RESUME_IGNORED = frozenset({"output_dir", "resume", "allow_config_change"})
# Accepted with --allow-config-change: they leave the data order, the rollouts' seeds and the losses alone (up to
# floating-point differences of another device, backend or packing); --max-steps moves the schedule's end.
RESUME_HARMLESS = frozenset({
    "max_steps", "log_every", "save_every", "keep_last", "baseline", "device", "engine", "vllm_gpu_memory_utilization",
    "rollout_batch_size", "max_tokens_per_micro_batch", "gradient_checkpointing", "bf16", "attn_impl", "logprob_impl",
})
_PATHS = ("model", "train_data", "eval_data")


def saved_config(cfg: TrainConfig) -> dict:
    """The settings a checkpoint records: ``dataclasses.asdict`` with the input paths made absolute, so a resume
    from another working directory compares the same files."""
    d = dataclasses.asdict(cfg)
    for k in _PATHS:
        if d[k] is not None:
            d[k] = os.path.abspath(d[k])
    return d


def check_resume(cfg: TrainConfig, saved: dict) -> list[str]:
    """Compare a checkpoint's settings (``saved``, from :func:`saved_config`) with ``cfg``. Raises ValueError naming
    every difference that would change what is trained, and the harmless ones too unless ``cfg.allow_config_change``;
    returns the accepted harmless differences, described, for a log line."""
    from vpgea.rundir import config_differences, describe_differences

    old = {k: os.path.abspath(v) if k in _PATHS and isinstance(v, str) else v for k, v in saved.items()}
    changes, harmless = config_differences(old, saved_config(cfg), harmless=set(RESUME_HARMLESS),
                                           ignored=set(RESUME_IGNORED))
    if changes:
        raise ValueError(f"--resume: the checkpoint was trained with other settings, and resuming would not continue "
                         f"that run: {describe_differences(changes)}. Use the checkpoint's settings (its "
                         "trainer_state.pt records them), or start a new run without --resume")
    if harmless and not cfg.allow_config_change:
        raise ValueError(f"--resume: settings differ from the checkpoint's: {describe_differences(harmless)}. They "
                         "do not change what is trained; pass --allow-config-change to accept them")
    return [describe_differences([d]) for d in harmless]


# --- presets --------------------------------------------------------------------------------------------------------


def preset_toy(**overrides) -> TrainConfig:
    """The self-contained CPU default run (tiny model and tokenizer built in code, synthetic task)."""
    base = dict(
        max_steps=60,
        questions_per_step=8,
        group_size=8,
        prior_samples=4,
        # The same for both methods. At 1e-3 VPG-EA and grpo-lp both collapse within ~10 steps (accuracy to ~0);
        # at 3e-5 neither moves far in 60 steps; 1e-4 is stable for both.
        lr=1e-4,
        warmup_steps=5,
        max_new_tokens=96,
        max_prompt_tokens=32,
        eval_limit=300,
        # Sampled at the training temperature: greedy decoding would take the mode of every step of the warm-start
        # traces (the true result; their 8% step errors are noise around it) and score ~99%, hiding any accuracy
        # change. Sampling measures the policy RL trains, as the paper does (ACC over n samples).
        eval_temperature=1.0,
        eval_samples=2,
        instruction="",
        student_template="{question}",
        teacher_template="{question} hint {answer}",
        answer_tail="\\boxed{{ {answer} }}",
        save_every=1000,
        output_dir="runs/toy",
    )
    base.update(overrides)
    return TrainConfig(**base)


def preset_r1_distill_1p5b(**overrides) -> TrainConfig:
    """DeepSeek-R1-Distill-Qwen-1.5B on a math training set, one GPU (the paper's small setup, our hyperparameters)."""
    base = dict(
        max_steps=500, questions_per_step=32, group_size=8, prior_samples=4, lr=1e-6, warmup_steps=10,
        max_new_tokens=8192, max_prompt_tokens=1024, temperature=1.0, gradient_checkpointing=True,
        max_tokens_per_micro_batch=32768, eval_temperature=0.6, eval_samples=4, save_every=50,
        output_dir="runs/r1-1.5b", engine="vllm",
    )
    base.update(overrides)
    return TrainConfig(**base)


def preset_r1_distill_7b(**overrides) -> TrainConfig:
    """DeepSeek-R1-Distill-Qwen-7B (the paper's large setup; FSDP2 over several GPUs, vLLM rollouts)."""
    base = dict(
        max_steps=500, questions_per_step=32, group_size=8, prior_samples=4, lr=5e-7, warmup_steps=10,
        max_new_tokens=8192, max_prompt_tokens=1024, temperature=1.0, gradient_checkpointing=True,
        max_tokens_per_micro_batch=16384, eval_temperature=0.6, eval_samples=4, save_every=25,
        output_dir="runs/r1-7b", engine="vllm",
    )
    base.update(overrides)
    return TrainConfig(**base)


PRESETS = {"toy": preset_toy, "r1-1.5b": preset_r1_distill_1p5b, "r1-7b": preset_r1_distill_7b}


# --- command line ---------------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls=TrainConfig) -> dict[str, str]:
    """Attribute docstrings (the string literal right after each field) from the class source."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vpgea.train",
        description="VPG-EA trainer. With no arguments: the self-contained toy run on CPU (warm start, evaluation, "
        "VPG-EA training, the grpo-lp baseline on the same budget, summary.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="Named setup to start from (default: toy without --model, else plain defaults); "
                   "later flags override it.")
    docs = field_docs()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = docs.get(f.name, "")
        if kind is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is tuple:
            p.add_argument(flag, dest=f.name, type=args[0] if args else float, nargs=len(args) or 2,
                           default=None, metavar="X", help=help_text)
            continue
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        p.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig: the preset (explicit, or toy when no --model is given), then the flags."""
    ns = vars(_parser().parse_args(argv))
    preset = ns.pop("preset")
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ns.items() if v is not None}
    if preset is None:
        preset = "toy" if overrides.get("model") is None else None
    if preset is None:
        return TrainConfig(**overrides)
    return PRESETS[preset](**overrides)

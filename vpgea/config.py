"""Training configuration: one dataclass, named presets (functions returning a config), config files and CLI overrides.

Every field's docstring is its ``--help`` text (read from this file's source), so the two cannot drift apart; the help
shows each field's real default (and the presets' values where they differ).

Where a value comes from, last wins: the dataclass default, the preset (``--preset``, or a ``preset:`` key in the
config file, or ``toy`` when no model is given), the config file (``--config FILE``, YAML or JSON, keys are field
names), the command-line flags. The resolved config is written to ``<output_dir>/config.json`` when a run starts
(:func:`save_config`), and ``--config <output_dir>/config.json`` reproduces it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PRESETS",
    "TrainConfig",
    "check_resume",
    "config_dict",
    "load_config_file",
    "parse_args",
    "preset_r1_distill_1p5b",
    "preset_r1_distill_7b",
    "preset_toy",
    "save_config",
    "saved_config",
]

MODES = ("vpgea", "grpo-lp", "thinkprune", "l1-exact", "l1-max", "rft-shortest", "ibpo", "no-cross-view", "beta-0",
         "alpha-0")
NORMALIZE = ("sum", "token", "global-token")
REPORT_TO = ("none", "tensorboard", "wandb")
CONFIG_FILE = "config.json"  # the resolved config, in the output directory


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    # --- run ---
    mode: str = "vpgea"
    """Method: "vpgea" (dual-stream VPG-EA), its ablations "no-cross-view", "beta-0", "alpha-0", or a baseline on the
    student view: "grpo-lp" (length-penalised reward), "thinkprune" (length-clipped), "l1-exact" / "l1-max" (LCPO),
    "rft-shortest" (SFT on the shortest correct sample), "ibpo" (budget-constrained selection). --modes runs several."""
    model: str | None = None
    """Local Hugging Face model directory (weights + tokenizer). None: the self-contained toy run."""
    train_data: str | None = None
    """Training data: a .jsonl, .json or .parquet file or a saved Hugging Face dataset directory (GSM8K
    question/answer '#### n', MATH problem/answer, verl prompt/reward_model.ground_truth, or see --question-field).
    None: toy task."""
    question_field: str | None = None
    """Field holding the question, a string or a list of chat messages; dotted for nested fields
    (extra_info.question). None: the first of problem, question, prompt in the first record."""
    answer_field: str | None = None
    """Field holding the reference answer, a string or a number; dotted for nested fields. None: the first of answer,
    reward_model.ground_truth in the first record."""
    eval_data: str | None = None
    """Data evaluated before and after training, in any --train-data format (real runs; the toy run evaluates its own
    held-out split)."""
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
    modes: str | None = None
    """Comma-separated modes trained from the same start on the same budget, each evaluated, one summary.json entry
    each (e.g. "vpgea,grpo-lp,thinkprune,l1-max,rft-shortest,ibpo,no-cross-view"). Default: the toy run trains
    --mode and, with --baseline, grpo-lp; a real run trains --mode alone."""
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
    report_to: tuple[str, ...] = ()
    """Where the metrics.jsonl scalars also go, from rank 0: "none", "tensorboard" (<output_dir>/tensorboard), "wandb"
    (project $WANDB_PROJECT, default vpgea; WANDB_MODE=offline works without network); several allowed."""
    run_name: str | None = None
    """Run name for --report-to trackers (None: the output directory's name)."""
    reward: str = "vpgea.rewards:math_correct"
    """Correctness check, "module:function" or "path/to/file.py:function", called as fn(response, answer) or
    fn(response, answer, record=row) and returning True/False: the correctness of rollouts (every baseline's reward
    or selection, R in no-cross-view, accuracy) and of evaluation responses. vpgea.rewards:math_correct is
    math-verify on the last \\boxed{}."""

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
    loss_route: str = "sweep"
    """Training pass: "sweep" produces the head and hidden gradients while the log-probs are computed (3 GEMMs over
    the vocabulary), "two-pass" computes log-probs and recomputes the logits in the backward (4)."""
    u_tokens: str = "answer"
    """U(z): "answer" scores the reference answer's tokens given the path and the final-answer marker (the paper's
    log P(y* | x, z)); "tail" scores the whole answer tail, marker and stop token included."""
    loss_on_tail: bool = True
    """Train on z + answer tail (the ELBO's log P(y*, z | x)); --no-loss-on-tail trains on z only."""
    length_penalty: float = 1.0
    """grpo-lp: weight of the group-relative length penalty added to correctness."""
    length_schedule: str = "0:4096,200:3072,400:2048"
    """thinkprune: token limits by step, "step:limit,..." (the first at step 0); rollouts are cut at the limit."""
    l1_range: tuple[int, int] = (100, 4000)
    """l1-exact / l1-max: the length target N of each question is drawn uniformly from this range (tokens)."""
    l1_prompt: str = "Think for {target} tokens."
    """l1-*: line appended to the student message, with {target}."""
    l1_a: float = 3e-4
    """l1-*: the length penalty's slope a (published default)."""
    l1_delta: float = 0.5
    """l1-max: the offset delta (published default)."""
    l1_eval_target: int | None = None
    """l1-*: the length target the trained model is evaluated with (default: the middle of --l1-range)."""
    ibpo_budget: float = 0.25
    """ibpo: the largest share of reinforced responses that may come from the extended length group."""
    ibpo_threshold: int | None = None
    """ibpo: responses longer than this many tokens are extended (default: the batch's median length)."""

    # --- prompts ---
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    """Instruction appended to each question (both views)."""
    student_template: str = "{question}\n{instruction}"
    """User message of the student view S(x). Fields: {question}, {instruction}. A chat-message question: {question}
    is its last user message's content; the messages before it (system prompt, earlier turns) come first, as given."""
    teacher_template: str = (
        "{question}\n{instruction}\nThe reference answer is {answer}. Explain the most direct reasoning that reaches it."
    )
    """User message of the teacher view T(x, y*). Fields: {question}, {instruction}, {answer} (chat messages: as for
    --student-template)."""
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
    toy_variant: str = "answer-aware"
    """Toy run: "answer-aware" (the teacher view reasons more concisely and sometimes leaks the hint: VPG-EA's
    premise) or "same-hint" (hinted traces as the student's: the earlier toy, for comparison). See vpgea.toy."""

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
        for m in self.mode_list():
            need(m in MODES, f"modes: {m!r} is not a mode; one of {MODES}")
        need(self.toy_variant in ("answer-aware", "same-hint"),
             f"toy_variant must be 'answer-aware' or 'same-hint', got {self.toy_variant!r}")
        need(self.u_tokens in ("answer", "tail"), f"u_tokens must be 'answer' or 'tail', got {self.u_tokens!r}")
        need(self.loss_route in ("sweep", "two-pass"), f"loss_route must be 'sweep' or 'two-pass', got "
             f"{self.loss_route!r}")
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
        # --report-to: a string (a config file's `report_to: wandb`) is one tracker; "none" alone means no tracker.
        report = (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
        bad = [r for r in report if r not in REPORT_TO]
        need(not bad, f"report_to must be among {REPORT_TO}, got {bad[0] if bad else ''!r}")
        need("none" not in report or len(set(report)) == 1,
             f"report_to 'none' cannot be combined with others: {report}")
        self.report_to = tuple(dict.fromkeys(r for r in report if r != "none"))
        need(isinstance(self.reward, str) and ":" in self.reward,
             f"reward must be 'module:function' or 'path/to/file.py:function', got {self.reward!r}")

    def mode_list(self) -> list[str]:
        """The modes this run trains, in order (see ``modes``)."""
        if self.modes:
            return list(dict.fromkeys(m.strip() for m in self.modes.split(",") if m.strip()))
        return [self.mode] + (["grpo-lp"] if self.is_toy and self.baseline and self.mode == "vpgea" else [])

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
        # the baselines at the toy's scale (its traces run to ~50 tokens, at most 96)
        length_schedule="0:96,20:64,40:48",
        l1_range=(16, 96),
        l1_prompt="budget {target}",
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


def _show(value) -> str:
    """A default as the user would type it."""
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) or "none"
    if isinstance(value, str):  # as typed in single quotes: one backslash, a newline as \n
        return "'" + value.replace("\n", "\\n") + "'"
    return str(value)


@functools.cache
def _defaults_help() -> dict[str, str]:
    """``(default: X; presets: toy Y, ...)`` per field: the dataclass default and each preset that changes it."""
    base = TrainConfig()
    presets = {name: fn() for name, fn in PRESETS.items()}
    out = {}
    for f in dataclasses.fields(TrainConfig):
        text = f"default: {_show(getattr(base, f.name))}"
        diff = [f"{name} {_show(getattr(c, f.name))}" for name, c in presets.items()
                if getattr(c, f.name) != getattr(base, f.name)]
        if diff:
            text += "; presets: " + ", ".join(diff)
        out[f.name] = f"({text})"
    return out


_CHOICES = {"mode": MODES, "engine": ("hf", "vllm"), "normalize": NORMALIZE, "report_to": REPORT_TO,
            "loss_route": ("sweep", "two-pass"), "u_tokens": ("answer", "tail")}


def _flag_kind(name: str):
    """(base type, nargs) of a field's flag: bool, a scalar, a fixed tuple (nargs=n) or a variadic tuple ("+")."""
    kind = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(kind)
    if kind is bool:
        return bool, None
    if typing.get_origin(kind) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], "+"
        return (args[0] if args else float), (len(args) or 2)
    return (next((a for a in args if a is not type(None)), kind) if args else kind), None


def _parser() -> argparse.ArgumentParser:
    # Every flag defaults to SUPPRESS, so the namespace holds exactly the flags given: they override the preset and
    # the config file. The real defaults are written into the help text (argparse would show None).
    p = argparse.ArgumentParser(
        prog="python -m vpgea.train",
        description="VPG-EA trainer. With no arguments: the self-contained toy run on CPU (warm start, evaluation, "
        "VPG-EA training, the grpo-lp baseline on the same budget, summary.json). Values, last wins: defaults, "
        "--preset (toy when no --model), --config FILE, flags.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML (.yaml/.yml) or JSON (.json) file of settings, keyed by field name (group_size or "
                   "group-size; 'preset' allowed); flags override it. A run's output_dir/config.json is one.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="Named setup to start from (default: toy without --model, else plain defaults); "
                   "the config file and flags override it.")
    docs = field_docs()
    defaults = _defaults_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base, nargs = _flag_kind(f.name)
        help_text = f"{docs.get(f.name, '')} {defaults[f.name]}".replace("%", "%%")
        if base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif nargs is None:
            p.add_argument(flag, dest=f.name, type=base, choices=_CHOICES.get(f.name), help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=base, nargs=nargs, choices=_CHOICES.get(f.name),
                           metavar=None if f.name in _CHOICES else "X", help=help_text)
    return p


# --- config files ---------------------------------------------------------------------------------------------------


def _coerce(kind, value, where: str):
    """``value`` from a config file as a value of the field type ``kind``; ValueError naming ``where`` otherwise.
    Nothing is stringified: a string field needs a string. A float field also takes a numeric string, because YAML
    1.1 reads ``1e-6`` (no dot) as one."""

    def bad(expected: str):
        return ValueError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")

    args = typing.get_args(kind)
    if args and type(None) in args and typing.get_origin(kind) is not tuple:  # X | None
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: one item, a list, or null for none
            items = [value] if isinstance(value, str) else [] if value is None else value
            if not isinstance(items, (list, tuple)):
                raise bad(f"a {args[0].__name__} or a list of them")
            return tuple(_coerce(args[0], v, where) for v in items)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad(f"a list of {len(args)} numbers")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad("a number") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        else:
            number = float(value)
        if not math.isfinite(number):  # YAML's .nan / .inf: no setting means anything by them
            raise bad("a finite number")
        return number
    if kind is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"{where}: unsupported field type {kind}")  # pragma: no cover - a new field type


def load_config_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON config file as ``{field name: value}`` (plus ``"preset"`` if it names one).

    Keys are TrainConfig field names, with ``_`` or ``-`` (``group_size`` or ``group-size``); values have the field's
    type (a list for ``adam_betas``; a string or a list for ``report_to``). Raises FileNotFoundError for a missing file
    and ValueError naming the file (and the line for a syntax error, the key for a bad entry) otherwise.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: file not found")
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--config {path}: expected a .yaml, .yml or .json file, got {p.suffix or 'no suffix'!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings (key: value), got {type(data).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    out: dict = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in out:
            raise ValueError(f"{path}: {key!r} is given twice (as {name!r} and {name.replace('_', '-')!r})")
        if name == "preset":
            if value not in PRESETS:
                raise ValueError(f"{path}: preset: expected one of {sorted(PRESETS)}, got {value!r}")
            out[name] = value
            continue
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints) + ["preset"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown setting {key!r}{hint}; `python -m vpgea.train --help` lists them")
        out[name] = _coerce(hints[name], value, f"{path}: {key}")
    return out


def config_dict(cfg: TrainConfig) -> dict:
    """The resolved config as JSON-ready plain data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: TrainConfig, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``output_dir/config.json`` (atomically); ``--config`` reads it back to the same
    config. Returns the path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    tmp = out / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(config_dict(cfg), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig: the preset (explicit, from the config file, or toy when no model is given), then
    the config file's values, then the flags. Raises FileNotFoundError / ValueError for a bad config file or value."""
    ns = vars(_parser().parse_args(argv))
    config_file = ns.pop("config", None)
    preset = ns.pop("preset", None)
    values = load_config_file(config_file) if config_file is not None else {}
    preset = preset or values.pop("preset", None)
    values.pop("preset", None)
    values.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in ns.items()})
    if preset is None and values.get("model") is None:
        preset = "toy"
    try:
        return PRESETS[preset](**values) if preset is not None else TrainConfig(**values)
    except ValueError as e:
        if config_file is None:
            raise
        raise ValueError(f"{e} (settings from --config {config_file} and the command line)") from None

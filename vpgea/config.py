"""Training configuration: one dataclass, named presets (functions returning a config) and CLI overrides.

Every field's docstring is its ``--help`` text (read from this file's source), so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass

__all__ = ["PRESETS", "TrainConfig", "parse_args", "preset_r1_distill_1p5b", "preset_r1_distill_7b", "preset_toy"]

MODES = ("vpgea", "grpo-lp", "thinkprune", "l1-exact", "l1-max", "rft-shortest", "ibpo", "no-cross-view", "beta-0",
         "alpha-0")
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
    """Checkpoint directory (checkpoint-<step>/) to continue from, with the same data order and RNG state."""

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
    ibpo_budget: float = 0.25
    """ibpo: the largest share of reinforced responses that may come from the extended length group."""
    ibpo_threshold: int | None = None
    """ibpo: responses longer than this many tokens are extended (default: the batch's median length)."""

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
    """Toy run: warm-start SFT steps (cached by the task's settings)."""

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"config: {msg}")

        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(self.engine in ("hf", "vllm"), f"engine must be 'hf' or 'vllm', got {self.engine!r}")
        need(self.normalize in NORMALIZE, f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
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
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(0 < self.vllm_gpu_memory_utilization <= 1,
             f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup_steps >= 0 and self.grad_clip >= 0, "warmup_steps and grad_clip must be >= 0")
        need("{answer}" in self.teacher_template, "teacher_template must contain {answer}")
        need("{question}" in self.student_template, "student_template must contain {question}")
        need("{answer}" in self.answer_tail, "answer_tail must contain {answer}")
        need(bool(self.answer_marker), "answer_marker must not be empty")
        need((self.model is None) == (self.train_data is None) or self.model is not None,
             "--train-data needs --model (the toy run generates its own data)")

    @property
    def is_toy(self) -> bool:
        return self.model is None


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

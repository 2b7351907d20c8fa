"""Training methods: how one question's rollouts become loss weights and a stats record.

Every method here is on-policy with one update per batch, so its loss is linear in the per-token log-probs once its
advantages are known: ``L = sum_seq (w_c[seq] * sum_{completion tokens} log p + w_a[seq] * sum_{answer tokens} log p)``
plus terms without gradient. A method says

- which samples to draw per question (``draws``: views and counts),
- which sequences the no-grad scoring pass must score (``score_sequences``, e.g. VPG-EA's prior paths for ``U``),
- its training sequences (``train_sequences``) and which of them it needs ``U`` of before it can weigh them
  (``u_sequences``: read from the training forward itself when the question's sequences share a micro-batch),
- the weights (``weights``), and, from the log-likelihood sums of the training pass, the loss value and the
  question's statistics (``finish``).

The step (``vpgea.step``) packs the sequences of many questions, runs the model and
``vpgea.losses.linear_logprob_loss`` with these weights, and sums the records (``StepStats``) over questions and
ranks. The arithmetic of each method lives in ``vpgea.algorithm`` as plain tensor functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from vpgea import algorithm as alg

__all__ = ["Draw", "Group", "Method", "Sample", "Seq", "StepStats", "Weights", "make_method"]


@dataclass
class Sample:
    """One sampled response."""

    ids: list[int]  # generated tokens, the stop token included
    path: list[int]  # z: the response before its last final-answer marker
    correct: bool  # its own answer, checked against the reference


@dataclass
class Group:
    """One question of the step with its rollouts and what scoring adds to them."""

    index: int  # the question's position in the step's global batch (names its rollouts' seeds)
    item: object  # vpgea.train.Item: token ids of both views and of the answer tail
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # by draw tag
    u_prior: torch.Tensor | None = None  # [K] U of the prior paths (VPG-EA)
    u_post: torch.Tensor | None = None  # [G] U of the posterior paths (VPG-EA)


@dataclass(frozen=True)
class Draw:
    """Samples to draw for every question: ``count`` responses to the ``view`` prompt, named ``tag`` (the tag also
    names their seeds: ``derive_seed(seed, step, question, tag, k)``)."""

    tag: str
    view: str  # "student" or "teacher"
    count: int


@dataclass(frozen=True)
class Seq:
    """A sequence to run through the model: ``prompt ⊕ completion ⊕ answer``; completion and answer tokens are
    scored (their log-probs), the prompt is context."""

    prompt: list[int]
    completion: list[int]
    answer: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion) + len(self.answer)


@dataclass
class Weights:
    """Loss weights of one question's training sequences (``[n]`` float32 each): ``completion[s]`` multiplies every
    completion-token log-prob of sequence ``s``, ``answer[s]`` every answer-token log-prob."""

    completion: torch.Tensor
    answer: torch.Tensor
    data: dict = field(default_factory=dict)  # what ``finish`` needs (advantages, normalisers, ...)

    def any(self) -> bool:
        return bool((self.completion != 0).any() or (self.answer != 0).any())


@dataclass
class StepStats:
    """Sums over questions (and ranks): a step's metrics are ratios of these. ``add`` and ``reduce`` are the one
    place where they are combined."""

    questions: float = 0.0
    loss: float = 0.0
    reward: float = 0.0
    gen_tokens: float = 0.0
    train_tokens: float = 0.0
    prior_len: float = 0.0  # generated tokens of the student-view samples (every sample for the baselines)
    prior_n: float = 0.0
    prior_correct: float = 0.0
    post_len: float = 0.0  # ... of the teacher-view samples (VPG-EA)
    post_n: float = 0.0
    post_correct: float = 0.0
    # VPG-EA only (zero elsewhere)
    vpgea_questions: float = 0.0
    passed: float = 0.0  # per question: fraction of posterior paths passing cross-view validation
    gate: float = 0.0  # per question: fraction with A > 0
    kl: float = 0.0
    no_pass: float = 0.0  # questions where no posterior path passed
    u_prior: float = 0.0  # per question: mean U of the prior paths
    u_post: float = 0.0  # per question: mean U of the posterior paths
    u_n: float = 0.0  # questions with U measured
    gated_len: float = 0.0  # generated tokens of the paths with A > 0 (what is distilled)
    gated_n: float = 0.0
    pass_correct: float = 0.0  # posterior paths that pass and whose own answer is right
    n_correct: float = 0.0
    pass_wrong: float = 0.0  # ... that pass although their own answer is wrong
    n_wrong: float = 0.0

    def add(self, other: StepStats) -> StepStats:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def reduce(self, info) -> StepStats:
        """The sums over every rank (a collective under torchrun; the identity in one process)."""
        from vpgea.distributed import all_reduce_sum

        return StepStats(**all_reduce_sum(dataclasses.asdict(self), info))

    def record(self) -> dict:
        """The step's metrics (``metrics.jsonl`` keys) from the sums; None where a metric does not apply."""

        def ratio(a: float, b: float):
            return a / b if b else None

        q, v = self.questions, self.vpgea_questions
        return {
            "loss": ratio(self.loss, q),
            "reward_mean": ratio(self.reward, q),
            "prior_len": ratio(self.prior_len, self.prior_n),
            "posterior_len": ratio(self.post_len, self.post_n),
            "cross_view_pass": ratio(self.passed, v),
            "gate_frac": ratio(self.gate, v),
            "kl": ratio(self.kl, v),
            "acc_prior": ratio(self.prior_correct, self.prior_n),
            "acc_posterior": ratio(self.post_correct, self.post_n),
            "no_pass_questions": int(self.no_pass) if v else None,
            "u_prior": ratio(self.u_prior, self.u_n),
            "u_post": ratio(self.u_post, self.u_n),
            "gated_len": ratio(self.gated_len, self.gated_n),
            "pass_correct": ratio(self.pass_correct, self.n_correct),
            "pass_wrong": ratio(self.pass_wrong, self.n_wrong),
            "gen_tokens": int(self.gen_tokens),
            "train_tokens": int(self.train_tokens),
        }


def _lengths(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([len(s.ids) for s in samples], dtype=torch.float32)


def _correct(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([s.correct for s in samples], dtype=torch.bool)


class Method:
    """The interface (see the module docstring). ``scale`` multiplies every question's loss: the trainer passes
    1 / questions-per-step, so the summed losses are the mean over the step's questions."""

    name = "method"
    values_needed = False  # does ``finish`` need the log-likelihood sums even when every weight is zero?
    answer_in_loss = False  # are answer tokens trained on (else scored for U only)?

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def draws(self) -> list[Draw]:
        raise NotImplementedError

    def score_sequences(self, group: Group) -> list[Seq]:
        return []

    def scored(self, group: Group, answer_sums: torch.Tensor) -> None:
        """``answer_sums [n]``: summed answer-token log-probs of ``score_sequences(group)``, in order."""

    def train_sequences(self, group: Group) -> list[Seq]:
        raise NotImplementedError

    def u_sequences(self, group: Group) -> list[int]:
        """Training sequences whose summed answer-token log-prob (``U``) ``weights`` needs."""
        return []

    def weights(self, group: Group, u: torch.Tensor | None, scale: float) -> Weights:
        raise NotImplementedError

    def finish(self, group: Group, w: Weights, completion_sums: torch.Tensor | None,
               answer_sums: torch.Tensor | None) -> StepStats:
        raise NotImplementedError


class VPGEA(Method):
    """VPG-EA (DESIGN.md, "The algorithm"): K prior paths from the student view, G posterior paths from the teacher
    view; U from the student view; cross-view reward, efficiency, group advantages; the loss
    ``sum_i c_i [-A_i log q(z_i | T) + beta 1[A_i > 0] (sg[log q] - log pi(z_i | S))]`` over ``z_i ⊕ a(y*)``."""

    name = "vpgea"
    values_needed = True  # the KL metric is over every path

    @property
    def answer_in_loss(self) -> bool:
        return self.cfg.loss_on_tail

    def draws(self) -> list[Draw]:
        return [Draw("prior", "student", self.cfg.prior_samples), Draw("post", "teacher", self.cfg.group_size)]

    def score_sequences(self, group: Group) -> list[Seq]:
        if not self.cfg.cross_view:
            return []
        it = group.item
        return [Seq(it.student, s.path, it.tail) for s in group.samples["prior"]]

    def scored(self, group: Group, answer_sums: torch.Tensor) -> None:
        group.u_prior = answer_sums.float().cpu()

    def train_sequences(self, group: Group) -> list[Seq]:
        it = group.item
        post = group.samples["post"]
        tail = it.tail if self.cfg.loss_on_tail else []
        teacher = [Seq(it.teacher, s.path, tail) for s in post]
        student = [Seq(it.student, s.path, it.tail) for s in post]  # the tail is scored for U either way
        return teacher + student

    def u_sequences(self, group: Group) -> list[int]:
        g = len(group.samples["post"])
        return list(range(g, 2 * g)) if self.cfg.cross_view else []

    def weights(self, group: Group, u: torch.Tensor | None, scale: float) -> Weights:
        cfg = self.cfg
        post, prior = group.samples["post"], group.samples["prior"]
        g = len(post)
        if u is not None:
            group.u_post = u.float().cpu()
        sc = alg.vpgea_scores(
            u_post=group.u_post if cfg.cross_view else torch.zeros(g),
            u_prior=group.u_prior if cfg.cross_view else torch.zeros(1),
            post_lengths=_lengths(post), prior_lengths=_lengths(prior), alpha=cfg.alpha, cross_view=cfg.cross_view,
            post_correct=_correct(post),
        )
        # The normaliser c_i of vpgea.losses (one path's rows: z, plus the tail when it is trained on).
        rows = torch.tensor([len(s.path) + (len(group.item.tail) if cfg.loss_on_tail else 0) for s in post],
                            dtype=torch.float32)
        if cfg.normalize == "sum":
            c = torch.full((g,), 1.0 / g)
        elif cfg.normalize == "token":
            c = torch.where(rows > 0, 1.0 / (g * rows.clamp(min=1.0)), 0.0)
        else:  # global-token
            c = torch.full((g,), 1.0 / max(float(rows.sum()), 1.0))
        adv = sc.advantage
        w_teacher = -adv * c * scale
        w_student = torch.where(adv > 0, -cfg.beta * c * scale, 0.0)
        tail_w = 1.0 if cfg.loss_on_tail else 0.0
        return Weights(completion=torch.cat([w_teacher, w_student]),
                       answer=torch.cat([w_teacher * tail_w, w_student * tail_w]),
                       data={"scores": sc, "c": c})

    def finish(self, group, w, completion_sums, answer_sums) -> StepStats:
        cfg = self.cfg
        post, prior = group.samples["post"], group.samples["prior"]
        g = len(post)
        sc, c = w.data["scores"], w.data["c"]
        seq = completion_sums + (answer_sums if cfg.loss_on_tail else torch.zeros_like(answer_sums))
        log_q, log_pi = seq[:g].double(), seq[g:].double()
        adv, gate = sc.advantage.double(), sc.advantage > 0
        c64 = c.double()
        live = c64 != 0
        pg = torch.where(live & (adv != 0), -adv * log_q, 0.0)
        kl = torch.where(live, log_q - log_pi, 0.0)
        loss = float((c64 * (pg + torch.where(gate, cfg.beta * kl, 0.0))).sum())
        correct = _correct(post)
        st = StepStats(
            questions=1, loss=loss, reward=float(sc.reward.mean()),
            prior_len=float(_lengths(prior).sum()), prior_n=len(prior), prior_correct=float(_correct(prior).sum()),
            post_len=float(_lengths(post).sum()), post_n=g, post_correct=float(correct.sum()),
            vpgea_questions=1, passed=float(sc.passed.float().mean()), gate=float(gate.float().mean()),
            kl=float((c64 * kl).sum()),  # as vpgea_loss reports it: with the loss's normaliser c_i
            no_pass=float(not bool(sc.passed.any())),
            gated_len=float(_lengths(post)[gate].sum()), gated_n=float(gate.sum()),
        )
        if cfg.cross_view:
            st.u_prior, st.u_post, st.u_n = float(group.u_prior.mean()), float(group.u_post.mean()), 1.0
            st.pass_correct, st.n_correct = float((sc.passed & correct).sum()), float(correct.sum())
            st.pass_wrong, st.n_wrong = float((sc.passed & ~correct).sum()), float((~correct).sum())
        return st


class GRPOLengthPenalty(Method):
    """grpo-lp: GRPO on the student view with correctness plus Kimi k1.5's group-relative length penalty
    (``vpgea.algorithm.length_penalty_reward``), K + G samples per question (VPG-EA's rollout budget), the on-policy
    surrogate with each sequence's token mean (GRPO's ``loss_type="grpo"``): weights ``-A_i / (n_i * group)``."""

    name = "grpo-lp"

    def draws(self) -> list[Draw]:
        return [Draw("grpo", "student", self.cfg.prior_samples + self.cfg.group_size)]

    def _samples(self, group: Group) -> list[Sample]:
        return group.samples["grpo"]

    def train_sequences(self, group: Group) -> list[Seq]:
        return [Seq(group.item.student, s.ids) for s in self._samples(group)]

    def rewards(self, group: Group) -> torch.Tensor:
        samples = self._samples(group)
        return alg.length_penalty_reward(_correct(samples), _lengths(samples), self.cfg.length_penalty)

    def weights(self, group: Group, u, scale: float) -> Weights:
        samples = self._samples(group)
        reward = self.rewards(group)
        adv = alg.group_advantages(reward)
        n = torch.tensor([max(len(s.ids), 1) for s in samples], dtype=torch.float32)
        w = -adv / (n * len(samples)) * scale
        return Weights(completion=w, answer=torch.zeros_like(w), data={"reward": reward, "adv": adv})

    def finish(self, group, w, completion_sums, answer_sums) -> StepStats:
        samples = self._samples(group)
        adv = w.data["adv"]
        return StepStats(
            questions=1, loss=float(-adv.mean()) if adv.numel() else 0.0, reward=float(w.data["reward"].mean()),
            prior_len=float(_lengths(samples).sum()), prior_n=len(samples),
            prior_correct=float(_correct(samples).sum()),
        )


METHODS = {"vpgea": VPGEA, "grpo-lp": GRPOLengthPenalty}


def make_method(cfg) -> Method:
    """The method of ``cfg.mode``."""
    if cfg.mode not in METHODS:
        raise ValueError(f"unknown mode {cfg.mode!r}; one of {sorted(METHODS)}")
    return METHODS[cfg.mode](cfg)

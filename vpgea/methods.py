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
from vpgea.losses import path_coefficients

__all__ = ["Draw", "Group", "Method", "Sample", "Seq", "StepStats", "Weights", "make_method"]


@dataclass
class Sample:
    """One sampled response."""

    ids: list[int]  # generated tokens, the stop token included
    path: list[int]  # z: the response before its last final-answer marker
    correct: bool  # its own answer, checked against the reference
    leak: bool | None = None  # the toy only: boxes an answer its path does not derive (None: unknown)


@dataclass
class Group:
    """One question of the step with its rollouts and what scoring adds to them."""

    index: int  # the question's position in the step's global batch (names its rollouts' seeds)
    item: object  # vpgea.train.Item: token ids of both views and of the answer tail
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # by draw tag
    prompts: dict[str, list[int]] = field(default_factory=dict)  # the prompt each draw was sampled from, by tag
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
    u_span: tuple[int, int] | None = None  # the answer tokens [start, end) whose log-probs make U (None: all)

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
    forwards: float = 0.0  # training-pass forwards (packed micro-batches) run
    forward_tokens: float = 0.0  # tokens through them (prompts included)
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
    pass_leak: float = 0.0  # the toy: posterior paths that box the hint without deriving it, and pass
    n_leak: float = 0.0
    leak_paths: float = 0.0  # posterior paths whose leak status is known (the toy)
    easy: float = 0.0  # questions whose prior paths are all correct (mean U_prior is then near its maximum, 0)
    pass_correct_easy: float = 0.0  # correct posterior paths of those questions that pass
    n_correct_easy: float = 0.0
    # baselines (zero where they do not apply)
    limit: float = 0.0  # thinkprune: the token limit, summed over questions
    target: float = 0.0  # l1-*: the length target asked for, summed over questions
    reinforced: float = 0.0  # rft-shortest / ibpo: responses reinforced
    reinforced_extended: float = 0.0  # ibpo: ... of them in the extended length group
    candidates: float = 0.0  # rft-shortest / ibpo: responses considered

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
            "pass_leak": ratio(self.pass_leak, self.n_leak),
            "leak_frac": ratio(self.n_leak, self.leak_paths),
            "easy_frac": ratio(self.easy, self.u_n),
            "pass_correct_easy": ratio(self.pass_correct_easy, self.n_correct_easy),
            "length_limit": ratio(self.limit, q) if self.limit else None,
            "l1_target": ratio(self.target, q) if self.target else None,
            "reinforced_frac": ratio(self.reinforced, self.candidates),
            "extended_share": ratio(self.reinforced_extended, self.reinforced) if self.candidates else None,
            "gen_tokens": int(self.gen_tokens),
            "train_tokens": int(self.train_tokens),
            "train_forwards": int(self.forwards),
            "tokens_per_forward": ratio(self.forward_tokens, self.forwards),
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

    def __init__(self, cfg, tokenizer=None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.step = 0

    def begin_step(self, step: int) -> None:
        """Called before the step's rollouts (0-based step)."""
        self.step = step

    def draws(self) -> list[Draw]:
        raise NotImplementedError

    def prompt(self, group: Group, draw: Draw) -> list[int]:
        """The prompt ``draw`` samples from for ``group`` (the item's student or teacher view by default)."""
        return group.item.student if draw.view == "student" else group.item.teacher

    def max_new_tokens(self) -> int:
        """The sampler's token limit this step."""
        return self.cfg.max_new_tokens

    def prepare(self, groups: list[Group]) -> None:
        """After scoring, before any ``weights``: a method that selects over the whole batch (IBPO) does it here."""

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
        return [Seq(it.student, s.path, it.tail, it.u_span) for s in group.samples["prior"]]

    def scored(self, group: Group, answer_sums: torch.Tensor) -> None:
        group.u_prior = answer_sums.float().cpu()

    def train_sequences(self, group: Group) -> list[Seq]:
        it = group.item
        post = group.samples["post"]
        tail = it.tail if self.cfg.loss_on_tail else []
        teacher = [Seq(it.teacher, s.path, tail) for s in post]
        student = [Seq(it.student, s.path, it.tail, it.u_span) for s in post]  # the tail is scored for U either way
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
        rows = torch.tensor([len(s.path) + (len(group.item.tail) if cfg.loss_on_tail else 0) for s in post])
        c = path_coefficients(cfg.normalize, rows)
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
        # Pass rates by kind, also without cross-view validation (where "pass" is the rule check): that ablation is
        # the one in which copied hints get through.
        st.pass_correct, st.n_correct = float((sc.passed & correct).sum()), float(correct.sum())
        st.pass_wrong, st.n_wrong = float((sc.passed & ~correct).sum()), float((~correct).sum())
        if cfg.cross_view:
            st.u_prior, st.u_post, st.u_n = float(group.u_prior.mean()), float(group.u_post.mean()), 1.0
            if bool(_correct(prior).all()):  # the threshold mean U_prior is then the mean of near-zero values
                st.easy, st.pass_correct_easy, st.n_correct_easy = 1.0, st.pass_correct, st.n_correct
        if all(s.leak is not None for s in post):
            leak = torch.tensor([bool(s.leak) for s in post])
            st.pass_leak, st.n_leak = float((sc.passed & leak).sum()), float(leak.sum())
            st.leak_paths = float(len(post))
        return st


class _StudentGroup(Method):
    """K + G student-view samples per question (VPG-EA's rollout budget), each trained on as sampled."""

    tag = "grpo"

    def draws(self) -> list[Draw]:
        return [Draw(self.tag, "student", self.cfg.prior_samples + self.cfg.group_size)]

    def _samples(self, group: Group) -> list[Sample]:
        return group.samples[self.tag]

    def train_sequences(self, group: Group) -> list[Seq]:
        prompt = group.prompts.get(self.tag, group.item.student)
        return [Seq(prompt, s.ids) for s in self._samples(group)]

    def _base_stats(self, group: Group) -> StepStats:
        samples = self._samples(group)
        return StepStats(questions=1, prior_len=float(_lengths(samples).sum()), prior_n=len(samples),
                         prior_correct=float(_correct(samples).sum()))


class _GRPOFamily(_StudentGroup):
    """GRPO on the student view with a per-sample reward: group z-scored advantages and the on-policy surrogate
    ``-sum_i c_i A_i log pi(y_i)`` with VPG-EA's sequence normaliser ``c_i`` (``--normalize``: "sum" is Dr. GRPO's
    constant normaliser, "token" GRPO's per-sequence token mean)."""

    def rewards(self, group: Group) -> torch.Tensor:
        raise NotImplementedError

    def weights(self, group: Group, u, scale: float) -> Weights:
        samples = self._samples(group)
        reward = self.rewards(group)
        adv = alg.group_advantages(reward)
        # The same sequence normaliser as VPG-EA's (--normalize): the comparison differs in the reward only.
        c = path_coefficients(self.cfg.normalize, torch.tensor([len(s.ids) for s in samples]))
        w = -adv * c * scale
        return Weights(completion=w, answer=torch.zeros_like(w), data={"reward": reward, "adv": adv, "c": c})

    def finish(self, group, w, completion_sums, answer_sums) -> StepStats:
        adv, c = w.data["adv"], w.data["c"]
        st = self._base_stats(group)
        # The surrogate's value at ratio 1: sum_i c_i (-A_i) n_i (each token's term is -A_i).
        n = torch.tensor([len(s.ids) for s in self._samples(group)], dtype=torch.float64)
        st.loss = float((c.double() * -adv.double() * n).sum())
        st.reward = float(w.data["reward"].mean())
        return st


class GRPOLengthPenalty(_GRPOFamily):
    """grpo-lp: correctness plus Kimi k1.5's group-relative length penalty (``algorithm.length_penalty_reward``)."""

    name = "grpo-lp"

    def rewards(self, group: Group) -> torch.Tensor:
        samples = self._samples(group)
        return alg.length_penalty_reward(_correct(samples), _lengths(samples), self.cfg.length_penalty)


class ThinkPrune(_GRPOFamily):
    """thinkprune: length-clipped RL (``algorithm.thinkprune_reward``): sampled with the current stage's token limit
    (``--length-schedule "0:4096,200:3072,400:2048"``), reward 1 for a correct answer within it."""

    name = "thinkprune"

    def __init__(self, cfg, tokenizer=None) -> None:
        super().__init__(cfg, tokenizer)
        self.stages = alg.length_schedule(cfg.length_schedule)

    def max_new_tokens(self) -> int:
        return alg.limit_at(self.stages, self.step)

    def rewards(self, group: Group) -> torch.Tensor:
        samples = self._samples(group)
        return alg.thinkprune_reward(_correct(samples), _lengths(samples), self.max_new_tokens())

    def finish(self, group, w, completion_sums, answer_sums) -> StepStats:
        st = super().finish(group, w, completion_sums, answer_sums)
        st.limit = float(self.max_new_tokens())
        return st


class L1(_GRPOFamily):
    """l1-exact / l1-max (LCPO): the prompt asks for a target length N drawn per question and step from
    ``--l1-range`` (the line ``--l1-prompt`` appended to the student message); the reward is
    ``algorithm.l1_exact_reward`` or ``l1_max_reward`` with ``--l1-a`` / ``--l1-delta``."""

    def __init__(self, cfg, tokenizer=None, *, exact: bool) -> None:
        super().__init__(cfg, tokenizer)
        self.exact = exact
        self.name = "l1-exact" if exact else "l1-max"

    def target(self, group: Group) -> int:
        import random

        from vpgea.rng import derive_seed

        lo, hi = self.cfg.l1_range
        return random.Random(derive_seed(self.cfg.seed, self.step, group.index, "l1-target")).randint(lo, hi)

    def prompt(self, group: Group, draw: Draw) -> list[int]:
        from vpgea.prompts import student_prompt

        extra = self.cfg.l1_prompt.format(target=self.target(group))
        ex = group.item.example
        history = getattr(ex, "history", ())  # a chat-message question's earlier messages (issue 18)
        return student_prompt(self.cfg, self.tokenizer, ex.question, extra=extra, history=history)

    def rewards(self, group: Group) -> torch.Tensor:
        samples = self._samples(group)
        correct, lengths, n = _correct(samples), _lengths(samples), self.target(group)
        if self.exact:
            return alg.l1_exact_reward(correct, lengths, n, a=self.cfg.l1_a)
        return alg.l1_max_reward(correct, lengths, n, a=self.cfg.l1_a, delta=self.cfg.l1_delta)

    def finish(self, group, w, completion_sums, answer_sums) -> StepStats:
        st = super().finish(group, w, completion_sums, answer_sums)
        st.target = float(self.target(group))
        return st


class RFTShortest(_StudentGroup):
    """rft-shortest: rejection-sampling fine-tuning on the shortest correct of each question's K + G student-view
    samples (``algorithm.shortest_correct``); the NLL token mean of the pick, averaged over the step's questions (a
    question without a correct sample contributes nothing). VPG-EA's control: short correct paths selected without
    any teacher view."""

    name = "rft-shortest"

    def weights(self, group: Group, u, scale: float) -> Weights:
        samples = self._samples(group)
        pick = alg.shortest_correct(_correct(samples), _lengths(samples))
        w = torch.zeros(len(samples))
        if pick is not None:
            w[pick] = -scale / max(len(samples[pick].ids), 1)
        return Weights(completion=w, answer=torch.zeros_like(w), data={"pick": pick})

    def finish(self, group, w, completion_sums, answer_sums) -> StepStats:
        st = self._base_stats(group)
        pick = w.data["pick"]
        st.candidates = len(self._samples(group))
        st.reinforced = float(pick is not None)
        if pick is not None and completion_sums is not None:
            st.loss = float(-completion_sums[pick] / max(len(self._samples(group)[pick].ids), 1))
        st.reward = float(_correct(self._samples(group)).float().mean())
        return st


class IBPO(_StudentGroup):
    """ibpo: inference-budget-constrained selection (``algorithm.ibpo_select``) over the step's batch of student-view
    samples: a response is in the extended group when it is longer than ``--ibpo-threshold`` tokens (default: the
    batch's median length); the chosen correct responses are reinforced by weighted SFT (token mean, averaged over the
    chosen ones), with the extended group's share of them at most ``--ibpo-budget``. Under torchrun the batch is each
    rank's share of the step."""

    name = "ibpo"

    def prepare(self, groups: list[Group]) -> None:
        samples = [(q, s) for q, g in enumerate(groups) for s in self._samples(g)]
        lengths = torch.tensor([len(s.ids) for _, s in samples], dtype=torch.float32)
        threshold = self.cfg.ibpo_threshold
        if threshold is None:
            threshold = float(lengths.median()) if lengths.numel() else 0.0
        extended = lengths > threshold
        chosen = alg.ibpo_select(torch.tensor([s.correct for _, s in samples], dtype=torch.bool), extended,
                                 torch.tensor([q for q, _ in samples]), self.cfg.ibpo_budget)
        self._choice, at = {}, 0
        self._total = max(int(chosen.sum()), 1)
        for q, g in enumerate(groups):
            n = len(self._samples(g))
            self._choice[id(g)] = (chosen[at : at + n].clone(), extended[at : at + n].clone())
            at += n

    def weights(self, group: Group, u, scale: float) -> Weights:
        chosen, extended = self._choice[id(group)]
        samples = self._samples(group)
        n = torch.tensor([max(len(s.ids), 1) for s in samples], dtype=torch.float32)
        # The weighted SFT: mean over the chosen responses of their token-mean NLL, times questions-per-step x scale
        # (= 1 in one process), so its size does not depend on the batch size.
        w = torch.where(chosen, -1.0 / (n * self._total), 0.0) * scale * self.cfg.questions_per_step
        return Weights(completion=w, answer=torch.zeros_like(w), data={"chosen": chosen, "extended": extended})

    def finish(self, group, w, completion_sums, answer_sums) -> StepStats:
        st = self._base_stats(group)
        chosen, extended = w.data["chosen"], w.data["extended"]
        samples = self._samples(group)
        st.candidates, st.reinforced = len(samples), float(chosen.sum())
        st.reinforced_extended = float((chosen & extended).sum())
        st.reward = float(_correct(samples).float().mean())
        if completion_sums is not None and bool(chosen.any()):
            n = torch.tensor([max(len(s.ids), 1) for s in samples], dtype=torch.float64)
            st.loss = float((-completion_sums / n)[chosen].sum()) / self._total * self.cfg.questions_per_step
        return st


def _ablation(**overrides):
    """A VPG-EA ablation as a mode: VPG-EA with config fields overridden."""

    class Ablation(VPGEA):
        def __init__(self, cfg, tokenizer=None) -> None:
            super().__init__(dataclasses.replace(cfg, **overrides), tokenizer)

    return Ablation


METHODS = {
    "vpgea": VPGEA,
    "grpo-lp": GRPOLengthPenalty,
    "thinkprune": ThinkPrune,
    "l1-exact": lambda cfg, tok=None: L1(cfg, tok, exact=True),
    "l1-max": lambda cfg, tok=None: L1(cfg, tok, exact=False),
    "rft-shortest": RFTShortest,
    "ibpo": IBPO,
    # the paper's ablations of VPG-EA
    "no-cross-view": _ablation(cross_view=False),
    "beta-0": _ablation(beta=0.0),
    "alpha-0": _ablation(alpha=0.0),
}


def make_method(cfg, tokenizer=None) -> Method:
    """The method of ``cfg.mode`` (``tokenizer``: for methods that build their own prompts, such as L1)."""
    if cfg.mode not in METHODS:
        raise ValueError(f"unknown mode {cfg.mode!r}; one of {sorted(METHODS)}")
    return METHODS[cfg.mode](cfg, tokenizer)

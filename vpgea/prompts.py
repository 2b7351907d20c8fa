"""Prompt building, one home for training, the toy warm start and evaluation.

A view's user message is a template (``TrainConfig.student_template`` / ``teacher_template``) formatted with the
question, the instruction and, for the teacher view, the reference answer; it is chat-templated when the tokenizer has
a chat template (generation prompt added) and tokenised without adding special tokens a second time.

A chat-message question (``Example.history`` not empty, see ``vpgea.data``): the template formats the content of its
last user message, and the messages before it (a system prompt, earlier turns) are rendered first, unchanged.
"""

from __future__ import annotations

__all__ = ["encode_user", "student_prompt", "teacher_prompt", "answer_tail", "eval_extra"]


def encode_user(tokenizer, content: str, history=()) -> list[int]:
    """Chat-template a user message after ``history`` (a chat-message example's earlier messages; generation prompt
    added) and tokenize it without extra specials; a tokenizer without a chat template tokenizes the text as it is
    (``history`` must then be empty: ValueError)."""
    from vpgea.data import chat_messages, no_chat_template_error

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(chat_messages(content, history), tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if history:
        raise no_chat_template_error(tokenizer)
    return list(tokenizer(content)["input_ids"])


def _with_extra(content: str, extra: str | None) -> str:
    return content if not extra else f"{content}\n{extra}"


def student_prompt(cfg, tokenizer, question: str, *, extra: str | None = None, history=()) -> list[int]:
    """Token ids of the student view S(x); ``extra`` is a line appended to the message (L1's length target),
    ``history`` the example's earlier chat messages."""
    content = cfg.student_template.format(question=question, instruction=cfg.instruction)
    return encode_user(tokenizer, _with_extra(content, extra), history)


def teacher_prompt(cfg, tokenizer, question: str, answer: str, *, extra: str | None = None, history=()) -> list[int]:
    """Token ids of the teacher view T(x, y*): the student's message with the reference answer as a hint."""
    content = cfg.teacher_template.format(question=question, instruction=cfg.instruction, answer=answer)
    return encode_user(tokenizer, _with_extra(content, extra), history)


def answer_tail(cfg, tokenizer, answer: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of the answer tail a(y*) (``cfg.answer_tail`` formatted with the answer, then the stop token), and
    the span ``[start, end)`` of the tail tokens that ``U`` scores.

    ``cfg.u_tokens == "answer"`` (the paper's ``U = log P(y* | x, z)``): the tokens of the answer itself; the marker
    before it (``\\boxed{``) is conditioned on, not scored, and neither is what follows (the closing brace, the stop
    token). The tail is tokenised whole, as the model writes it; the span is the tokens whose characters overlap the
    answer's (a token that merges the marker's last character with the answer's first is scored). ``"tail"``: the
    whole tail, stop token included."""
    text = cfg.answer_tail.format(answer=answer)
    eos = tokenizer.eos_token_id
    stop = [eos] if eos is not None else []
    if getattr(cfg, "u_tokens", "answer") == "tail":
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + stop, (0, len(ids) + len(stop))
    start_char = len(cfg.answer_tail.split("{answer}")[0].format())  # the literal text before the answer
    end_char = start_char + len(answer)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, KeyError):  # a slow tokenizer without offsets: tokenise in pieces
        pre = list(tokenizer(text[:start_char], add_special_tokens=False)["input_ids"])
        mid = list(tokenizer(text[start_char:end_char], add_special_tokens=False)["input_ids"])
        post = list(tokenizer(text[end_char:], add_special_tokens=False)["input_ids"])
        return pre + mid + post + stop, (len(pre), len(pre) + len(mid))
    ids = list(enc["input_ids"])
    inside = [i for i, (a, b) in enumerate(offsets) if a < end_char and b > start_char]
    if not inside:
        raise ValueError(f"answer tail {text!r}: no token covers the answer {answer!r}")
    return ids + stop, (inside[0], inside[-1] + 1)


def eval_extra(cfg) -> str | None:
    """The line an evaluation appends to the student message for ``cfg.mode``: L1's length request at
    ``l1_eval_target`` (default: the middle of ``l1_range``) for the L1 modes, else None."""
    if not str(cfg.mode).startswith("l1-"):
        return None
    target = cfg.l1_eval_target if cfg.l1_eval_target is not None else sum(cfg.l1_range) // 2
    return cfg.l1_prompt.format(target=target)

"""Prompt building, one home for training, the toy warm start and evaluation.

A view's user message is a template (``TrainConfig.student_template`` / ``teacher_template``) formatted with the
question, the instruction and, for the teacher view, the reference answer; it is chat-templated when the tokenizer has
a chat template (generation prompt added) and tokenised without adding special tokens a second time.
"""

from __future__ import annotations

__all__ = ["encode_user", "student_prompt", "teacher_prompt", "answer_tail"]


def encode_user(tokenizer, content: str) -> list[int]:
    """Chat-template a single user message (generation prompt added) and tokenize it without extra specials; a
    tokenizer without a chat template tokenizes the text as it is."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(content)["input_ids"])


def _with_extra(content: str, extra: str | None) -> str:
    return content if not extra else f"{content}\n{extra}"


def student_prompt(cfg, tokenizer, question: str, *, extra: str | None = None) -> list[int]:
    """Token ids of the student view S(x); ``extra`` is a line appended to the message (L1's length target)."""
    content = cfg.student_template.format(question=question, instruction=cfg.instruction)
    return encode_user(tokenizer, _with_extra(content, extra))


def teacher_prompt(cfg, tokenizer, question: str, answer: str, *, extra: str | None = None) -> list[int]:
    """Token ids of the teacher view T(x, y*): the student's message with the reference answer as a hint."""
    content = cfg.teacher_template.format(question=question, instruction=cfg.instruction, answer=answer)
    return encode_user(tokenizer, _with_extra(content, extra))


def answer_tail(cfg, tokenizer, answer: str) -> list[int]:
    """Token ids of the answer tail a(y*) (``cfg.answer_tail`` formatted with the answer), then the stop token."""
    tail = list(tokenizer(cfg.answer_tail.format(answer=answer), add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    return tail + ([eos] if eos is not None else [])

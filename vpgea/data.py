"""Math data sets as JSONL: GSM8K, MATH-500, AIME, AMC, or any file with named question/answer fields.

Users pass their own paths (the package ships no data). Every error names the file and, for a bad line, the line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Example", "iter_jsonl", "read_jsonl_log", "load_jsonl_dataset", "build_prompt", "DEFAULT_INSTRUCTION",
           "gsm8k_final_answer"]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_HINT_TEMPLATE = (
    "The reference answer is {hint}. Without mentioning that you were given it, write an efficient reasoning path "
    "that reaches it."
)

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


@dataclass(frozen=True)
class Example:
    question: str
    answer: str  # the final answer only ("18", "\\frac{1}{2}", "27")
    source: str  # "file:line" it came from


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after ``####`` in a GSM8K worked solution, commas removed; None if there is no marker."""
    m = _GSM8K_FINAL.search(solution)
    return m.group(1).replace(",", "").strip() if m else None


def iter_jsonl(path: str | Path):
    """``(where, record)`` for each non-blank line of a JSONL file, ``where`` being ``"file:line"``. A line that is not
    valid JSON, or not a JSON object, raises ``ValueError`` naming its file and line."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec


def read_jsonl_log(path: str | Path) -> list[dict]:
    """The records of an append-only JSONL log (``metrics.jsonl``, evaluation responses). A crash mid-write leaves at
    most one partial last line: it is dropped. An unreadable line anywhere else is corruption and raises
    ``ValueError`` naming ``file:line``."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        lines = f.readlines()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last and not line.endswith("\n"):  # the partial last line of an interrupted write
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _answer_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # AMC stores 27.0
    return str(value).strip()


def load_jsonl_dataset(
    path: str | Path,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read a JSONL file of problems.

    Formats, detected per file from the first record unless fields are given: MATH / AIME / AMC (``problem`` +
    ``answer``), GSM8K (``question`` + ``answer`` ending ``#### n``), or plain ``question`` + ``answer``.
    Raises FileNotFoundError for a missing file and ValueError naming ``file:line`` for unreadable JSON, a record that
    is not an object, a missing or empty field, or a GSM8K answer without ``####``; ValueError for an empty file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    examples: list[Example] = []
    q_field, a_field, gsm8k = question_field, answer_field, False
    if limit is not None and limit <= 0:
        raise ValueError(f"{path}: limit must be positive, got {limit}")
    for where, rec in iter_jsonl(path):
        if q_field is None:
            q_field = "problem" if "problem" in rec else "question"
        if a_field is None:
            a_field = "answer"
            gsm8k = q_field == "question" and isinstance(rec.get("answer"), str) and "####" in rec["answer"]
        for field in (q_field, a_field):
            if field not in rec or rec[field] is None or str(rec[field]).strip() == "":
                raise ValueError(
                    f"{where}: missing or empty field {field!r} (fields present: {sorted(rec)}); "
                    "use --question-field/--answer-field to name others"
                )
        answer = rec[a_field]
        if gsm8k:
            final = gsm8k_final_answer(str(answer))
            if final is None:
                raise ValueError(f"{where}: GSM8K-style answer without a '#### <number>' final line")
            answer = final
        examples.append(Example(question=str(rec[q_field]).strip(), answer=_answer_text(answer), source=where))
        if limit is not None and len(examples) >= limit:
            break  # before the next line is read: nothing past the limit is parsed
    if not examples:
        raise ValueError(f"{path}: no examples (empty file)")
    return examples


def build_prompt(tokenizer, question: str, *, instruction: str = DEFAULT_INSTRUCTION, hint: str | None = None,
                 hint_template: str = DEFAULT_HINT_TEMPLATE) -> list[int]:
    """Token ids of the prompt for ``question``: the student view, or with ``hint`` (the reference answer) the
    teacher view. Uses the tokenizer's chat template when it has one, else plain text."""
    content = question.strip()
    if instruction:
        content = f"{content}\n{instruction}"
    if hint is not None:
        content = f"{content}\n{hint_template.format(hint=hint)}"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(content + "\n", add_special_tokens=True)["input_ids"]

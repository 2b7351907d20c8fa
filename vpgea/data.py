"""Problem sets from local files: JSON Lines, JSON, Parquet, or a saved Hugging Face ``datasets`` directory.

GSM8K, MATH-500, AIME, AMC, verl-style parquet (``prompt`` chat messages + ``reward_model.ground_truth``), or any
records with named (possibly nested, dotted) question and answer fields. Users pass their own paths (the package
ships no data, and nothing is downloaded).

How each format is read:

- ``.jsonl`` (or any other name that is not Parquet): our line reader, so an error names ``file:line`` and values keep
  their JSON types (a loader that builds Arrow columns first would coerce mixed types, or fail naming no line);
- ``.json``: a JSON array of records (``file:row i``, 0-based), or JSON Lines under a ``.json`` name;
- ``.parquet`` (or a file that starts with Parquet's magic bytes): ``datasets.load_dataset("parquet", ...)``;
- a directory: ``datasets.load_from_disk`` (a ``Dataset``, or a ``DatasetDict`` with one split; else name the split's
  subdirectory). Rows are named ``path:row i``, ``i`` being the 0-based index (``dataset[i]``).

Questions are strings or chat-message lists (``[{"role": ..., "content": ...}, ...]`` ending with the user's
message): the example's ``question`` is then that last user message's content, which the prompt templates format, and
``history`` holds the messages before it, which are rendered first, unchanged, by the model tokenizer's chat template.
Answers are strings or numbers (``27.0`` becomes ``"27"``). Anything else is an error naming the file, the row and the
field, never stringified.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Example",
    "chat_messages",
    "get_field",
    "gsm8k_final_answer",
    "iter_jsonl",
    "iter_records",
    "load_dataset",
    "load_jsonl_dataset",
    "read_jsonl_log",
]

# Field names tried, in order, on a file's first record when none is given.
QUESTION_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "reward_model.ground_truth")
_PARQUET_MAGIC = b"PAR1"

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


@dataclass(frozen=True)
class Example:
    question: str  # the question; for a chat-message prompt, the content of its last (user) message
    answer: str  # the final answer only ("18", "\\frac{1}{2}", "27")
    source: str  # where it came from: "file:line" (JSON Lines) or "path:row i" (0-based)
    history: tuple = ()  # chat messages before the question's message ({"role", "content"} dicts), rendered first
    record: Mapping | None = field(default=None, compare=False, repr=False)  # the raw row, for --reward hooks


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after ``####`` in a GSM8K worked solution, commas removed; None if there is no marker."""
    m = _GSM8K_FINAL.search(solution)
    return m.group(1).replace(",", "").strip() if m else None


# --- reading records ------------------------------------------------------------------------------------------------


def iter_jsonl(path: str | Path):
    """``(where, record)`` for each non-blank line of a JSONL file, ``where`` being ``"file:line"``. A line that is not
    UTF-8, not valid JSON, or not a JSON object raises ``ValueError`` naming its file and line."""
    with Path(path).open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); expected JSON Lines (.jsonl), JSON "
                    "(.json), Parquet (.parquet) or a saved dataset directory"
                ) from None
            if not line.strip():
                continue
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


def _iter_json(path: Path):
    """A ``.json`` file: an array of objects (``path:row i``), or JSON Lines under a ``.json`` name."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines
            yield from iter_jsonl(path)
            return
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):  # one object: a JSON Lines file of one line
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of objects (or JSON Lines), got {type(data).__name__}")
    for i, rec in enumerate(data):
        where = f"{path}:row {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield where, rec


def _iter_dataset(ds, path: Path):
    for i, rec in enumerate(ds):
        yield f"{path}:row {i}", rec


def _load_with_datasets(path: Path, kind: str):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise RuntimeError("reading Parquet files and saved datasets needs `datasets`: pip install datasets") from e
    if kind == "parquet":
        try:
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as e:  # pyarrow / datasets errors of many types: name the file
            raise ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise ValueError(
            f"{path}: a directory, but not a saved Hugging Face dataset (Dataset.save_to_disk); expected that or a "
            f".jsonl, .json or .parquet file ({e})"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise ValueError(f"{path}: a saved DatasetDict with splits {sorted(ds)}; pass one split's directory, "
                             f"e.g. {path / sorted(ds)[0]}")
        ds = next(iter(ds.values()))
    return ds


def iter_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for every record of a data file or saved dataset directory (see the module docstring for
    the formats and how ``where`` names a record). Raises FileNotFoundError for a missing path and ValueError naming
    the file (and line or row) for anything unreadable."""
    p = Path(path)
    if p.is_dir():
        yield from _iter_dataset(_load_with_datasets(p, "dir"), p)
        return
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    with p.open("rb") as f:
        magic = f.read(4)
    if p.suffix.lower() in (".parquet", ".pq") or magic == _PARQUET_MAGIC:
        yield from _iter_dataset(_load_with_datasets(p, "parquet"), p)
    elif p.suffix.lower() == ".json":
        yield from _iter_json(p)
    else:
        yield from iter_jsonl(p)


# --- fields ---------------------------------------------------------------------------------------------------------


class _Missing(Exception):
    pass


def get_field(record: Mapping, name: str):
    """``record[name]``, or for a dotted name the nested value (``extra_info.question``; an integer part indexes a
    list: ``prompt.0.content``). A key that itself contains dots is found first. Raises KeyError with a message that
    names what is there instead."""
    if name in record:
        return record[name]
    cur, path = record, []
    for part in name.split("."):
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, (list, tuple)) and re.fullmatch(r"-?\d+", part) and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            if isinstance(cur, Mapping):
                there = f"fields present: {sorted(map(str, cur))}"
            elif isinstance(cur, (list, tuple)):
                there = f"a list of {len(cur)}"
            else:
                there = f"a value of type {type(cur).__name__}"
            where = f": {'.'.join(path)!r} has no {part!r}" if path else ""
            raise KeyError(f"missing field {name!r}{where} ({there})")
        path.append(part)
    return cur


def _has_field(record: Mapping, name: str) -> bool:
    try:
        get_field(record, name)
    except KeyError:
        return False
    return True


def _question(value, where: str, name: str) -> tuple[str, tuple]:
    """(question text, earlier chat messages) from a string or a list of chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {name!r} is empty")
        return value.strip(), ()
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, Mapping) for m in value):
        messages = []
        for k, m in enumerate(value):
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(
                    f"{where}: field {name!r}, message {k}: expected {{'role': str, 'content': str}}, got role "
                    f"{type(role).__name__} and content {type(content).__name__} (keys {sorted(map(str, m))})"
                )
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "user":
            raise ValueError(f"{where}: field {name!r}: the last chat message must be the user's (the prompt to "
                             f"answer), got role {messages[-1]['role']!r}")
        if not messages[-1]["content"].strip():
            raise ValueError(f"{where}: field {name!r}: the last user message is empty")
        return messages[-1]["content"].strip(), tuple(messages[:-1])
    got = "an empty list" if isinstance(value, (list, tuple)) and not value else type(value).__name__
    raise ValueError(f"{where}: field {name!r} must be a string or a list of chat messages "
                     f"([{{'role': ..., 'content': ...}}, ...]), got {got}")


def _answer(value, where: str, name: str) -> str:
    """A reference answer as text: a string (stripped) or a number (``27.0`` -> ``"27"``); nothing else."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {name!r} is empty")
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: field {name!r} is {value}, expected a string or a finite number")
        return str(int(value)) if value.is_integer() else repr(value)  # AMC stores 27.0
    raise ValueError(f"{where}: field {name!r} must be a string or a number, got {type(value).__name__}: "
                     f"{str(value)[:80]}")


# --- loading --------------------------------------------------------------------------------------------------------


def load_dataset(
    path: str | Path,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Read a problem set (JSON Lines, JSON, Parquet or a saved dataset directory; see the module docstring).

    Fields not given are detected from the first record: the question is the first of ``problem``, ``question``,
    ``prompt`` present, the answer the first of ``answer``, ``reward_model.ground_truth``; a detected ``question`` +
    ``answer`` pair whose answer contains ``####`` is GSM8K (the answer is the number after it). Dotted names reach
    nested fields. Raises FileNotFoundError for a missing path and ValueError naming the file and record for unreadable
    data, a missing or empty field, a question that is neither a string nor chat messages, an answer that is neither a
    string nor a number, or a GSM8K answer without ``####``; ValueError for a data set with no records.
    """
    path = Path(path)
    if limit is not None and limit <= 0:
        raise ValueError(f"{path}: limit must be positive, got {limit}")
    examples: list[Example] = []
    q_field, a_field, gsm8k = question_field, answer_field, False
    for where, rec in iter_records(path):
        if q_field is None:
            q_field = next((f for f in QUESTION_FIELDS if _has_field(rec, f)), "question")
        if a_field is None:
            a_field = next((f for f in ANSWER_FIELDS if _has_field(rec, f)), "answer")
            gsm8k = (q_field == "question" and a_field == "answer" and isinstance(rec.get("answer"), str)
                     and "####" in rec["answer"])
        values = []
        for name in (q_field, a_field):
            try:
                value = get_field(rec, name)
            except KeyError as e:
                raise ValueError(f"{where}: {e.args[0]}; use --question-field/--answer-field to name others") from None
            if value is None:
                raise ValueError(f"{where}: field {name!r} is null; use --question-field/--answer-field to name "
                                 "others")
            values.append(value)
        question, history = _question(values[0], where, q_field)
        answer = _answer(values[1], where, a_field)
        if gsm8k:
            answer = gsm8k_final_answer(answer)
            if answer is None:
                raise ValueError(f"{where}: GSM8K-style answer without a '#### <number>' final line")
        examples.append(Example(question=question, answer=answer, source=where, history=history, record=rec))
        if limit is not None and len(examples) >= limit:
            break  # before the next record is read: nothing past the limit is parsed
    if not examples:
        raise ValueError(f"{path}: no examples (empty data set)")
    return examples


def load_jsonl_dataset(path: str | Path, **kw) -> list[Example]:
    """The former name of :func:`load_dataset` (it reads every supported format, not only JSON Lines)."""
    return load_dataset(path, **kw)


# --- prompts --------------------------------------------------------------------------------------------------------


def chat_messages(content: str, history=()) -> list[dict]:
    """The conversation of a prompt: the example's earlier messages (``history``), then ``content`` as the user's
    message."""
    return [*(dict(m) for m in history), {"role": "user", "content": content}]


def no_chat_template_error(tokenizer) -> ValueError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ValueError(f"the data has chat-message prompts with earlier messages (system prompt, earlier turns), but "
                      f"the tokenizer {name!r} has no chat template to render them")

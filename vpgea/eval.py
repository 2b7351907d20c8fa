"""Evaluation: ACC, A.Tok and ε3 = ACC² / A.Tok on math data sets (``python -m vpgea.eval``).

The trainer's before/after evaluation calls :func:`evaluate` too, so both report the same numbers the same way.
Responses are appended to a JSONL file batch by batch (with their verdicts), so an interrupted evaluation keeps what it
generated and ``--resume`` continues from there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

from vpgea.data import Example, load_jsonl_dataset, read_jsonl_log
from vpgea.modeldir import model_context
from vpgea.rng import derive_seed
from vpgea.grading import extract_answer, is_correct

__all__ = ["evaluate", "generate_records", "summarize", "main"]


def summarize(records: list[dict]) -> dict:
    """Metrics over response records (``correct``, ``num_tokens``, ``extracted``)."""
    n = len(records)
    if n == 0:
        raise ValueError("no responses to summarize")
    right = [r for r in records if r["correct"]]
    wrong = [r for r in records if not r["correct"]]
    acc = len(right) / n
    avg_tokens = sum(r["num_tokens"] for r in records) / n

    def mean_tokens(rs):
        return sum(r["num_tokens"] for r in rs) / len(rs) if rs else 0.0

    return {
        "acc": acc,
        "avg_tokens": avg_tokens,
        "eps3": acc * acc / avg_tokens if avg_tokens > 0 else 0.0,
        "num_responses": n,
        "num_problems": len({r["problem"] for r in records}),
        "num_correct": len(right),
        "num_incorrect": len(wrong),
        "avg_tokens_correct": mean_tokens(right),
        "avg_tokens_incorrect": mean_tokens(wrong),
        "num_no_answer": sum(1 for r in records if r["extracted"] is None),
        "num_truncated": sum(1 for r in records if r.get("finish_reason") == "length"),
    }


def generate_records(
    engine,
    tokenizer,
    examples: list[Example],
    *,
    samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    prompt_fn: Callable[[Example], list[int]] | None = None,
    results_path: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool | str = False,
    shard: tuple[int, int] = (0, 1),
    grade: Callable[[str, Example], bool] | None = None,
) -> list[dict]:
    """Generate ``samples`` responses per example, grade them, and return one record per response.

    Response ``s`` of problem ``i`` samples with seed ``derive_seed(seed, i, s)``, so the records do not depend on the
    batch size or on how the problems are split. ``shard=(rank, world)`` keeps the problems with ``i % world == rank``
    (data-parallel evaluation; gather the records and call :func:`summarize`). With ``results_path`` every record is
    appended there as JSON as soon as its batch is done; ``resume=True`` first reads the records already there and
    skips those (problem, sample) pairs. ``grade(response, example)`` decides correctness (a ``vpgea.rewards.Reward``,
    the ``--reward`` hook); default: math-verify on the last ``\\boxed{}``. ``progress``: show a progress bar (with an
    ETA), labelled with the string if one is given. Returns the records of this shard, the resumed ones included.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not examples:
        raise ValueError("evaluate: no examples")
    rank, world = shard
    if prompt_fn is None:
        from vpgea.config import TrainConfig
        from vpgea.prompts import student_prompt

        defaults = TrainConfig()  # the trainer's default student view

        def prompt_fn(ex):
            return student_prompt(defaults, tokenizer, ex.question, history=ex.history)
    records: list[dict] = []
    out_f = None
    if results_path is not None:
        results_path = Path(results_path)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and results_path.exists():
            records = read_jsonl_log(results_path)  # a partial last line (a crash mid-write) is dropped
            # Rewrite without a partial last line so appends stay valid JSONL.
            results_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        out_f = results_path.open("a" if resume else "w", encoding="utf-8")
    done = {(r["problem"], r["sample"]) for r in records}
    todo = [(i, s) for i in range(rank, len(examples), world) for s in range(samples) if (i, s) not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=progress if isinstance(progress, str) else "eval", unit="resp",
                   file=sys.stderr, dynamic_ncols=True)
    try:
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            prompts = [prompt_fn(examples[i]) for i, _ in chunk]
            outs = engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=[derive_seed(seed, i, s) for i, s in chunk])
            for (i, s), out in zip(chunk, outs):
                text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
                pred = extract_answer(text)
                correct = grade(text, examples[i]) if grade is not None else is_correct(pred, examples[i].answer)
                rec = {
                    "problem": i, "sample": s, "source": examples[i].source, "gold": examples[i].answer,
                    "response": text, "extracted": pred, "correct": correct,
                    "num_tokens": len(out.token_ids), "finish_reason": out.finish_reason,
                }
                records.append(rec)
                if out_f is not None:
                    out_f.write(json.dumps(rec) + "\n")
            if out_f is not None:
                out_f.flush()
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if out_f is not None:
            out_f.close()
        if bar is not None:
            bar.close()
    return records


def evaluate(engine, tokenizer, examples: list[Example], **kw) -> dict:
    """Generate and score (see :func:`generate_records` for the arguments).

    Returns ``{"acc", "avg_tokens", "eps3", ...}`` (see :func:`summarize`): ACC is a fraction, A.Tok the mean number of
    generated tokens per response (EOS included), ε3 = ACC² / A.Tok.
    """
    return summarize(generate_records(engine, tokenizer, examples, **kw))


# --------------------------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vpgea.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local Hugging Face model directory (with its tokenizer)")
    p.add_argument("--data", required=True, nargs="+",
                   help=".jsonl / .json / .parquet files or saved dataset directories (GSM8K, MATH-500, AIME, AMC, "
                   "verl parquet, or custom fields)")
    p.add_argument("--samples", type=int, default=1, help="responses per problem (ACC averages over them)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length limit per response (default: 4096, or less where the model's context, "
                   "max_position_embeddings, minus the longest prompt is shorter)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems of each file")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf", help="rollout engine")
    p.add_argument("--output", default=None,
                   help="summary JSON; responses go to <output stem>.<dataset>.responses.jsonl beside it (default: "
                   "eval-<model dir name>.json beside the model directory)")
    p.add_argument("--question-field", default=None,
                   help="question field (dotted for nested: extra_info.question; a string or chat messages)")
    p.add_argument("--answer-field", default=None, help="answer field (dotted for nested: reward_model.ground_truth)")
    p.add_argument("--reward", default="vpgea.rewards:math_correct",
                   help="correctness check, module:function or file.py:function (see vpgea.rewards)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from its JSONL files; the settings must be the ones it "
                   "started with (the summary JSON records them)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="--resume: accept another --engine, --device or --dtype (numerics only)")
    p.add_argument("--run-config", default=None, metavar="FILE",
                   help="the training run's config.json, whose student-view prompt (template, instruction) the "
                   "evaluation uses; default: found beside the checkpoint (its run directory), else the trainer's "
                   "defaults")
    p.add_argument("--l1-target", type=int, default=None, metavar="N",
                   help="ask for N tokens with the run's --l1-prompt (an L1-trained model: one model, one point per N "
                   "on the accuracy-vs-tokens curve)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=None, help="torch device for the hf engine (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's; bf16 on GPU)")
    return p


DEFAULT_MAX_NEW_TOKENS = 4096
# --resume: settings that change the responses (refused), those that change only the numerics (accepted with
# --allow-config-change); --batch-size, --output and --resume are never compared (records do not depend on them).
_RESUME_HARMLESS = {"engine", "device", "dtype"}


def _check_args(args: argparse.Namespace) -> None:
    """Start-up checks of the numbers, with the flag's name."""
    for name in ("samples", "batch_size", "max_new_tokens", "limit"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")


def dataset_names(paths: list[str]) -> list[str]:
    """A distinct name per data file, used in the results and the response files' names: the file's stem, with as
    many parent folders as it takes to tell files of the same stem apart (``a-test``, ``b-test``). The same file
    twice is an error."""
    resolved = [Path(p).resolve() for p in paths]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise ValueError(f"--data: {paths[i]} is given twice")
    names = [r.stem for r in resolved]
    depth = 1
    while len(set(names)) < len(names):
        names = [n if names.count(n) == 1 else "-".join([*r.parent.parts[-depth:], r.stem])
                 for n, r in zip(names, resolved)]
        depth += 1
    return names


def _default_output(model: str) -> Path:
    d = Path(model).resolve()
    return d.parent / f"eval-{d.name}.json"


def _load_model_and_tokenizer(path: str, device: str | None, dtype: str | None, engine: str):
    import torch

    from vpgea.modeldir import check_model_dir, load_tokenizer

    model_dir = check_model_dir(path, "--model")
    tokenizer = load_tokenizer(model_dir, "--model")
    if engine == "vllm":
        return str(model_dir), tokenizer
    from transformers import AutoModelForCausalLM

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = getattr(torch, dtype) if dtype else ("auto" if dev.type == "cpu" else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True).to(dev)
    model.eval()
    return model, tokenizer


def _settings(args: argparse.Namespace, names: list[str], max_new_tokens: int) -> dict:
    """What the responses depend on (and the numerics-only engine, device and dtype), as the JSON records it."""
    return {"model": str(Path(args.model).resolve()), "data": dict(zip(names, (str(Path(f).resolve())
                                                                               for f in args.data))),
            "samples": args.samples, "limit": args.limit, "seed": args.seed, "temperature": args.temperature,
            "run_config": args.run_config, "l1_target": args.l1_target,
            "top_p": args.top_p, "max_new_tokens": max_new_tokens, "question_field": args.question_field,
            "answer_field": args.answer_field, "engine": args.engine, "device": args.device, "dtype": args.dtype}


def _check_resume(out: Path, settings: dict, allow: bool) -> None:
    from vpgea.rundir import config_differences, describe_differences

    try:
        saved = json.loads(out.read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        warn(f"--resume: {out} records no settings to compare; continuing from the response files as they are")
        return
    changes, harmless = config_differences(saved, settings, harmless=_RESUME_HARMLESS, ignored=set())
    if changes or (harmless and not allow):
        what = describe_differences(changes + ([] if allow else harmless), saved_in="the evaluation")
        hint = " (--allow-config-change accepts --engine, --device and --dtype)" if harmless and not allow else ""
        raise ValueError(f"--resume: {out} was started with other settings, and its responses would mix two "
                         f"evaluations: {what}{hint}. Use the same settings, or another --output without --resume")


def run_config(model: str, explicit: str | None):
    """The TrainConfig whose prompt the evaluation reproduces: ``--run-config``, else the ``config.json`` a training
    run wrote in the checkpoint's run directory (``<run>/checkpoint-N`` or ``<run>/<mode>/checkpoint-N``; a model's
    own config.json is told apart by its keys), else the trainer's defaults. Returns ``(cfg, where)``."""
    import dataclasses as _dc

    from vpgea.config import TrainConfig, load_config_file

    candidates = [Path(explicit)] if explicit else [Path(model).resolve().parent / "config.json",
                                                    Path(model).resolve().parent.parent / "config.json"]
    fields = {f.name for f in _dc.fields(TrainConfig)}
    for path in candidates:
        if not path.is_file():
            if explicit:
                raise FileNotFoundError(f"--run-config {explicit}: file not found")
            continue
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raw = None
        if not explicit and not (isinstance(raw, dict) and "student_template" in raw):
            continue  # not a run's config
        values = load_config_file(path)
        values.pop("preset", None)
        return TrainConfig(**{k: v for k, v in values.items() if k in fields}), str(path)
    return TrainConfig(), None


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from vpgea.engines import make_engine
    from vpgea.rundir import atomic_write_text

    from vpgea.rewards import load_reward

    grade = load_reward(args.reward)  # issue 18: imported and checked before any data or model is read
    datasets = {}
    names = dataset_names(args.data)
    for name, f in zip(names, args.data):  # read every file before any generation: a typo fails in seconds
        datasets[name] = load_jsonl_dataset(f, question_field=args.question_field, answer_field=args.answer_field,
                                            limit=args.limit)
    out = Path(args.output) if args.output else _default_output(args.model)
    model, tokenizer = _load_model_and_tokenizer(args.model, args.device, args.dtype, args.engine)
    from vpgea.prompts import student_prompt

    rcfg, rcfg_path = run_config(args.model, args.run_config)
    extra = rcfg.l1_prompt.format(target=args.l1_target) if args.l1_target is not None else None
    if rcfg_path:
        print(f"prompts: the student view of {rcfg_path}", file=sys.stderr, flush=True)

    def prompt_fn(ex):
        return student_prompt(rcfg, tokenizer, ex.question, history=ex.history, extra=extra)

    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    context = model_context(args.model)
    if context is not None:
        longest = max(len(prompt_fn(ex)) for exs in datasets.values() for ex in exs)
        room = context - longest
        if room < 1:
            raise ValueError(f"--model {args.model}: its context holds {context} positions, and the longest prompt "
                             f"already takes {longest} tokens")
        if max_new_tokens > room:
            warn(f"--max-new-tokens {max_new_tokens} does not fit the model's context ({context} positions, "
                 f"max_position_embeddings in its config.json, and prompts up to {longest} tokens): generating at "
                 f"most {room} tokens per response")
            max_new_tokens = room
    if args.samples > 1 and args.temperature == 0:
        warn(f"--samples {args.samples} at --temperature 0: greedy decoding repeats the same response, so every "
             "sample is the same and ACC and A.Tok are those of one sample")
    settings = _settings(args, names, max_new_tokens)
    if args.resume and out.exists():
        _check_resume(out, settings, args.allow_config_change)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        results = {"model": str(args.model), "samples": args.samples, "max_new_tokens": max_new_tokens,
                   "temperature": args.temperature, "settings": settings, "datasets": {}}
        if args.resume and out.exists():  # keep the data sets already finished
            results["datasets"] = json.loads(out.read_text()).get("datasets", {})
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")  # the settings first: --resume compares them
    except OSError as e:
        raise ValueError(f"cannot write the results to {out} ({e.strerror}); pass --output PATH") from None
    engine = make_engine(args.engine, model, tokenizer)
    print(f"writing {out} and its responses beside it", file=sys.stderr, flush=True)
    for name, examples in datasets.items():
        res = evaluate(engine, tokenizer, examples, samples=args.samples, max_new_tokens=max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                       results_path=out.with_name(f"{out.stem}.{name}.responses.jsonl"), resume=args.resume,
                       seed=args.seed, progress=f"eval {name}", grade=grade, prompt_fn=prompt_fn)
        results["datasets"][name] = res
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")  # after each data set: nothing finished is lost
    print(f"{'dataset':<20} {'ACC':>7} {'A.Tok':>9} {'eps3':>10} {'Tok ok':>8} {'Tok bad':>8} {'no-ans':>7}")
    for name, r in results["datasets"].items():
        print(f"{name:<20} {r['acc']:>7.4f} {r['avg_tokens']:>9.1f} {r['eps3']:>10.6f} "
              f"{r['avg_tokens_correct']:>8.1f} {r['avg_tokens_incorrect']:>8.1f} {r['num_no_answer']:>7d}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.engine == "vllm":
        from vpgea.modeldir import require_vllm

        try:
            require_vllm("--engine vllm")  # at start-up, before any file or model is read
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        return _run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

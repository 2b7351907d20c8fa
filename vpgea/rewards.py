"""The correctness hook (``--reward``): which responses count as correct.

A reward function is named ``"module:function"`` (an importable module) or ``"path/to/file.py:function"``, and is
called once per sampled response::

    def my_check(response: str, answer: str) -> bool: ...
    def my_check(response: str, answer: str, *, record: dict) -> bool: ...   # also gets the data set row

``response`` is the decoded response (special tokens removed), ``answer`` the example's reference answer (the
``--answer-field`` text), ``record`` the raw row (nested fields included) for checks that need more, such as test
cases in another column. It returns True / False (1 / 0 are accepted). The default, :func:`math_correct`, extracts the
last ``\\boxed{}`` and compares it with math-verify.

What it decides: the rule-checked correctness of each rollout (the reward or selection of every baseline mode:
grpo-lp, thinkprune, l1-exact / l1-max, rft-shortest, ibpo; R in the ``no-cross-view`` ablation; the logged
accuracies) and of each evaluation response (ACC). The reference answer still goes where it went, whatever the hook:
into the teacher view, into the answer tail a(y*) and so VPG-EA's cross-view score U, and to the hook as ``answer``.

:func:`load_reward` imports and checks the function when the run starts, so a typo fails in seconds.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_REWARD", "Reward", "load_reward", "math_correct"]

DEFAULT_REWARD = "vpgea.rewards:math_correct"


def math_correct(response: str, answer: str) -> bool:
    """The default check: the response's last ``\\boxed{}`` (or ``####`` / "the answer is") equals ``answer`` under
    math-verify (plain numbers compared numerically)."""
    from vpgea.grading import extract_answer, is_correct

    return is_correct(extract_answer(response), answer)


@dataclass(frozen=True)
class Reward:
    """A loaded, checked reward function. ``reward(response, example)`` -> bool."""

    spec: str
    fn: Callable
    wants_record: bool  # the function takes ``record=`` (by name or through **kwargs)

    def __call__(self, response: str, example) -> bool:
        kw = {"record": dict(example.record or {})} if self.wants_record else {}
        try:
            value = self.fn(response, example.answer, **kw)
        except Exception as e:
            raise RuntimeError(f"--reward {self.spec} raised {type(e).__name__} on {example.source}: {e}") from e
        if isinstance(value, bool):
            return value
        # numpy bools and 0 / 1 numbers (verl-style compute_score returns 1.0 / 0.0)
        if isinstance(value, np.bool_) or (isinstance(value, numbers.Real) and value in (0, 1)):
            return bool(value)
        raise ValueError(f"--reward {self.spec} returned {value!r} ({type(value).__name__}) for {example.source}; "
                         "expected True or False (or 1 / 0)")


def _import(spec: str):
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"--reward {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"--reward {spec}: file {path} not found")
        name = f"_vpgea_reward_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ValueError(f"--reward {spec}: {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # pickling and dataclasses in the module look themselves up here
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ValueError(f"--reward {spec}: importing {path} failed ({type(e).__name__}: {e})") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ValueError(f"--reward {spec}: module {module_name!r} not found ({e}); give an importable module "
                             "or a path to a .py file") from e
        except Exception as e:
            raise ValueError(f"--reward {spec}: importing {module_name!r} failed ({type(e).__name__}: {e})") from e
    fn = module
    for part in attr.split("."):  # "module:Class.method" works too
        if not hasattr(fn, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ValueError(f"--reward {spec}: {module_name} has no {attr!r} (callables there: {public[:20]})")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


@functools.cache
def load_reward(spec: str = DEFAULT_REWARD) -> Reward:
    """Import the reward function ``spec`` and check that it can be called as ``fn(response, answer)`` (and whether
    it takes ``record=``). Raises ValueError with the reason otherwise. Cached: one import per spec and process."""
    fn = _import(spec)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: call with two arguments
        return Reward(spec, fn, wants_record=False)
    params = sig.parameters.values()
    wants_record = "record" in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in params)
    try:
        sig.bind("response", "answer", **({"record": {}} if wants_record else {}))
    except TypeError as e:
        name = getattr(fn, "__name__", "fn")
        raise ValueError(f"--reward {spec}: cannot be called as fn(response, answer) or "
                         f"fn(response, answer, record=row): {e} (its signature: {name}{sig})") from None
    return Reward(spec, fn, wants_record=wants_record)

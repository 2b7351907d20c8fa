"""vpgea: VPG-EA training for efficient LLM reasoning, with fused Triton kernels.

Public API (imported lazily so that ``import vpgea`` stays cheap):

- ``vpgea.token_logprobs``: fused linear -> log-softmax -> gather, never materialising ``[N, V]`` logits.
- ``vpgea.vpgea_loss``: the VPG-EA gated-KL/advantage loss over packed paths.
- ``vpgea.PolicyModel``: a packed-sequence wrapper around any Hugging Face causal LM returning hidden states.
- ``vpgea.nn``: ``nn.Module`` drop-ins (``FusedLinearGRPOLoss``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os as _os
import sys as _sys

__version__ = "0.1.0"

# `kernels/` sits at the repository root and is installed as `vpgea.kernels` (pyproject's package-dir). In a source
# checkout (editable install or plain `python -m` from the root) `vpgea/kernels/` does not exist, so register the root
# folder under that name. The guard matters: in a wheel install `vpgea/kernels/` exists and the folder beside the
# package would be site-packages/kernels, the unrelated PyPI package.
_here = _os.path.dirname(_os.path.abspath(__file__))
_src_kernels = _os.path.join(_os.path.dirname(_here), "kernels")
if (
    "vpgea.kernels" not in _sys.modules
    and not _os.path.isdir(_os.path.join(_here, "kernels"))
    and _os.path.isfile(_os.path.join(_src_kernels, "__init__.py"))
):
    _spec = importlib.util.spec_from_file_location(
        "vpgea.kernels", _os.path.join(_src_kernels, "__init__.py"), submodule_search_locations=[_src_kernels]
    )
    _mod = importlib.util.module_from_spec(_spec)
    _sys.modules["vpgea.kernels"] = _mod
    _spec.loader.exec_module(_mod)
    kernels = _mod

_LAZY = {
    "token_logprobs": "vpgea.logprobs",
    "vpgea_loss": "vpgea.losses",
    "vpgea_loss_fused_linear": "vpgea.losses",
    "grpo_loss": "vpgea.losses",
    "PolicyModel": "vpgea.policy",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "nn":
        return importlib.import_module("vpgea.nn")
    raise AttributeError(f"module 'vpgea' has no attribute {name!r}")

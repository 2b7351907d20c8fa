"""Nothing at the repository root may shadow a module that a dependency imports.

The README's commands run from the checkout, where Python puts the current directory first on ``sys.path``. When the
Triton kernels lived in a root ``kernels/`` package, transformers 5.25 (which imports PyPI's ``kernels`` at start-up)
got ours instead, and both README commands failed on a fresh machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {"vpgea", "tests", "benchmarks"}  # the only root folders whose modules may be loaded from the checkout

# What a run does first (import the stack, build and run a tiny Hugging Face model); then each loaded module's file.
_PROBE = """
import json, sys
try:
    import torch, transformers, triton
    from transformers import LlamaConfig, LlamaForCausalLM
    m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
    m(torch.tensor([[1, 2]]))
finally:
    print(json.dumps({k: getattr(v, "__file__", None) for k, v in list(sys.modules.items())}))
"""


def probe(root: Path) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run the probe with ``root`` as the working directory (with ``-c``, as with ``-m``, it comes first on
    ``sys.path``). Returns the process and ``{module: file}`` for the modules loaded from files under ``root``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, capture_output=True, text=True, timeout=300,
                          env=env)
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    # Relative pseudo-paths (torch.ops, torch.classes) are not files; installed packages are not the checkout's, even
    # where the environment itself lives under the root (CI's .ci-venv).
    return proc, {k: f for k, f in files.items() if f and os.path.isabs(f) and Path(f).is_relative_to(root)
                  and not {"site-packages", "dist-packages"} & set(Path(f).parts)}


def test_dependencies_load_nothing_from_the_checkout():
    proc, files = probe(ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bad = {k: f for k, f in files.items() if Path(f).relative_to(ROOT).parts[0] not in OURS}
    assert not bad, f"modules loaded from the repository root instead of their installed packages: {bad}"


def test_the_probe_catches_a_shadowing_package(tmp_path):
    # The check itself works: with a root `kernels/__init__.py` (the old layout) transformers gets ours and fails.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    proc, files = probe(tmp_path.resolve())
    assert "kernels" in files


def test_no_root_entry_is_named_like_an_installed_module():
    installed = packages_distributions()  # {top-level import name: [distributions providing it]}
    clashes = []
    for entry in ROOT.iterdir():
        if entry.name.startswith("."):
            continue
        regular = (entry.is_dir() and (entry / "__init__.py").is_file()) or entry.suffix in (".py", ".so", ".pyd")
        name = entry.name.split(".")[0]
        # A folder without __init__.py is at most a namespace-package portion, which any installed regular package of
        # the same name outranks; only regular packages and modules shadow.
        if regular and name in installed and set(installed[name]) != {"vpgea"}:
            clashes.append(f"{entry.name} (installed by {', '.join(installed[name])})")
    assert not clashes, f"root entries that shadow installed modules: {clashes}"

"""Record the per-step metrics that ``tests/test_step.py::test_per_step_losses_match_the_committed_golden_file``
compares with (torchtitan's habit): 4 toy steps of VPG-EA and grpo-lp on tiny settings.

    VPGEA_CACHE=/tmp/golden-cache python tests/golden/record_toy_steps.py

Re-record only when a change is meant to change the numbers (the toy task, U, a normaliser), and say so in the commit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ARGS = ["--toy-sft-steps", "20", "--toy-min-accuracy", "0", "--questions-per-step", "2", "--group-size", "3",
        "--prior-samples", "2", "--max-new-tokens", "24", "--eval-limit", "2", "--rollout-batch-size", "64",
        "--lr", "1e-4", "--no-baseline", "--max-steps", "4"]
KEYS = ("step", "loss", "reward_mean", "prior_len", "posterior_len", "grad_norm", "kl", "gate_frac")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from vpgea import train

    out = {}
    for mode, sub in (("vpgea", "vpgea"), ("grpo-lp", "grpo_lp")):
        with tempfile.TemporaryDirectory() as d:
            assert train.main([*ARGS, "--mode", mode, "--output-dir", d]) == 0
            rows = [json.loads(line) for line in (Path(d) / sub / "metrics.jsonl").read_text().splitlines()]
        out[mode] = [{k: r[k] for k in KEYS} for r in rows]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    path = Path(__file__).with_name("toy_steps.json")
    path.write_text(json.dumps({"recorded_at": commit, "args": ARGS, "steps": out}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

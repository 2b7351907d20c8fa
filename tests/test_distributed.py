"""Scale-out on CPU: FSDP2 over gloo with 2 processes under torchrun, against one process with the same global batch.

Each run goes through ``python -m vpgea.train`` exactly as a user launches it. The toy warm start is trained once
(20 SFT steps, cached for the module) by the single-process run; the torchrun ranks load it from the same cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

_ROOT = Path(__file__).resolve().parents[1]
# Four questions per step (two per rank), short responses, a tiny warm start; no grpo-lp baseline.
ARGS = ["--toy-sft-steps", "20", "--toy-min-accuracy", "0", "--questions-per-step", "4", "--group-size", "3",
        "--prior-samples", "2", "--max-new-tokens", "24", "--eval-limit", "6", "--eval-samples", "1",
        "--rollout-batch-size", "64", "--lr", "1e-3", "--no-baseline", "--device", "cpu"]


def _run(cmd: list[str], cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "VPGEA_CACHE": str(cache), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(_ROOT)}
    env.pop("TRITON_INTERPRET", None)  # CPU runs use the torch reference path; no kernels are interpreted here
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=_ROOT)


def _single(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "vpgea.train", *args], cache)


def _torchrun(args: list[str], cache: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 "-m", "vpgea.train", *args], cache)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "vpgea" / "metrics.jsonl").read_text().splitlines()]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no safetensors in {ckpt}"
    return out


def _assert_close_runs(a: Path, b: Path, step: int) -> None:
    """Per-step metrics and the checkpoint weights of runs ``a`` and ``b`` agree."""
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        # The same rollouts (seeded per question, whichever rank draws them) and the same losses; only the packing
        # and the reduction order differ, so the numbers agree to float32 rounding.
        for k in ("prior_len", "posterior_len", "gen_tokens", "acc_prior", "acc_posterior"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
        for k in ("loss", "reward_mean", "kl", "gate_frac", "cross_view_pass", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (k, ra[k], rb[k])
    wa, wb = _weights(a / "vpgea" / f"checkpoint-{step}"), _weights(b / "vpgea" / f"checkpoint-{step}")
    assert set(wa) == set(wb)
    # AdamW steps each weight by lr * m / (sqrt(v) + eps): where a gradient is near eps (1e-8) the step's size is
    # sensitive to the gradient's last bits, which the ranks' reduction order changes (measured: 2 of 16384 elements
    # of a matrix off by up to 6e-5 after 2 steps at lr 1e-3). So: every element within two steps (2 lr), and all but
    # 0.1% of each tensor within 1e-5.
    for name in wa:
        diff = (wa[name].float() - wb[name].float()).abs()
        assert float(diff.max()) <= 2e-3, (name, float(diff.max()))
        assert float((diff > 1e-5 + 1e-4 * wb[name].float().abs()).float().mean()) <= 1e-3, name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two ranks, the same 2 steps from the same warm start; checkpoints after each step."""
    root = tmp_path_factory.mktemp("dist")
    cache = root / "cache"
    single, dist = root / "single", root / "dist"
    common = [*ARGS, "--max-steps", "2", "--save-every", "1", "--keep-last", "2"]
    _ok(_single([*common, "--output-dir", str(single)], cache))
    proc = _torchrun([*common, "--output-dir", str(dist)], cache)
    _ok(proc)
    return root, cache, single, dist, proc


def test_two_ranks_equal_one_process(runs):
    root, cache, single, dist, proc = runs
    _assert_close_runs(single, dist, step=2)
    # Training moved the weights (the comparison is not between two copies of the warm start).
    from safetensors.torch import load_file

    warm = {}
    for f in next(cache.glob("toy-*")).glob("*.safetensors"):
        warm.update(load_file(f))
    trained = _weights(dist / "vpgea" / "checkpoint-2")
    assert max(float((trained[k] - warm[k]).abs().max()) for k in trained if k in warm) > 1e-4
    # Rank 0 alone writes the run's files; the evaluation gathered every rank's problems into one file.
    summary = json.loads((dist / "summary.json").read_text())
    assert summary["vpgea"]["num_responses"] == 6 and summary["before"]["num_responses"] == 6
    assert not list(dist.glob("*.rank*.jsonl"))
    assert len((dist / "eval_vpgea.jsonl").read_text().splitlines()) == 6
    assert summary["before"] == json.loads((single / "summary.json").read_text())["before"]
    assert proc.stderr.count("before   |") == 1  # logged by rank 0 only


def test_checkpoint_is_hf_format_with_sharded_optimizer(runs):
    _, _, _, dist, _ = runs
    ckpt = dist / "vpgea" / "checkpoint-2"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (ckpt / "optimizer" / ".metadata").is_file()
    assert sorted(p.name for p in (ckpt / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 2
    assert not list((dist / "vpgea").glob(".tmp-*"))


def test_save_on_two_ranks_resume_on_one(runs):
    root, cache, single, dist, _ = runs
    resumed = root / "resumed"
    _ok(_single([*ARGS, "--max-steps", "2", "--save-every", "1", "--keep-last", "2", "--output-dir", str(resumed),
                 "--resume", str(dist / "vpgea" / "checkpoint-1")], cache))
    # Step 2 after a 2-rank step 1 and a 1-rank resume equals step 2 of the uninterrupted one-process run.
    got = _metrics(resumed)
    assert [r["step"] for r in got] == [2]
    ref = _metrics(single)[1]
    for k in ("loss", "reward_mean", "grad_norm"):
        assert got[0][k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), (k, got[0][k], ref[k])
    wa, wb = _weights(resumed / "vpgea" / "checkpoint-2"), _weights(single / "vpgea" / "checkpoint-2")
    # AdamW steps each weight by lr * m / (sqrt(v) + eps): where a gradient is near eps (1e-8) the step's size is
    # sensitive to the gradient's last bits, which the ranks' reduction order changes (measured: 2 of 16384 elements
    # of a matrix off by up to 6e-5 after 2 steps at lr 1e-3). So: every element within two steps (2 lr), and all but
    # 0.1% of each tensor within 1e-5.
    for name in wa:
        diff = (wa[name].float() - wb[name].float()).abs()
        assert float(diff.max()) <= 2e-3, (name, float(diff.max()))
        assert float((diff > 1e-5 + 1e-4 * wb[name].float().abs()).float().mean()) <= 1e-3, name


def test_every_rank_fails_with_a_clear_message(tmp_path):
    proc = _torchrun(["--model", str(tmp_path / "missing"), "--train-data", str(tmp_path / "x.jsonl"),
                      "--output-dir", str(tmp_path / "out")], tmp_path / "cache")
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: error: --model" in proc.stderr and "does not exist" in proc.stderr
    proc = _torchrun([*ARGS, "--questions-per-step", "3", "--output-dir", str(tmp_path / "odd")], tmp_path / "cache")
    assert proc.returncode != 0 and "multiple of the number of processes" in proc.stderr


def test_one_explicit_gpu_for_every_rank_is_refused(monkeypatch):
    # `torchrun --nproc-per-node 4 ... --device cuda:0` would put every rank on GPU 0 (NCCL then fails obscurely).
    from vpgea.distributed import init_distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match=r"(?s)rank 1: --device cuda:0 names one GPU .* \(here cuda:1\)"):
        init_distributed("cuda:0")


def test_rng_capture_and_restore_roundtrip():
    import random

    from vpgea.checkpoint import capture_rng, restore_rng

    state = capture_rng()
    want = (random.random(), torch.rand(3))
    restore_rng(state)
    got = (random.random(), torch.rand(3))
    assert want[0] == got[0] and torch.equal(want[1], got[1])
    if torch.cuda.is_available():
        assert isinstance(state["cuda"], torch.Tensor)  # this device's state only

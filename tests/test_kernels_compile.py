"""The Triton kernels compile for real GPUs, checked on a machine without one.

CPU tests run the kernels under the interpreter, which never lowers them. Here each kernel is compiled ahead of time
for Hopper (sm_90) and Ampere (sm_80) with the launcher's GPU tile config (``tests/_aot_compile.py``, in a process
without ``TRITON_INTERPRET``), and the PTX is checked for what the design relies on: tensor-core MMAs (wgmma on
sm_90) and software-pipelined asynchronous loads (``cp.async``), within one SM's shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(_ROOT / "tests" / "_aot_compile.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0 and "ASTSource" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this triton has no ahead-of-time compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_all_variants_compiled(compiled):
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in compiled} == {
        (k, d, a) for k in ("forward", "dlogits") for d in ("bf16", "fp32") for a in (90, 80)
    } | {(k, "fp32", a) for k in ("loss_forward", "loss_backward") for a in (90, 80)}


def test_loss_kernels_lower(compiled):
    # The VPG-EA loss reductions are bandwidth-bound loops: they need no MMA, only to lower and fit an SM.
    for r in compiled:
        if r["kernel"].startswith("loss_"):
            assert r["ptx_bytes"] > 0 and r["shared"] <= 227 * 1024, r


def test_tensor_cores_and_pipelined_loads(compiled):
    for r in (r for r in compiled if not r["kernel"].startswith("loss_")):
        name = f"{r['kernel']} {r['dtype']} sm_{r['arch']}"
        if r["dtype"] == "bf16":
            assert (r["wgmma"] if r["arch"] == 90 else r["mma_sync"]) > 0, f"{name}: tensor cores unused"
        assert r["cp_async"] > 0, f"{name}: loads are not software-pipelined (no cp.async)"
        assert r["shared"] <= 227 * 1024, f"{name}: {r['shared']} B of shared memory exceeds an SM"

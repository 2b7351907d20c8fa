"""Ahead-of-time compile of the Triton kernels for GPU targets; prints JSON. Run in a process *without*
TRITON_INTERPRET (under the interpreter ``@triton.jit`` yields interpreted functions that cannot be lowered)."""

from __future__ import annotations

import json
import re
import sys
import warnings

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vpgea.kernels import token_logprobs as K
from vpgea.kernels import vpgea_loss as L

_PTR = {"bf16": "*bf16", "fp32": "*fp32"}
_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compile_one(kernel: str, dtype: str, arch: int, softcap: bool = False) -> dict:
    cfg = K._config(16384, 151936, 1536, _DTYPE[dtype])
    p = _PTR[dtype]
    if kernel == "forward":
        sig = {"H": p, "W": p, "B": p, "Y": "*i64", "S": "*fp32", "M_out": "*fp32", "L_out": "*fp32",
               "T_out": "*fp32", "E_out": "*fp32", "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
               "stride_w": "i32", "inv_t_scalar": "fp32", "v_per_split": "i32", "NUM_SPLITS": "i32",
               "cap_pre": "fp32", "cap": "fp32"}
        fn = K._token_logprobs_fwd_kernel
        extra = {}
    else:
        sig = {"H": p, "W": p, "B": p, "Y": "*i64", "S": "*fp32", "LSE": "*fp32", "MU": "*fp32", "G": "*fp32",
               "GE": "*fp32", "DZ": p, "N": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
               "stride_dz": "i32", "inv_t_scalar": "fp32", "v_lo": "i32", "v_hi": "i32", "cap_pre": "fp32",
               "cap": "fp32", "logit_scale": "fp32"}
        fn = K._token_logprobs_dlogits_kernel
        extra = {}
    consts = dict(**extra, HAS_BIAS=True, HAS_TEMP=True, WITH_ENTROPY=True, DOT_FP32=False, IEEE=dtype == "fp32",
                  **{k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}, HAS_SOFTCAP=softcap)
    sig.update({k: "constexpr" for k in consts})
    # The 16-byte divisibility the JIT infers at launch for aligned pointers and strides (D = 1536 here).
    aligned = [k for k, v in sig.items() if v.startswith("*")] + ["D", "stride_h", "stride_w"]
    keys = list(sig)
    attrs = {(keys.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    ptx = k.asm["ptx"]
    return dict(kernel=kernel, dtype=dtype, arch=arch, softcap=softcap, shared=k.metadata.shared,
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"mma\.sync", ptx)),
                cp_async=len(re.findall(r"cp\.async", ptx)))


def compile_loss(kernel: str, arch: int) -> dict:
    """The VPG-EA loss segment reductions (fp32 log-probs, "token" normalisation: the most code)."""
    if kernel == "loss_forward":
        sig = {"Q": "*fp32", "P": "*fp32", "A": "*fp32", "CU": "*i32", "OUT": "*fp32", "S": "i32", "beta": "fp32",
               "scale": "fp32", "inv_s": "fp32"}
        fn, consts = L._vpgea_loss_fwd_kernel, dict(NORMALIZE=1, BLOCK=L._BLOCK)
    else:
        sig = {"GQ": "*bf16", "GP": "*fp32", "A": "*fp32", "CU": "*i32", "G": "*fp32", "beta": "fp32",
               "scale": "fp32"}
        fn, consts = L._vpgea_loss_bwd_kernel, dict(NORMALIZE=1, NEED_Q=True, NEED_P=True, BLOCK=L._BLOCK)
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, num_stages=1))
    return dict(kernel=kernel, dtype="fp32", arch=arch, shared=k.metadata.shared, wgmma=0, mma_sync=0,
                cp_async=len(re.findall(r"cp\.async", k.asm["ptx"])), ptx_bytes=len(k.asm["ptx"]))


if __name__ == "__main__":
    if sys.argv[1:] == ["--softcap"]:  # the softcapping variants only (tests/test_token_logprobs.py)
        json.dump([compile_one(kern, "bf16", 90, softcap=True) for kern in ("forward", "dlogits")], sys.stdout)
        sys.exit(0)
    out = [compile_one(kern, dt, arch) for kern in ("forward", "dlogits") for dt in ("bf16", "fp32")
           for arch in (90, 80)]
    out += [compile_loss(kern, arch) for kern in ("loss_forward", "loss_backward") for arch in (90, 80)]
    json.dump(out, sys.stdout)

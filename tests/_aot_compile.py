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

_PTR = {"bf16": "*bf16", "fp32": "*fp32"}
_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def compile_one(kernel: str, dtype: str, arch: int) -> dict:
    cfg = K._config(16384, 151936, 1536, _DTYPE[dtype])
    p = _PTR[dtype]
    if kernel == "forward":
        sig = {"H": p, "W": p, "B": p, "Y": "*i64", "S": "*fp32", "M_out": "*fp32", "L_out": "*fp32",
               "T_out": "*fp32", "E_out": "*fp32", "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
               "stride_w": "i32", "inv_t_scalar": "fp32", "v_per_split": "i32", "NUM_SPLITS": "i32"}
        fn = K._token_logprobs_fwd_kernel
        extra = {}
    else:
        sig = {"H": p, "W": p, "B": p, "Y": "*i64", "S": "*fp32", "LSE": "*fp32", "MU": "*fp32", "G": "*fp32",
               "GE": "*fp32", "DZ": p, "N": "i32", "D": "i32", "stride_h": "i32", "stride_w": "i32",
               "stride_dz": "i32", "inv_t_scalar": "fp32", "v_lo": "i32", "v_hi": "i32"}
        fn = K._token_logprobs_dlogits_kernel
        extra = {}
    consts = dict(**extra, HAS_BIAS=True, HAS_TEMP=True, WITH_ENTROPY=True, DOT_FP32=False, IEEE=dtype == "fp32",
                  **{k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")})
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
    return dict(kernel=kernel, dtype=dtype, arch=arch, shared=k.metadata.shared,
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"mma\.sync", ptx)),
                cp_async=len(re.findall(r"cp\.async", ptx)))


if __name__ == "__main__":
    out = [compile_one(kern, dt, arch) for kern in ("forward", "dlogits") for dt in ("bf16", "fp32")
           for arch in (90, 80)]
    json.dump(out, sys.stdout)

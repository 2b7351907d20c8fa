"""vpgea.integrations.trl against the installed TRL (the dev extra): its fused log-prob kernel call, its trainers.

TRL's ``ChunkedLogProbFunction`` runs on the CPU (torch tiles instead of its Triton fold), so everything here runs
without a GPU; models and tokenizers are built in code (``vpgea.toy``'s tokenizer, tiny Llama / Gemma-2 / Cohere).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

trl = pytest.importorskip("trl")
utils = pytest.importorskip("trl.trainer.utils")
if not hasattr(utils, "_ChunkedLogProbFunction"):
    pytest.skip("these tests drive TRL >= 1.14 (the chunked log-prob call)", allow_module_level=True)

import vpgea.logprobs as lp_mod  # noqa: E402
from vpgea.integrations import trl as vt  # noqa: E402

ORIGINAL = utils._ChunkedLogProbFunction
KIND = vt._call_kind(ORIGINAL)
ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture
def patched():
    replaced = vt.patch_trl(impl="torch")
    yield replaced
    vt.unpatch_trl(replaced)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the public ``vpgea.token_logprobs`` (the adapter looks it up at call time)."""
    calls = []
    real = lp_mod.token_logprobs

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lp_mod, "token_logprobs", counting)
    return calls


def _call(fn, kind, h, w, b, y, temperature, softcap, scale, outputs):
    if kind == "plain":
        return fn.apply(h, w, y, temperature, 64, softcap, scale)
    if kind == "bias":
        return fn.apply(h, w, b, y, temperature, 64, softcap, scale)
    return fn.apply(h, w, b, y, temperature, 64, softcap, scale, outputs)


def _gold(h, w, b, y, temperature, softcap, scale):
    z = F.linear(h.double(), w.double(), None if b is None else b.double()) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ls = torch.log_softmax(z / temperature, -1)
    lp = ls.gather(-1, y[:, None])[:, 0]
    return lp, -(ls.exp() * ls).sum(-1), torch.logsumexp(2 * ls, -1), (z / temperature).mean(-1), ls.argmax(-1) == y


@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (5.0, 0.25), (30.0, 1.7)])
def test_adapter_matches_trl_kernel(softcap, scale):
    """Every output and gradient of TRL's kernel call, against TRL's own kernel and a float64 gold: vpgea's error at
    most twice TRL's (fp32, CPU), plus a floor of a few fp32 ulps of the value."""
    g = torch.Generator().manual_seed(0)
    n, v, d = 45, 157, 32
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * d**-0.5 * 3
    b = torch.randn(v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[:6] = F.linear(h[:6], w, b).argmax(-1)  # some targets are the argmax, for is_top1
    gl, ge = torch.randn(n, generator=g), torch.randn(n, generator=g)
    runs = []
    for fn in (vt.VpgeaChunkedLogProb(ORIGINAL, impl="torch"), ORIGINAL):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        out = _call(fn, KIND, *leaves, y, 0.8, softcap, scale, ALL_OUTPUTS)
        ((out[0] * gl).sum() + (out[1] * ge).sum()).backward()
        runs.append((out, [t.grad for t in leaves]))
    (ours, our_grads), (theirs, their_grads) = runs
    leaves = [t.double().requires_grad_() for t in (h, w, b)]
    gold = _gold(*leaves, y, 0.8, softcap, scale)
    ((gold[0] * gl.double()).sum() + (gold[1] * ge.double()).sum()).backward()
    gold_grads = [t.grad for t in leaves]
    assert ours[4].dtype == torch.bool and torch.equal(ours[4], theirs[4]) and torch.equal(ours[4], gold[4])
    assert ours[4][:6].all()
    for a, t, r in zip(list(ours[:4]) + our_grads, list(theirs[:4]) + their_grads, list(gold[:4]) + gold_grads):
        assert a.dtype == t.dtype and a.shape == t.shape
        err, trl_err = (a.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * trl_err + 8 * 2**-24 * r.abs().max().item(), (err, trl_err)


def test_adapter_requested_outputs_only():
    h, w, y = torch.randn(7, 16), torch.randn(11, 16), torch.randint(0, 11, (7,))
    fn = vt.VpgeaChunkedLogProb(ORIGINAL, impl="torch")
    if KIND == "outputs":
        out = fn.apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs",))
        assert out[0].shape == (7,) and all(o is None for o in out[1:])
        out = fn.apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs", "mean_logits"))
        assert out[3] is not None and out[1] is None and out[2] is None and out[4] is None
        with pytest.raises(ValueError, match=r"per-token outputs \['top5'\], which vpgea does not compute"):
            fn.apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs", "top5"))


@pytest.mark.parametrize("kind", ["plain", "bias"])
def test_older_trl_calls(kind):
    """TRL 1.7-1.13's call (no bias; returns (logprobs, entropy)) and 1.14-1.15's (with bias): the adapter reads
    the signature from the class it replaces. Stand-ins with those signatures, delegating to the installed kernel."""

    class Plain(torch.autograd.Function):
        @staticmethod
        def forward(ctx, last_hidden, weight, targets, temperature, chunk_size, final_logit_softcapping=None,
                    logit_scale=1.0):
            raise AssertionError("replaced")

    class WithBias(torch.autograd.Function):
        @staticmethod
        def forward(ctx, last_hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                    logit_scale=1.0):
            raise AssertionError("replaced")

    fake = {"plain": Plain, "bias": WithBias}[kind]
    adapter = vt.VpgeaChunkedLogProb(fake, impl="torch")
    assert adapter.kind == kind
    h, w, b, y = torch.randn(9, 16), torch.randn(23, 16), torch.randn(23), torch.randint(0, 23, (9,))
    b = None if kind == "plain" else b
    got = _call(adapter, kind, h, w, b, y, 0.7, 4.0, 0.5, None)
    assert isinstance(got, tuple) and len(got) == 2
    want = _gold(h, w, b, y, 0.7, 4.0, 0.5)
    for a, r in zip(got, want[:2]):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def _tiny_llama(tmp_path, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpgea import toy

    tok = toy.build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    torch.manual_seed(0)
    path = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), tok


def _train_grpo(path, tok, out_dir):
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": f"7 +{i} -3"} for i in range(1, 9)])

    def reward(completions, **kwargs):  # longer is better: any signal does
        return [len(c) / 10.0 for c in completions]

    args = trl.GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, max_steps=2, learning_rate=1e-2, beta=0.04, temperature=0.9,
                          report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", bf16=False,
                          disable_tqdm=True, seed=0)
    trainer = trl.GRPOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    head0 = trainer.model.lm_head.weight.detach().clone()
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    return head0, trainer.model.lm_head.weight.detach().clone(), logs


@pytest.mark.filterwarnings("ignore")
def test_grpo_trainer_trains_through_vpgea(tmp_path, spy):
    """A real trl.GRPOTrainer (tiny Llama, KL against a reference model, 2 steps, CPU): with patch_trl, every
    log-prob pass (policy and reference) goes through vpgea.token_logprobs, the head is trained, and the run matches
    TRL's own kernel step for step."""
    path, tok = _tiny_llama(tmp_path)
    head0_ref, head_ref, logs_ref = _train_grpo(path, tok, tmp_path / "trl")
    assert not spy
    replaced = vt.patch_trl(impl="torch")
    try:
        head0, head, logs = _train_grpo(path, tok, tmp_path / "vpgea")
    finally:
        vt.unpatch_trl(replaced)
    assert "trl.trainer.utils._ChunkedLogProbFunction" in replaced
    # 2 steps x (reference pass + policy pass); the policy pass asks for the entropy
    assert len(spy) >= 4 and any(k.get("return_entropy") for k in spy)
    assert torch.equal(head0, head0_ref) and (head - head0).abs().max() > 1e-4  # the head was updated
    assert len(logs) == len(logs_ref) == 2
    for ours, theirs in zip(logs, logs_ref):
        for key in ("loss", "kl", "entropy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    torch.testing.assert_close(head, head_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_sft_trainer_metrics_through_vpgea(tmp_path, spy):
    """SFT asks for the entropy and is_top1 (its token accuracy): the same metrics as TRL's kernel."""
    from datasets import Dataset

    path, tok = _tiny_llama(tmp_path, tie=True)
    ds = Dataset.from_list([{"text": f"7 +{i} = {(7 + i) % 10} ; \\boxed{{ {(7 + i) % 10} }}"} for i in range(1, 9)])

    def run(out):
        args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", bf16=False,
                             disable_tqdm=True, seed=0, max_length=32)
        trainer = trl.SFTTrainer(model=path, args=args, train_dataset=ds, processing_class=tok)
        trainer.train()
        return [r for r in trainer.state.log_history if "loss" in r]

    want = run(tmp_path / "trl")
    replaced = vt.patch_trl(impl="torch")
    try:
        got = run(tmp_path / "vpgea")
    finally:
        vt.unpatch_trl(replaced)
    assert spy
    for ours, theirs in zip(got, want):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key


def _tiny_model(kind):
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config

    if kind == "gemma2":  # final_logit_softcapping = 30 by default; made small so that it bites
        cfg = Gemma2Config(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,
                           max_position_embeddings=64)
    else:  # Cohere multiplies its logits by logit_scale
        cfg = CohereConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, logit_scale=0.3, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_fused_head_of_softcapped_and_scaled_models(kind):
    """TRL's add_fused_lm_head reads final_logit_softcapping / logit_scale from the config; patched, the per-token
    log-probs and entropies equal the model's own logits' (materialised, float64) and TRL's kernel's."""
    model = _tiny_model(kind)
    utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        theirs = model(input_ids=ids, labels=labels, fused_lm_head=True)
        replaced = vt.patch_trl(impl="torch")
        try:
            ours = model(input_ids=ids, labels=labels, fused_lm_head=True)
        finally:
            vt.unpatch_trl(replaced)
        logits = model(input_ids=ids).logits[:, :-1].double() / 0.7  # the model applies its scale / softcap
    ls = torch.log_softmax(logits, -1)
    mask = labels[:, 1:] != -100
    want = torch.where(mask, ls.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0], 0.0)
    want_ent = torch.where(mask, -(ls.exp() * ls).sum(-1), 0.0)
    torch.testing.assert_close(ours.log_probs.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy.double(), want_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=1e-5, atol=1e-5)


def test_zero3_head_gathered_again_in_backward(monkeypatch):
    """Under ZeRO-3 the head is partitioned (numel 0) outside TRL's gather; the adapter keeps the parameter, not the
    gathered data, and gathers it again for its backward. A stand-in for DeepSpeed's partitioning: the parameter's
    data is empty except inside maybe_gather_lm_head_ctx."""
    import contextlib

    g = torch.Generator().manual_seed(3)
    full = torch.randn(29, 16, generator=g)
    head = torch.nn.Parameter(torch.empty(0))
    entered = []

    @contextlib.contextmanager
    def gather(*params):
        entered.append(len(params))
        head.data = full
        try:
            yield
        finally:
            head.data = torch.empty(0)

    monkeypatch.setattr(utils, "maybe_gather_lm_head_ctx", gather)
    monkeypatch.setattr(vt, "_zero3_enabled", lambda: True)
    h = torch.randn(8, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 29, (8,), generator=g)
    adapter = vt.VpgeaChunkedLogProb(ORIGINAL, impl="torch")
    with gather(head):  # as TRL's _fused_forward calls the kernel
        out = _call(adapter, KIND, h, head, None, y, 1.0, None, 1.0, ("log_probs", "entropy"))
    assert head.numel() == 0  # partitioned again before the backward
    # autograd.grad, not backward(): accumulating a full-size gradient into the partitioned parameter is DeepSpeed's
    # hooks' business, which the stand-in does not mimic
    d_h, d_head = torch.autograd.grad(out[0].sum() + out[1].sum(), [h, head])
    assert len(entered) == 2 and head.numel() == 0
    w = full.clone().requires_grad_()
    ref = lp_mod.token_logprobs(h, w, y, return_entropy=True, impl="torch")
    r_h, r_w = torch.autograd.grad(ref[0].sum() + ref[1].sum(), [h, w])
    torch.testing.assert_close(d_head, r_w)
    torch.testing.assert_close(d_h, r_h)


def test_patch_errors_and_unpatch(monkeypatch, patched):
    with pytest.raises(RuntimeError, match="already patched"):
        vt.patch_trl()
    assert isinstance(utils._ChunkedLogProbFunction, vt.VpgeaChunkedLogProb)
    vt.unpatch_trl(patched)
    assert utils._ChunkedLogProbFunction is ORIGINAL
    patched.clear()
    # A TRL with neither hook: the error names the version.
    monkeypatch.setattr(vt, "_import_trainer_modules", lambda: None)
    monkeypatch.setattr(trl, "__version__", "9.9.9")
    for name in list(sys.modules):
        if name == "trl.trainer.utils" or name == "trl.trainer.grpo_trainer":
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    with pytest.raises(RuntimeError, match=r"found nothing to replace in TRL 9\.9\.9"):
        vt.patch_trl()


def test_liger_loss_swap_for_trl_1_8_to_1_13(tmp_path, monkeypatch):
    """TRL 1.8-1.12 build ``self.liger_loss = LigerFusedLinearGRPOLoss(...)`` (1.13: ``FusedLinearGRPOLoss``) in
    GRPOTrainer.__init__ after checking ``is_liger_kernel_available``: a module with that shape is patched so the
    trainer builds vpgea's loss (and needs no liger-kernel)."""
    from vpgea.nn import FusedLinearGRPOLoss

    for cls_name in ("LigerFusedLinearGRPOLoss", "FusedLinearGRPOLoss"):
        src = tmp_path / f"fake_grpo_{cls_name}.py"
        src.write_text(
            "def is_liger_kernel_available():\n    return False\n\n\n"
            "class GRPOTrainer:\n"
            "    def __init__(self, beta):\n"
            "        if not is_liger_kernel_available():\n"
            "            raise ImportError('liger')\n"
            f"        self.liger_loss = {cls_name}(beta=beta, use_ref_model=False)\n"
        )
        import importlib.util

        spec = importlib.util.spec_from_file_location("trl.trainer.grpo_trainer", src)
        fake = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fake)
        monkeypatch.setitem(sys.modules, "trl.trainer.grpo_trainer", fake)
        monkeypatch.setattr(vt, "_import_trainer_modules", lambda: None)
        replaced = vt.patch_trl()
        try:
            assert f"trl.trainer.grpo_trainer.{cls_name}" in replaced
            trainer = fake.GRPOTrainer(beta=0.0)
            assert isinstance(trainer.liger_loss, FusedLinearGRPOLoss) and trainer.liger_loss.beta == 0.0
        finally:
            vt.unpatch_trl(replaced)
        assert getattr(fake, cls_name, None) is None and not fake.is_liger_kernel_available()


@pytest.mark.filterwarnings("ignore")
def test_example_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo_swap.py"
    spec = importlib.util.spec_from_file_location("trl_grpo_swap", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(steps=1)
    assert out["vpgea_calls"] >= 2 and out["head_moved"] > 0 and len(out["losses"]) == 1
    assert utils._ChunkedLogProbFunction is ORIGINAL  # the example undoes its patch

"""The vLLM rollout engine.

Without vllm (CI, CPU): a small fake ``vllm`` module stands in, recording what ``VLLMEngine`` hands it (constructor
kwargs, prompts, SamplingParams, sleep/wake calls, ``load_weights`` pairs) and enforcing the rules the real one has
(no generation while asleep, no double sleep or double wake of an allocation tag, no weight writes into released
memory). With vllm and a GPU, the last test compares the real engine against the transformers engine.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import random
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from vpgea.engines import GenerationOutput, RolloutEngine, make_engine

EOS = 1
VOCAB = 12


# --- the fake vllm ----------------------------------------------------------------------------------------------------


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw
        for k, v in kw.items():
            setattr(self, k, v)


class OldSamplingParams(FakeSamplingParams):
    """A vLLM without ``detokenize``."""

    def __init__(self, **kw):
        if "detokenize" in kw:
            raise TypeError("unexpected keyword argument 'detokenize'")
        super().__init__(**kw)


class FakeVLLMModel:
    """Stands in for the vLLM ``nn.Module``: records every ``(name, tensor)`` it is given."""

    def __init__(self, llm):
        self.llm = llm
        self.loaded: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights):
        assert "weights" not in self.llm.released, "weights written into released (slept) memory"
        names = set()
        for name, t in weights:
            self.loaded.append((name, t.detach().clone()))
            names.add(name)
        self.llm.events.append(("load_weights", len(names)))
        return names


def _fake_sample(prompt, sp, call_no):
    """Deterministic stand-in for sampling: a function of (prompt, seed), or of the prompt alone when greedy."""
    if sp.temperature == 0.0:
        key = (tuple(prompt), "greedy")
    else:
        key = (tuple(prompt), getattr(sp, "seed", None), call_no if getattr(sp, "seed", None) is None else 0)
    rng = random.Random(repr(key))
    ids = []
    for _ in range(sp.max_tokens):
        t = rng.randrange(VOCAB)
        ids.append(t)
        if t in sp.stop_token_ids:
            return ids, "stop", (None if t == EOS else t)
    return ids, "length", None


class FakeLLM:
    instances: list[FakeLLM] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list, list]] = []
        self.events: list[tuple] = []
        self.released: set[str] = set()
        self.script = None  # [(token_ids, finish_reason, stop_reason)] per request, for exact conversions
        self.model = FakeVLLMModel(self)
        # Where an in-process engine exposes its model: llm.llm_engine.model_executor.driver_worker.model_runner.model
        runner = SimpleNamespace(model=self.model)
        executor = SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner))
        self.llm_engine = SimpleNamespace(model_executor=executor)
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        assert not self.released, f"generate while {self.released} released"
        assert use_tqdm is False
        params = list(sampling_params) if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        self.calls.append((prompts, params))
        outs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            ids, fr, sr = self.script[i] if self.script else _fake_sample(p["prompt_token_ids"], sp, len(self.calls))
            completion = SimpleNamespace(token_ids=tuple(ids), finish_reason=fr, stop_reason=sr)
            outs.append(SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], outputs=[completion]))
        return outs

    def sleep(self, level=1):
        assert self.kwargs.get("enable_sleep_mode"), "sleep without enable_sleep_mode"
        assert not self.released, "vLLM's allocator would release released memory a second time"
        self.released = {"weights", "kv_cache"}
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        tags = list(tags) if tags is not None else ["weights", "kv_cache"]
        assert set(tags) <= self.released, f"mapping {tags} again (released: {self.released})"
        self.released -= set(tags)
        self.events.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))


class RpcOnlyLLM(FakeLLM):
    """A multiprocess engine: no in-process model, weights go through collective_rpc to a worker."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.llm_engine = SimpleNamespace()
        self.worker = SimpleNamespace(get_model=lambda: self.model)
        self.rpc_calls = 0

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpc_calls += 1
        for name, t in args[0]:
            assert t.device.type == "cpu"
        return [method(self.worker, *args, **(kwargs or {}))]


class UnreachableLLM(FakeLLM):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.llm_engine = SimpleNamespace()


class V1CoreLLM(FakeLLM):
    """An in-process V1 engine reached through engine_core.engine_core, its driver a wrapper holding ``.worker``."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=self.model))
        executor = SimpleNamespace(driver_worker=SimpleNamespace(worker=worker))
        core = SimpleNamespace(model_executor=executor)
        self.llm_engine = SimpleNamespace(engine_core=SimpleNamespace(engine_core=core))


class OldLLM(FakeLLM):
    """A vLLM whose wake_up takes no tags (all or nothing)."""

    def wake_up(self):
        super().wake_up(None)


def _fake_module(llm_cls=FakeLLM, sp_cls=FakeSamplingParams):
    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec("vllm") sees an installed vllm
    mod.LLM = llm_cls
    mod.SamplingParams = sp_cls
    return mod


@pytest.fixture
def load_engine(monkeypatch):
    """Import ``vpgea.engines.vllm`` against a fake ``vllm``; returns a function (llm_cls, sp_cls) -> module."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "x")  # recorded, so the import's setdefault is undone
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    FakeLLM.instances.clear()
    import vpgea.engines as pkg

    def load(llm_cls=FakeLLM, sp_cls=FakeSamplingParams):
        monkeypatch.setitem(sys.modules, "vllm", _fake_module(llm_cls, sp_cls))
        sys.modules.pop("vpgea.engines.vllm", None)
        return importlib.import_module("vpgea.engines.vllm")

    yield load
    sys.modules.pop("vpgea.engines.vllm", None)
    if hasattr(pkg, "vllm"):
        delattr(pkg, "vllm")


class _Tok:
    eos_token_id = EOS
    pad_token_id = 0


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


@pytest.fixture
def tiny(tmp_path):
    """A tiny random Llama whose config._name_or_path is a directory holding its config.json only (no weights)."""
    from vpgea import toy

    tok = toy.build_tokenizer()
    model = toy.build_model(toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2), tok)
    d = tmp_path / "tiny"
    model.config.save_pretrained(d)
    model.config._name_or_path = str(d)
    return model, tok, d


# --- construction -----------------------------------------------------------------------------------------------------


def test_constructor_passes_colocation_settings(load_engine, model_dir):
    mod = load_engine()
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 7]}))
    eng = mod.VLLMEngine(model_dir, _Tok(), gpu_memory_utilization=0.25, max_model_len=128, seed=3,
                         enforce_eager=True)
    kw = eng.llm.kwargs
    assert kw["model"] == str(model_dir)
    assert kw["enable_sleep_mode"] is True and kw["enable_prefix_caching"] is True
    assert kw["gpu_memory_utilization"] == 0.25 and kw["max_model_len"] == 128 and kw["seed"] == 3
    assert kw["dtype"] == "bfloat16" and kw["tensor_parallel_size"] == 1 and kw["enforce_eager"] is True
    assert "distributed_executor_backend" not in kw  # single process: vLLM's own uniprocess executor
    assert eng.stop_token_ids == [EOS, 7]  # tokenizer EOS, then the generation config's extra EOS
    assert mod.os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process engine core
    assert isinstance(eng, RolloutEngine) and not eng.is_sleeping
    assert eng.llm.events == []  # a path: nothing pushed


def test_factory_builds_it(load_engine, model_dir):
    mod = load_engine()
    eng = make_engine("vllm", str(model_dir), _Tok(), gpu_memory_utilization=0.5)
    assert isinstance(eng, mod.VLLMEngine) and eng.llm.kwargs["gpu_memory_utilization"] == 0.5


def test_external_launcher_under_torchrun(load_engine, model_dir, monkeypatch):
    mod = load_engine()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 4)
    eng = mod.VLLMEngine(model_dir, _Tok())
    assert eng.llm.kwargs["distributed_executor_backend"] == "external_launcher"
    eng = mod.VLLMEngine(model_dir, _Tok(), distributed_executor_backend="mp")  # the caller's choice wins
    assert eng.llm.kwargs["distributed_executor_backend"] == "mp"


def test_constructor_errors(load_engine, tmp_path, tiny):
    mod = load_engine()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mod.VLLMEngine(tmp_path / "nope", _Tok())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        mod.VLLMEngine(tmp_path / "empty", _Tok())
    model, tok, _ = tiny
    model.config._name_or_path = ""
    with pytest.raises(ValueError, match="_name_or_path"):
        mod.VLLMEngine(model, tok)

    class NoEos:
        eos_token_id = None

    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no stop token"):
        mod.VLLMEngine(tmp_path / "empty", NoEos())
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        mod.VLLMEngine(tmp_path / "empty", _Tok(), gpu_memory_utilization=0.0)
    assert FakeLLM.instances == []  # every error came before vLLM was started


class ReseedingLLM(FakeLLM):
    """vLLM's workers reseed the process's generators with the engine seed while starting up."""

    def __init__(self, **kwargs):
        import numpy as np

        random.seed(kwargs["seed"])
        np.random.seed(kwargs["seed"])
        torch.manual_seed(kwargs["seed"])
        super().__init__(**kwargs)


def test_construction_leaves_the_trainers_generators_alone(load_engine, model_dir):
    import numpy as np

    mod = load_engine(ReseedingLLM)
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    mod.VLLMEngine(model_dir, _Tok(), seed=0)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_unsupported_colocation_settings_are_refused(load_engine, model_dir, monkeypatch):
    mod = load_engine()
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 with one engine per trainer rank"):
        mod.VLLMEngine(model_dir, _Tok(), tensor_parallel_size=2, distributed_executor_backend="external_launcher")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(ValueError, match="expandable_segments"):
        mod.VLLMEngine(model_dir, _Tok())
    mod.VLLMEngine(model_dir, _Tok(), enable_sleep_mode=False)  # without sleep mode the setting is harmless
    assert len(FakeLLM.instances) == 1


def test_an_aborted_request_is_an_error(load_engine, model_dir):
    mod = load_engine()
    eng = mod.VLLMEngine(model_dir, _Tok())
    eng.llm.script = [([5, 6], "abort", None)]
    with pytest.raises(RuntimeError, match="finish_reason='abort'"):
        eng.generate([[3, 4]], max_new_tokens=4, seed=1)


# --- generate ---------------------------------------------------------------------------------------------------------


def test_generate_converts_prompts_and_outputs(load_engine, model_dir):
    mod = load_engine()
    eng = mod.VLLMEngine(model_dir, _Tok(), stop_token_ids=[EOS, 7])
    eng.llm.script = [
        ([5, 6, EOS], "stop", None),  # EOS kept as the last id
        ([5, 6, 8, 9], "length", None),
        ([3, 4], "stop", 7),  # a vLLM that leaves the stop id out: put back
        ([3, EOS, 4], "length", None),  # a stop id inside: cut after it
        ([2, 2, 7], "length", None),  # the last allowed token was a stop id (vLLM checks length first)
    ]
    prompts = [[10, 11], [9], [4, 5, 6], [3], [2, 3]]
    outs = eng.generate(prompts, max_new_tokens=4, temperature=0.7, top_p=0.9, seed=11)
    assert all(isinstance(o, GenerationOutput) for o in outs)
    assert [(o.token_ids, o.finish_reason) for o in outs] == [
        ([5, 6, EOS], "stop"), ([5, 6, 8, 9], "length"), ([3, 4, 7], "stop"), ([3, EOS], "stop"), ([2, 2, 7], "stop"),
    ]
    sent, params = eng.llm.calls[-1]
    assert sent == [{"prompt_token_ids": p} for p in prompts]  # token-id prompts, in order
    for sp in params:
        assert sp.n == 1 and sp.max_tokens == 4 and sp.temperature == 0.7 and sp.top_p == 0.9
        assert sp.stop_token_ids == [EOS, 7] and sp.detokenize is False


def test_seeds_propagate_and_reproduce(load_engine, model_dir):
    mod = load_engine()
    eng = mod.VLLMEngine(model_dir, _Tok())
    prompts = [[4, 5]] * 6 + [[7]] * 2
    a = eng.generate(prompts, max_new_tokens=8, seed=5)
    seeds = [sp.seed for sp in eng.llm.calls[-1][1]]
    assert seeds == mod.request_seeds(5, len(prompts)) and len(set(seeds)) == len(prompts)
    assert all(0 <= s < 2**31 for s in seeds)
    b = eng.generate(prompts, max_new_tokens=8, seed=5)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert len({tuple(o.token_ids) for o in a[:6]}) > 1  # duplicated prompts draw different samples
    eng.generate(prompts, max_new_tokens=8, seed=6)
    assert set(sp.seed for sp in eng.llm.calls[-1][1]).isdisjoint(seeds)
    eng.generate(prompts, max_new_tokens=8)  # seed=None: the engine's generator
    assert all("seed" not in sp.kw for sp in eng.llm.calls[-1][1])


def test_temperature_zero_is_greedy(load_engine, model_dir):
    mod = load_engine()
    eng = mod.VLLMEngine(model_dir, _Tok())
    prompts = [[4, 5]] * 4
    for t in (0.0, -1.0):
        outs = eng.generate(prompts, max_new_tokens=6, temperature=t, top_p=0.5, seed=1)
        for sp in eng.llm.calls[-1][1]:
            assert sp.temperature == 0.0 and sp.top_p == 1.0
        assert len({tuple(o.token_ids) for o in outs}) == 1


def test_generate_validation(load_engine, model_dir):
    mod = load_engine()
    eng = mod.VLLMEngine(model_dir, _Tok())
    assert eng.generate([], max_new_tokens=5) == []
    assert [o.token_ids for o in eng.generate([[3], [4]], max_new_tokens=0)] == [[], []]
    assert eng.llm.calls == []  # neither reached vLLM
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[3], []], max_new_tokens=3)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match="top_p"):
            eng.generate([[3]], max_new_tokens=3, top_p=top_p)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate([[3]], max_new_tokens=-1)


def test_old_vllm_without_detokenize_or_wake_tags(load_engine, model_dir):
    mod = load_engine(OldLLM, OldSamplingParams)
    eng = mod.VLLMEngine(model_dir, _Tok())
    eng.sleep()
    outs = eng.generate([[3, 4]], max_new_tokens=3, seed=0)  # wakes everything at once
    assert len(outs) == 1 and not eng.is_sleeping
    assert eng.llm.events[-1] == ("wake_up", ("weights", "kv_cache"))
    assert "detokenize" not in eng.llm.calls[-1][1][0].kw


# --- sleep / wake -----------------------------------------------------------------------------------------------------


def test_sleep_and_wake_are_idempotent(load_engine, model_dir):
    mod = load_engine()
    eng = mod.VLLMEngine(model_dir, _Tok())
    eng.wake()  # awake already: nothing
    eng.sleep()
    eng.sleep()
    assert eng.is_sleeping and eng.llm.events == [("sleep", 1)]
    eng.wake()
    eng.wake()
    assert not eng.is_sleeping and eng.llm.events[1:] == [("wake_up", ("weights", "kv_cache"))]
    eng.sleep()
    eng.generate([[3]], max_new_tokens=2, seed=0)  # generate wakes a sleeping engine
    assert eng.llm.events[-1] == ("wake_up", ("weights", "kv_cache")) and not eng.is_sleeping

    off = mod.VLLMEngine(model_dir, _Tok(), enable_sleep_mode=False)
    off.sleep()
    off.wake()
    assert off.llm.events == [] and off.llm.kwargs["enable_sleep_mode"] is False


# --- weight pushes ----------------------------------------------------------------------------------------------------


def _no_disk_writes(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were written to disk")

    import safetensors.torch
    import transformers

    monkeypatch.setattr(torch, "save", refuse)
    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", refuse)


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_update_weights_pushes_every_parameter_in_memory(load_engine, tiny, monkeypatch, tmp_path):
    from vpgea.policy import PolicyModel

    mod = load_engine()
    model, tok, d = tiny
    policy = PolicyModel.from_model(model, attn_impl="sdpa")
    _no_disk_writes(monkeypatch)
    before = _files(tmp_path)

    eng = mod.VLLMEngine(policy, tok)  # an in-memory model: its weights go in at once
    assert eng.llm.kwargs["model"] == str(d)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    pushed = dict(eng.llm.model.loaded)
    assert set(pushed) == set(expected) and len(eng.llm.model.loaded) == len(expected)  # HF names, each once
    for n, t in expected.items():
        assert torch.equal(pushed[n], t), n
    assert eng.llm.events == [("load_weights", len(expected)), ("reset_prefix_cache",)]

    # A training step: rollouts, sleep, new weights, push while asleep, wake.
    eng.wake()
    eng.generate([[3, 4]], max_new_tokens=3, seed=0)
    eng.sleep()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    eng.llm.model.loaded.clear()
    eng.llm.events.clear()
    eng.update_weights(policy)
    # The weights are mapped back before they are written; the KV cache stays released until wake().
    assert eng.llm.events == [("wake_up", ("weights",)), ("load_weights", len(expected)), ("reset_prefix_cache",)]
    assert eng.is_sleeping
    pushed = dict(eng.llm.model.loaded)
    for n, t in expected.items():
        assert torch.equal(pushed[n], t + 1.0), n
    eng.wake()
    assert eng.llm.events[-1] == ("wake_up", ("kv_cache",)) and not eng.is_sleeping

    # Push, then sleep again without a generate in between: the KV cache is mapped back before the sleep.
    eng.sleep()
    eng.update_weights(model)  # the bare Hugging Face model works too
    eng.sleep()
    assert eng.llm.events[-2:] == [("wake_up", ("kv_cache",)), ("sleep", 1)]
    assert _files(tmp_path) == before  # nothing written anywhere under the checkpoint's folder


def test_update_weights_gathers_dtensors(load_engine, model_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mod = load_engine()
    eng = mod.VLLMEngine(model_dir, _Tok())
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = torch.arange(12.0).reshape(4, 3)
        sharded = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        # Wrapper prefixes from activation checkpointing / torch.compile are stripped.
        eng.update_weights({"model._checkpoint_wrapped_module.w": sharded, "_orig_mod.b": torch.ones(2)})
    finally:
        dist.destroy_process_group()
    pushed = dict(eng.llm.model.loaded)
    assert set(pushed) == {"model.w", "b"}
    assert type(pushed["model.w"]) is torch.Tensor and torch.equal(pushed["model.w"], full)


def test_update_weights_finds_the_v1_engine_core_model(load_engine, tiny):
    mod = load_engine(V1CoreLLM)
    model, tok, _ = tiny
    eng = mod.VLLMEngine(model, tok)
    assert eng._inprocess_model() is eng.llm.model
    assert [n for n, _ in eng.llm.model.loaded] == [n for n, _ in model.named_parameters()]


def test_update_weights_rpc_fallback(load_engine, tiny):
    mod = load_engine(RpcOnlyLLM)
    model, tok, _ = tiny
    mod._RPC_CHUNK_BYTES = 4 * 16 * 16  # bytes: forces several chunks
    eng = mod.VLLMEngine(model, tok)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in eng.llm.model.loaded] == names
    assert eng.llm.rpc_calls > 1
    for (n, t), (_, p) in zip(eng.llm.model.loaded, model.named_parameters()):
        assert torch.equal(t, p.detach()), n

    # Tensor parallelism: the driver's model holds one shard, so every worker gets the weights over RPC.
    mod2 = load_engine(RpcOnlyLLM)
    tp = mod2.VLLMEngine(model, tok, tensor_parallel_size=2)
    assert tp.llm.rpc_calls >= 1 and len(tp.llm.model.loaded) == len(names)


def test_update_weights_unreachable_model_is_a_clear_error(load_engine, model_dir, tiny):
    mod = load_engine(UnreachableLLM)
    model, _, _ = tiny
    eng = mod.VLLMEngine(model_dir, _Tok())
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        eng.update_weights(model)

    class BrokenRpc(RpcOnlyLLM):
        def collective_rpc(self, *a, **k):
            raise TypeError("Object of type function is not serializable")

    mod = load_engine(BrokenRpc)
    eng = mod.VLLMEngine(model_dir, _Tok())
    with pytest.raises(RuntimeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        eng.update_weights(model)


# --- vllm missing -----------------------------------------------------------------------------------------------------


def test_without_vllm_the_errors_are_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, find_spec("vllm") is None
    monkeypatch.delitem(sys.modules, "vpgea.engines.vllm", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'vpgea\[vllm\]'"):
        importlib.import_module("vpgea.engines.vllm")
    with pytest.raises(RuntimeError, match=r"vpgea\[vllm\]"):
        make_engine("vllm", "/nonexistent", _Tok())


# --- the real thing ---------------------------------------------------------------------------------------------------


def test_real_vllm_generates_and_takes_pushed_weights(tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from vpgea import toy
    from vpgea.engines.vllm import VLLMEngine

    tok = toy.build_tokenizer()
    task = toy.ToyTask(hidden_size=128, num_layers=2, num_heads=2)  # head_dim 64: every attention backend has it
    model = toy.build_model(task, tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = model.cuda().eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng = VLLMEngine(tmp_path / "m", tok, gpu_memory_utilization=0.2, max_model_len=256, enforce_eager=True)
    vm = eng._inprocess_model()
    assert vm is not None, "the in-process vLLM model was not found; weight pushes would go through RPC"
    prompts = [[5, 6, 7], [9], [3, 4, 5, 6, 7, 8]]
    greedy = lambda: [o.token_ids for o in eng.generate(prompts, max_new_tokens=12, temperature=0.0)]  # noqa: E731
    a = greedy()
    assert all(1 <= len(t) <= 12 for t in a)
    s1 = eng.generate(prompts * 4, max_new_tokens=12, seed=3)
    s2 = eng.generate(prompts * 4, max_new_tokens=12, seed=3)
    assert [o.token_ids for o in s1] == [o.token_ids for o in s2]

    # New weights, pushed in memory while vLLM sleeps; vLLM's fused q/k/v now holds exactly them (in bf16).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    eng.sleep()
    eng.update_weights(model)
    eng.wake()
    vp = dict(vm.named_parameters())
    attn = model.model.layers[0].self_attn
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(vp["model.embed_tokens.weight"])
    assert torch.equal(vp["model.layers.0.self_attn.qkv_proj.weight"], qkv)
    assert torch.equal(vp["model.norm.weight"], model.model.norm.weight.to(vp["model.norm.weight"]))
    assert greedy() != a

    with torch.no_grad():  # the original weights back: the original greedy decodes back
        for n, p in model.named_parameters():
            p.copy_(original[n])
    eng.update_weights(model)
    assert greedy() == a

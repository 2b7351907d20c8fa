"""A vLLM rollout engine, colocated in the trainer process: ``VLLMEngine``.

Design. One in-process ``vllm.LLM`` shares the GPU with the trainer:

* weights go trainer -> vLLM without a disk round trip: ``update_weights`` walks the Hugging Face model's
  ``named_parameters()`` (gathering FSDP2 ``DTensor`` shards with ``.full_tensor()``) and feeds the ``(name, tensor)``
  pairs to the vLLM model's own ``load_weights``, which maps Hugging Face names onto its fused layers (q/k/v ->
  ``qkv_proj`` and so on) and shards them for tensor parallelism;
* ``sleep`` / ``wake`` use vLLM's sleep mode (``enable_sleep_mode=True``): level 1 offloads the weights to CPU memory
  and drops the KV cache while the trainer runs, and ``wake`` maps both back;
* prefix caching is on, so the question prefix shared by the many samples of one prompt (and by the two views of
  one question, which come in the same ``generate`` call) is computed once.

The in-process model is reached the way TRL's colocate mode reaches it
(``llm.llm_engine.model_executor.driver_worker.model_runner.model``): that attribute exists on V0 engines and on V1
engines whose engine core runs in this process, which is why this module sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
unless the caller chose otherwise. When it is missing (multiprocess engine core, tensor parallelism over worker
processes) the weights go through ``llm.collective_rpc`` instead, in CPU chunks; when neither works the error says
what to change.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from vpgea.distributed import full_tensor
from vpgea.engines.base import (  # noqa: F401 (request_seeds re-exported)
    GenerationOutput,
    check_generate_args,
    request_seeds,
    resolve_seeds,
    stop_ids,
    unwrap_model,
)

# vLLM V1 runs its engine core in a child process by default, where the model object is out of reach; in-process it
# is a plain attribute and a weight push is a device-to-device copy. vLLM reads this variable when an engine is
# built, so it must be set before the first ``LLM``; an explicit value from the caller wins.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

try:
    import vllm
except ImportError as e:  # the tests reach this with sys.modules['vllm'] = None
    raise ImportError(
        "vpgea.engines.vllm needs the vllm package, which is not installed; "
        "install the extra (pip install 'vpgea[vllm]') or use the transformers engine (--engine hf)"
    ) from e

__all__ = ["VLLMEngine", "request_seeds"]

log = logging.getLogger(__name__)

_SLEEP_LEVEL = 1  # level 2 discards the weights; see VLLMEngine.sleep for why that is not used
_TAGS = ("weights", "kv_cache")  # what vLLM's sleep mode releases, by allocation tag
_RPC_CHUNK_BYTES = 512 << 20  # bytes of weights per collective_rpc call on the multiprocess fallback
# Wrapper prefixes that activation checkpointing, torch.compile and FSDP1 insert into parameter names.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")



def _named_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_name, full tensor)`` for every parameter of ``model``, one at a time.

    model: a ``PolicyModel``, a Hugging Face causal LM (possibly FSDP2-sharded), or a mapping ``name -> tensor``.
    Sharded ``DTensor`` parameters are all-gathered one by one (a collective: every rank must push), so at most one
    full tensor is alive at a time beyond vLLM's copy. Tied weights appear once (``named_parameters`` de-duplicates
    them); vLLM's ``load_weights`` ties ``lm_head`` itself.
    """
    if isinstance(model, Mapping):
        items: Iterable = model.items()
    else:
        items = unwrap_model(model).named_parameters()
    for name, t in items:
        for prefix in _WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        yield name, full_tensor(t.detach())


def _rpc_load_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Runs inside each vLLM worker (``collective_rpc``): load ``weights`` into the worker's model."""
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    model.load_weights(weights)
    return len(weights)


class VLLMEngine:
    """Rollouts from an in-process ``vllm.LLM`` that shares the GPU with the trainer.

    model_or_path: a local Hugging Face model directory (``str`` / ``Path``), or an in-memory model (a
        ``PolicyModel`` or a Hugging Face causal LM): then vLLM loads the architecture from the model's
        ``config._name_or_path`` directory and the model's current weights are pushed in at once.
    tokenizer: supplies ``eos_token_id`` for the stop ids (vLLM loads its own copy from the directory).
    gpu_memory_utilization: fraction of the whole GPU that vLLM may take for weights, activations and KV cache. The
        trainer keeps the rest; with sleep mode vLLM holds (almost) nothing while the trainer runs.
    dtype: vLLM's compute dtype ("bfloat16", "float16", "float32", "auto").
    max_model_len: prompt + response token limit (default: the model config's).
    seed: the engine seed (requests with ``seed=None`` draw from it).
    enable_sleep_mode: allocate weights and KV cache in vLLM's sleep-mode pool so ``sleep`` can release them.
    enable_prefix_caching: reuse the KV blocks of shared prompt prefixes.
    tensor_parallel_size: GPUs per vLLM instance.
    stop_token_ids: ids that end a response (default: the tokenizer's EOS, plus the generation-config EOS).
    llm_kwargs: passed on to ``vllm.LLM`` (``enforce_eager``, ``max_num_seqs``, ``distributed_executor_backend``...).

    Under ``torchrun`` with several ranks each rank builds its own engine; ``distributed_executor_backend`` defaults
    to ``"external_launcher"`` there (as in TRL's colocate mode) so vLLM joins the trainer's process group instead
    of starting its own.
    """

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        *,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        seed: int = 0,
        enable_sleep_mode: bool = True,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        stop_token_ids: list[int] | None = None,
        **llm_kwargs,
    ) -> None:
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        source = None  # an in-memory model whose weights are pushed after construction
        if isinstance(model_or_path, (str, os.PathLike)):
            path = Path(model_or_path)
        else:
            source = model_or_path
            hf = unwrap_model(model_or_path)
            name = getattr(getattr(hf, "config", None), "_name_or_path", None) or getattr(hf, "name_or_path", None)
            if not name:
                raise ValueError(
                    "VLLMEngine: the in-memory model has no config._name_or_path, so vLLM cannot tell which "
                    "checkpoint directory to build it from; pass the model directory instead"
                )
            path = Path(name)
        from vpgea.modeldir import check_model_dir

        self.path = str(check_model_dir(path, "VLLMEngine"))

        if stop_token_ids is None:
            gen_cfg = getattr(unwrap_model(source), "generation_config", None) if source is not None else None
            if gen_cfg is None:
                gen_cfg = _load_generation_config(path)
            stop_token_ids = stop_ids("VLLMEngine", tokenizer, gen_cfg)
        self.stop_token_ids = [int(i) for i in stop_token_ids]
        if not self.stop_token_ids:
            raise ValueError("VLLMEngine: stop_token_ids is empty; a response needs a token that ends it")

        if tensor_parallel_size == 1 and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
            log.warning(
                "VLLM_ENABLE_V1_MULTIPROCESSING=%s: the vLLM model lives in another process, so every weight "
                "push is serialised through collective_rpc (slow); unset it for in-process pushes",
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"],
            )
        if (
            "distributed_executor_backend" not in llm_kwargs
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            # One vLLM per trainer rank: join the existing process group rather than start a new one.
            llm_kwargs["distributed_executor_backend"] = "external_launcher"

        if llm_kwargs.get("distributed_executor_backend") == "external_launcher" and tensor_parallel_size > 1:
            # external_launcher's TP group must feed every member the same prompts; each trainer rank has its own.
            raise ValueError(
                "VLLMEngine: tensor_parallel_size > 1 with one engine per trainer rank (external_launcher) is not "
                "supported: the ranks of a TP group would be given different prompts. Use tensor_parallel_size=1"
            )
        if os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").find("expandable_segments:True") >= 0 and enable_sleep_mode:
            raise ValueError(
                "VLLMEngine: PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, which vLLM's sleep-mode allocator "
                "cannot run with; unset it or pass enable_sleep_mode=False"
            )

        self.enable_sleep_mode = bool(enable_sleep_mode)
        self.tensor_parallel_size = int(tensor_parallel_size)
        # vLLM's workers reseed Python, numpy and torch (CPU and CUDA) with its seed while starting up; in-process that
        # would reset the trainer's generators, so their states are put back afterwards.
        from vpgea.rng import capture_rng, restore_rng

        rng = capture_rng()
        try:
            self.llm = vllm.LLM(
                model=self.path,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                seed=seed,
                enable_sleep_mode=self.enable_sleep_mode,
                enable_prefix_caching=enable_prefix_caching,
                tensor_parallel_size=self.tensor_parallel_size,
                **llm_kwargs,
            )
        finally:
            restore_rng(rng)
        self._asleep: set[str] = set()  # allocation tags vLLM has released ("weights", "kv_cache")
        try:
            self._wake_takes_tags = "tags" in inspect.signature(self.llm.wake_up).parameters
        except (TypeError, ValueError, AttributeError):
            self._wake_takes_tags = False
        if source is not None:
            self.update_weights(source)

    # --- interface -----------------------------------------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        """True while any of vLLM's memory (weights or KV cache) is released."""
        return bool(self._asleep)

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | list[int] | None = None,
    ) -> list[GenerationOutput]:
        """One sampled response per prompt, in prompt order.

        prompts: token-id lists (no padding), each non-empty. temperature <= 0 means greedy. seed: request ``i``
        samples with ``resolve_seeds(seed, len(prompts))[i]`` (an int expands with ``request_seeds``; a list gives
        each prompt its own), so the same call gives the same responses; ``None`` draws from the engine's
        generator. Wakes the engine first if it sleeps (and leaves it awake).
        """
        check_generate_args(prompts, max_new_tokens, top_p)
        if not prompts:
            return []
        if max_new_tokens == 0:  # vLLM needs max_tokens >= 1
            return [GenerationOutput([], "length") for _ in prompts]
        self.wake()

        greedy = temperature <= 0.0
        base = dict(
            n=1,
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0 if greedy else float(top_p),
            max_tokens=int(max_new_tokens),
            stop_token_ids=list(self.stop_token_ids),
        )
        seeds = resolve_seeds(seed, len(prompts))
        if seeds is None:
            params = self._sampling_params(**base)
        else:
            params = [self._sampling_params(**base, seed=s) for s in seeds]
        # A TokensPrompt is a TypedDict: the plain dict is the documented form and works on every version.
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        if len(outs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outs)} outputs for {len(prompts)} prompts")
        return [self._convert(o.outputs[0]) for o in outs]

    def update_weights(self, model) -> None:
        """Copy ``model``'s current weights into vLLM, in memory.

        model: a ``PolicyModel``, a Hugging Face causal LM (FSDP2 ``DTensor`` parameters are gathered), or a mapping
        ``hf_name -> tensor``. Names are Hugging Face checkpoint names; dtype and device are converted by vLLM's
        weight loaders. A sleeping engine gets its weights mapped back first (writing into released memory would
        be lost, and level-1 wake-up would then restore the stale CPU copy over the new weights); the KV cache stays
        released until ``wake``. The prefix cache is reset: its KV blocks were computed with the old weights.
        """
        self._wake_tags(("weights",))
        loaded = 0
        with torch.no_grad():
            target = self._inprocess_model()
            if target is not None:
                counted = _Counting(_named_weights(model))
                target.load_weights(counted)
                loaded = counted.n
            else:
                loaded = self._load_via_rpc(model)
        if loaded == 0:
            raise ValueError("VLLMEngine.update_weights: the model has no parameters to push")
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Release vLLM's GPU memory while the trainer runs (no-op without sleep mode; repeated calls are harmless).

        Level 1: the weights go to CPU memory and the KV cache is dropped. Level 2 (drop the weights too) is not
        used: buffers outside ``named_parameters`` (rotary tables) would have to be rebuilt and a generate before
        the next ``update_weights`` would run on garbage (vllm-project/vllm#29341, #16564).
        """
        if not self.enable_sleep_mode:
            return
        if set(_TAGS) <= self._asleep:
            return
        if self._asleep:
            # Partly asleep (weights pushed since the last sleep, KV cache still released): vLLM's allocator would
            # release the released part a second time, so map everything back first.
            self._wake_tags(_TAGS)
        self.llm.sleep(level=_SLEEP_LEVEL)  # also resets the prefix cache
        self._asleep = set(_TAGS)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Map back whatever ``sleep`` released (no-op when awake)."""
        self._wake_tags(_TAGS)

    # --- internals -----------------------------------------------------------------------------------------------

    def _wake_tags(self, tags: tuple[str, ...]) -> None:
        todo = [t for t in tags if t in self._asleep]
        if not todo:
            return
        if torch.cuda.is_available():
            # vLLM's sleep-mode pool maps memory outside PyTorch's caching allocator: blocks the trainer freed but
            # PyTorch still caches must be returned to the driver first, or waking up can run out of memory.
            torch.cuda.empty_cache()
        if self._wake_takes_tags:
            self.llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)
        else:  # older vLLM: all or nothing
            self.llm.wake_up()
            self._asleep.clear()

    def _sampling_params(self, **kw):
        try:
            return vllm.SamplingParams(detokenize=False, **kw)  # token ids are all we need
        except TypeError:  # a vLLM without the detokenize option
            return vllm.SamplingParams(**kw)

    def _convert(self, completion) -> GenerationOutput:
        """A vLLM ``CompletionOutput`` -> ``GenerationOutput`` with the stop token kept, as ``HFEngine`` does."""
        ids = [int(t) for t in completion.token_ids]
        stop_set = set(self.stop_token_ids)
        first = next((i for i, t in enumerate(ids) if t in stop_set), None)
        if first is not None:
            return GenerationOutput(ids[: first + 1], "stop")
        if completion.finish_reason == "stop":
            reason = getattr(completion, "stop_reason", None)
            if isinstance(reason, int) and not isinstance(reason, bool):
                # Ended by a stop id that the output leaves out: put it back so responses end with their stop id.
                return GenerationOutput(ids + [reason], "stop")
            # vLLM's own EOS (stop_reason None) ended it; vLLM keeps that token as the last id.
            return GenerationOutput(ids, "stop")
        if completion.finish_reason not in (None, "length"):  # "abort" and the like: not a finished response
            raise RuntimeError(f"VLLMEngine: vLLM ended a request with finish_reason={completion.finish_reason!r}")
        return GenerationOutput(ids, "length")

    def _inprocess_model(self):
        """The vLLM ``nn.Module`` when it lives in this process, else None.

        V0 engines and in-process V1 engines expose ``llm_engine.model_executor``; the V1 engine core also sits at
        ``llm_engine.engine_core.engine_core``. The driver worker may be a wrapper holding the worker as ``.worker``.
        With tensor parallelism the driver holds one shard only, so the RPC path (every worker) is used instead.
        """
        if self.tensor_parallel_size > 1:
            return None
        engine = getattr(self.llm, "llm_engine", None)
        executors = [getattr(engine, "model_executor", None)]
        core = getattr(getattr(engine, "engine_core", None), "engine_core", None)
        executors.append(getattr(core, "model_executor", None))
        for executor in executors:
            worker = getattr(executor, "driver_worker", None)
            for w in (worker, getattr(worker, "worker", None)):
                model = getattr(getattr(w, "model_runner", None), "model", None)
                if model is not None and hasattr(model, "load_weights"):
                    return model
        return None

    def _load_via_rpc(self, model) -> int:
        """Push through ``llm.collective_rpc`` in CPU chunks of about ``_RPC_CHUNK_BYTES``; returns tensors sent."""
        rpc = getattr(self.llm, "collective_rpc", None)
        if rpc is None:
            raise RuntimeError(
                "VLLMEngine: cannot reach the vLLM model to push weights: this vLLM exposes neither an in-process "
                "model (llm.llm_engine.model_executor) nor LLM.collective_rpc; use vllm >= 0.8 with "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0"
            )
        sent, chunk, size = 0, [], 0
        try:
            for name, t in _named_weights(model):
                chunk.append((name, t.to("cpu")))
                size += t.numel() * t.element_size()
                if size >= _RPC_CHUNK_BYTES:
                    rpc(_rpc_load_weights, args=(chunk,))
                    sent, chunk, size = sent + len(chunk), [], 0
            if chunk:
                rpc(_rpc_load_weights, args=(chunk,))
                sent += len(chunk)
        except Exception as e:
            raise RuntimeError(
                "VLLMEngine: pushing weights through collective_rpc failed; the vLLM model is not in this process. "
                "Run it in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, tensor_parallel_size=1), or allow callables "
                f"over RPC (VLLM_ALLOW_INSECURE_SERIALIZATION=1). Cause: {type(e).__name__}: {e}"
            ) from e
        return sent


class _Counting:
    """Wraps an iterator of ``(name, tensor)`` pairs and counts what the consumer took."""

    def __init__(self, it: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._it = it
        self.n = 0

    def __iter__(self):
        for pair in self._it:
            self.n += 1
            yield pair


def _load_generation_config(path: Path):
    """The directory's ``generation_config.json`` (for its EOS ids), or None."""
    if not (path / "generation_config.json").is_file():
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path, local_files_only=True)
    except Exception:  # a malformed file only costs the extra stop ids; vLLM reads the same file itself
        return None

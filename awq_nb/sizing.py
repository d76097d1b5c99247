"""Will it fit? RAM, GPU memory, disk and time for quantizing a model, from its config alone.

:func:`estimate` reads only the model's shapes (a hub id's ``config.json``, a local folder, a
bundled name, a ``PretrainedConfig`` or a plain dict) and adds up, for the in-memory path
(``load_model`` + ``quantize`` + ``save_quantized``, as ``python -m awq_nb quantize --streaming off``)
and the streaming path (:func:`awq_nb.streaming.quantize_streaming`), what each holds at its peak:

* both: the Python/torch/transformers runtime; the calibration hidden states ``[n, T, H]`` (in the
  model's dtype, on the compute device) and the recorded inputs/outputs of the two inspected
  modules for the ``search_samples`` replayed sequences (fp32); the open output shard (at most
  ``max_shard_size``, default 2 GB);
* per decoder block, where the search runs: the block itself, its fp32 working copy, the Gram
  matrices ``X^T X`` (one ``[K, K]`` fp32 per Linear, and a second one per clipped Linear for the
  whole-row clip loss) and the search's other temporaries (:data:`COSTS.temp_factor` times the
  block's fp32 bytes);
* in-memory: the whole model in RAM in the compute dtype, plus, while loading from a file stored
  in another dtype, the memory-mapped source pages (as the CLI runs it: each block goes to the GPU
  for its search; notebook 00 keeps the whole model on the GPU, which then holds it too);
* streaming: one block, or the embeddings while block 0's inputs are captured, whichever is larger.

Every measured or assumed number is one field of :class:`Costs` (:data:`COSTS`), with where it
comes from; update them there when the streaming path's per-block memory changes. Time figures
are estimates scaled from CPU runs on the development VM; no GPU run of the search has been
measured yet, so GPU times assume the GPU reaches the same share of its fp32 peak as that CPU did.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import AwqNbError

GB = 1e9


@dataclass(frozen=True)
class Costs:
    """The measured and assumed numbers behind :func:`estimate` (sources in docs/benchmarks.md and
    docs/big-models.md: the 2-core development VM, no GPU, torch 2.13 CPU)."""

    # Resident Python + torch + transformers + tokenizer: the 2-layer probe of bench/big_model.py's
    # model, 2026-12-01 (docs/big-models.md, "~0.45 GB is the Python/torch/transformers runtime").
    runtime_bytes: float = 0.45 * GB
    # The search's temporaries beyond the Gram matrices and the fp32 working copy, in units of one
    # block's fp32 bytes. Fitted to the streaming run of `python bench/big_model.py --both`
    # (2026-12-01: hidden 2048, 22 layers, 4 x 128 tokens, fp32, peak RSS 2.66 GB): 2.66 GB less
    # the other terms of the sum (runtime, open shard, block, Grams, working copy) is ~0.64 GB,
    # 3.5 x the 180 MB fp32 block. Checked against runs it was not fitted to (tests/test_sizing.py):
    # the in-memory run of the same command (7.19 GB), SmolLM2-135M at 128 x 512 (1.438 GB,
    # 2026-11-30) and the same model cut to 4 layers, streamed (2.14 GB, 2026-12-01, docs/colab.md).
    # Lower it here when the streaming path's per-block memory is cut. It has been: the same
    # streaming command peaked at 1.71 GB at b58c9ba (2026-12-01, docs/big-models.md: shards spill to
    # disk, fp32 blocks searched in place, Gram accumulators shared), so the streaming figures are
    # now ~0.9 GB high on that model (conservative); refit this and the sums together once the
    # in-memory runs are measured again at the same commit.
    temp_factor: float = 3.5
    # CPU search time per weight of a decoder block at the default budget (128 x 512 calibration
    # tokens, 16 replayed sequences, default grids): SmolLM2-135M w4g64, 701.1 s for 30 blocks of
    # 3,538,944 weights, 2 threads, calm VM, 2026-11-30 (docs/benchmarks.md).
    cpu_seconds_per_weight: float = 701.1 / 30 / 3_538_944
    cpu_threads: int = 2  # the threads of that run
    # Shares of that time (py-spy over the CLI, 2026-11-28, docs/benchmarks.md): replays of the
    # scale search (~ search_samples x seqlen) and the traced forward (~ n_samples x seqlen);
    # the rest (clip search, Gram matrices, bookkeeping) is taken as independent of the tokens.
    replay_share: float = 0.73
    forward_share: float = 0.08
    # fp32 peak of the 2 cores of that VM: its Linear matmuls ran at ~120 GFLOP/s, "about 60% of
    # the two cores' fp32 peak" (docs/benchmarks.md, 2026-11-28).
    cpu_peak_flops: float = 200e9
    # Assumed, not measured here: host memory CUDA's libraries add to the process, the device
    # memory of the CUDA context and allocator slack, and the hub's download speed on Colab.
    cuda_host_bytes: float = 1.0 * GB
    cuda_device_bytes: float = 0.5 * GB
    download_bytes_per_s: float = 100e6
    # Typical size of a hub safetensors shard (the transformers default is 5 GB): with
    # delete_shards, the streaming path keeps about one on disk at a time.
    hub_shard_bytes: float = 5 * GB


COSTS = Costs()


@dataclass(frozen=True)
class Device:
    """Where the quantization would run. ``vram_bytes=None``: no GPU (the search runs on the CPU)."""

    name: str
    ram_bytes: float | None
    vram_bytes: float | None
    disk_bytes: float | None
    fp32_flops: float  # peak, for the time estimate
    session_hours: float | None = None  # a runtime that stops after this long (Colab)


# Colab figures as Colab shows them (`!free -g`, `!nvidia-smi`, `!df -h`; they vary: pass ram_gb=,
# vram_gb=, disk_gb= to override). fp32 peaks: NVIDIA's data sheets (T4 8.1 TFLOPS, A100 19.5 TFLOPS).
# Free Colab runtimes stop after at most 12 hours.
DEVICES = {
    "T4": Device("Colab T4 (free)", 12.7 * GB, 15.0 * GB, 100 * GB, 8.1e12, session_hours=12),
    "A100-40GB": Device("Colab A100 40GB", 83.5 * GB, 40.0 * GB, 200 * GB, 19.5e12),
}

# fp32 peaks from NVIDIA's data sheets, for device="auto" (matched in the GPU's name; others: the T4's).
GPU_FP32_FLOPS = {"T4": 8.1e12, "L4": 30.3e12, "V100": 15.7e12, "A100": 19.5e12, "H100": 67e12, "H200": 67e12}

# Families (HF model_type) whose MLP is two Linears (fc1, fc2) instead of gate/up/down, and the
# config field that names their MLP width when it is not ``intermediate_size``.
_PLAIN_MLP = {"opt", "gpt2", "gpt_neox"}
_MLP_WIDTH_FIELD = {"opt": "ffn_dim", "gpt2": "n_inner"}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs from a config: the Linears of one block as ``(in K, out N)``."""

    model_type: str
    hidden: int
    layers: int
    vocab: int
    tied: bool
    linears: dict[str, tuple[int, int]]
    skip_clip: tuple[str, ...] = ("q_proj", "k_proj")
    source_bytes_per_param: int = 2  # dtype the weights are stored in (config's torch_dtype)

    @property
    def block_params(self) -> int:
        return sum(k * n for k, n in self.linears.values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Linears of the blocks, embeddings and (untied) head; norms and biases (< 0.1 %) are left out."""
        return self.layers * self.block_params + self.embed_params * (1 if self.tied else 2)


@dataclass
class PathEstimate:
    """One path's peak figures (bytes, seconds) and whether they fit the device."""

    name: str
    ram_bytes: float
    vram_bytes: float | None
    disk_bytes: float
    seconds: float
    fits: bool = True
    reasons: list[str] = field(default_factory=list)


@dataclass
class Estimate:
    """:func:`estimate`'s answer. ``fits``: at least one path fits; ``reasons``: what does not fit, and
    the fix. All time figures are estimates (module docstring); memory figures are estimates too,
    from the structure of the search and the measured runs named in :class:`Costs`."""

    model: str
    device: Device
    params: int
    layers: int
    block_params: int
    download_bytes: float
    checkpoint_bytes: float
    in_memory: PathEstimate
    streaming: PathEstimate
    fits: bool
    reasons: list[str]
    recommended: str | None  # "in-memory", "streaming" or None (neither fits)

    def __str__(self) -> str:
        def gb(x):
            return "-" if x is None else f"{x / GB:.1f} GB"

        d = self.device
        lines = [f"{self.model}: {self.params / 1e9:.2f}B parameters, {self.layers} blocks of "
                 f"{self.block_params / 1e6:.0f}M; download {gb(self.download_bytes)}, AWQ checkpoint "
                 f"{gb(self.checkpoint_bytes)}",
                 f"device {d.name}: RAM {gb(d.ram_bytes)}, GPU {gb(d.vram_bytes)}, disk {gb(d.disk_bytes)}",
                 f"{'path':<10} {'peak RAM':>9} {'peak GPU':>9} {'disk':>9} {'time (estimate)':>16}  fits"]
        for p in (self.in_memory, self.streaming):
            lines.append(f"{p.name:<10} {gb(p.ram_bytes):>9} {gb(p.vram_bytes):>9} {gb(p.disk_bytes):>9} "
                         f"{'~' + _duration(p.seconds):>16}  {'yes' if p.fits else 'no'}")
        if self.recommended:
            lines.append(f"fits: yes, with the {self.recommended} path")
        else:
            lines.append("fits: NO")
        lines += [f"  - {r}" for r in self.reasons]
        lines.append("(estimates from the model's shapes and measured CPU runs: awq_nb/sizing.py, docs/colab.md)")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- reading the config ------------------------------------------------------------------------------

def _config_dict(model) -> tuple[str, dict, str]:
    """``(name, config dict, source)``; source is "hub", "bundled", "local" or "config"."""
    from .models import BUNDLED_MODELS, resolve_model_path

    if isinstance(model, dict):
        return model.get("_name_or_path") or model.get("model_type", "config"), dict(model), "config"
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):  # a PretrainedConfig
        return getattr(model, "name_or_path", "") or model.model_type, model.to_dict(), "config"
    if not isinstance(model, (str, os.PathLike)):
        raise AwqNbError(f"estimate() takes a hub id, a folder, a bundled name, a PretrainedConfig or a dict, "
                         f"not {type(model).__name__}.")
    name = str(model)
    bundled = name.lower() in BUNDLED_MODELS
    path = Path(resolve_model_path(name))  # a bundled name or .gguf becomes its (local) converted folder
    if path.is_dir():
        cfg = path / "config.json"
        try:
            return name, json.loads(cfg.read_text()), "bundled" if bundled else "local"
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AwqNbError(f"cannot read {cfg} ({e}): point to a Hugging Face model folder with a valid config.json.") from None
    from transformers import AutoConfig

    try:  # only config.json is fetched
        return name, AutoConfig.from_pretrained(name, trust_remote_code=False).to_dict(), "hub"
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise AwqNbError(f"could not read the config of {name!r} from the Hugging Face hub ({first}). Check the id and "
                         "the network (gated models need `huggingface-cli login`), or pass the model's config.json "
                         "as a dict.") from None


def shapes_of(cfg: dict, name: str = "config") -> Shapes:
    """The :class:`Shapes` of a config dict; an :class:`AwqNbError` names a missing field or an
    architecture awq_nb does not quantize."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .arch import REGISTRY

    model_type = cfg.get("model_type")
    if not model_type:
        raise AwqNbError(f"{name}: the config has no model_type; pass the model's full config.json (e.g. "
                         "model_type='llama').")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if causal is None:
        raise AwqNbError(f"{name}: architecture {model_type!r} is not a causal LM: AWQ here quantizes decoder-only "
                         "models that transformers loads with AutoModelForCausalLM; choose one of those.")
    if causal not in REGISTRY:
        raise AwqNbError(f"{name}: {causal} ({model_type!r}) is not an architecture awq_nb quantizes (registered: "
                         f"{', '.join(sorted(REGISTRY))}); choose a model of one of those families.")
    try:
        hf = AutoConfig.for_model(**cfg)  # aliases (n_embd -> hidden_size) and the class's defaults
    except (TypeError, ValueError, KeyError) as e:
        raise AwqNbError(f"{name}: transformers cannot build a {model_type!r} config from it ({e}).") from None
    aliases = getattr(type(hf), "attribute_map", {})
    width_field = _MLP_WIDTH_FIELD.get(model_type, "intermediate_size")
    needed = _REQUIRED + (() if model_type in _PLAIN_MLP else (width_field,))
    missing = [f for f in needed if f not in cfg and aliases.get(f) not in cfg]
    if missing:
        raise AwqNbError(f"{name}: the config lacks {', '.join(missing)}, which the estimate needs; pass the model's "
                         "full config.json.")
    h, heads = hf.hidden_size, hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or h // heads
    width = getattr(hf, width_field, None) or 4 * h
    linears = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
               "o_proj": (heads * head_dim, h)}
    if model_type in _PLAIN_MLP:
        linears.update(fc1=(h, width), fc2=(width, h))
    else:
        linears.update(gate_proj=(h, width), up_proj=(h, width), down_proj=(width, h))
    stored = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").replace("torch.", "")
    return Shapes(model_type, h, hf.num_hidden_layers, hf.vocab_size, bool(getattr(hf, "tie_word_embeddings", False)),
                  linears, source_bytes_per_param=_DTYPE_BYTES.get(stored, 2))


# -- the sums -----------------------------------------------------------------------------------------

def checkpoint_bytes(s: Shapes, group_size: int = 128) -> float:
    """Size of the AWQ "gemm" checkpoint: 4-bit codes, an fp16 scale and a 4-bit zero per group of each
    block Linear; embeddings and head in fp16."""
    per_weight = 0.5 + 2.5 / group_size
    return s.layers * s.block_params * per_weight + s.embed_params * 2 * (1 if s.tied else 2)


def search_bytes(s: Shapes, dtype_bytes: int, costs: Costs = COSTS) -> float:
    """One block where its search runs: the block, its fp32 copy, the Gram matrices, the temporaries."""
    fp32_block = 4 * s.block_params
    grams = 4 * sum(k * k * (1 + (name not in s.skip_clip)) for name, (k, _) in s.linears.items())
    return s.block_params * dtype_bytes + fp32_block + grams + costs.temp_factor * fp32_block


def activation_bytes(s: Shapes, n_samples: int, seqlen: int, search_samples: int, dtype_bytes: int) -> float:
    """Calibration hidden states ``[n, T, H]`` plus the replayed sequences' recorded inputs and fp32
    outputs of the two inspected modules (attention, MLP)."""
    return n_samples * seqlen * s.hidden * dtype_bytes + 4 * search_samples * seqlen * s.hidden * 4


def search_seconds(s: Shapes, n_samples: int, seqlen: int, search_samples: int, flops: float,
                   costs: Costs = COSTS) -> float:
    """Estimated search time: the measured CPU seconds per block weight, scaled by the tokens and by
    the device's fp32 peak against the measuring VM's."""
    rest = 1 - costs.replay_share - costs.forward_share
    tokens = (rest + costs.replay_share * search_samples * seqlen / (16 * 512)
              + costs.forward_share * n_samples * seqlen / (128 * 512))
    return s.layers * s.block_params * costs.cpu_seconds_per_weight * tokens * costs.cpu_peak_flops / flops


def this_machine(use_gpu: bool = True, costs: Costs = COSTS) -> Device:
    """This machine: available RAM, free disk of the working directory, and (``use_gpu`` and CUDA
    present) the first GPU's memory, else the CPU's threads."""
    import torch

    from .memory import available_ram_bytes

    try:
        disk = float(shutil.disk_usage(Path.cwd()).free)
    except OSError:
        disk = None
    if use_gpu and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        flops = next((v for k, v in GPU_FP32_FLOPS.items() if k in props.name), GPU_FP32_FLOPS["T4"])
        return Device(props.name, available_ram_bytes(), float(props.total_memory), disk, flops)
    threads = torch.get_num_threads()  # what the search will use
    return Device(f"this machine's CPU ({threads} threads)", available_ram_bytes(), None, disk,
                  costs.cpu_peak_flops * threads / costs.cpu_threads)


def _device(device, ram_gb, vram_gb, disk_gb, costs: Costs) -> Device:
    if isinstance(device, Device):
        base = device
    elif device in ("cpu", "auto"):
        base = this_machine(use_gpu=device == "auto", costs=costs)
    elif device in DEVICES:
        base = DEVICES[device]
    else:
        raise AwqNbError(f"device={device!r} is not known: choose one of {[*DEVICES, 'cpu', 'auto']}, or pass a "
                         "sizing.Device.")
    over = {k: v * GB for k, v in (("ram_bytes", ram_gb), ("vram_bytes", vram_gb), ("disk_bytes", disk_gb)) if v is not None}
    return replace(base, **over)


def estimate(model, device="T4", *, ram_gb: float | None = None, vram_gb: float | None = None,
             disk_gb: float | None = None, n_samples: int = 128, seqlen: int = 512, search_samples: int = 16,
             group_size: int = 128, dtype: str | None = None, max_shard_size: float = 2 * GB,
             delete_shards: bool = False, costs: Costs = COSTS) -> Estimate:
    """Peak RAM, GPU memory, disk and time of quantizing ``model`` with awq-nb on ``device``, before
    anything is downloaded (only a hub model's config.json is fetched).

    ``model``: a hub id, a local folder, a bundled name, a ``PretrainedConfig`` or a config dict.
    ``device``: "T4" (free Colab), "A100-40GB", "cpu" (this machine's CPU: available RAM, free disk of
    the working directory), "auto" (this machine, with its GPU if CUDA sees one) or a :class:`Device`;
    ``ram_gb``/``vram_gb``/``disk_gb`` override its figures.
    ``dtype``: the model's dtype while quantizing (a name or a torch dtype; default "float16" on a
    GPU, "float32" on a CPU, as the notebooks load it). ``delete_shards``: the streaming path deletes each downloaded shard once read.
    The time assumes the default grids (``n_grid=20``, ``clip_grid=20``); coarser grids run faster
    (notebook 08's fast budget, 10 and 10 on 8 x 128 tokens: ~6 min estimated, 79 s measured).
    Prints nothing; ``print(est)`` shows a table.
    """
    name, cfg, source = _config_dict(model)
    s = shapes_of(cfg, name)
    dev = _device(device, ram_gb, vram_gb, disk_gb, costs)
    gpu = dev.vram_bytes is not None
    dtype = str(dtype).replace("torch.", "") if dtype is not None else ("float16" if gpu else "float32")
    if dtype not in _DTYPE_BYTES:
        raise AwqNbError(f"dtype={dtype!r} is not supported: choose float32, float16 or bfloat16.")
    c = _DTYPE_BYTES[dtype]
    stored = 4 if source == "bundled" else s.source_bytes_per_param  # bundled: the fp32 folder converted from GGUF
    download = s.params * stored if source in ("hub", "config") else 0.0  # a bundled model is installed
    ckpt = checkpoint_bytes(s, group_size)
    shard = min(max_shard_size, ckpt)
    acts = activation_bytes(s, n_samples, seqlen, search_samples, c)
    work = search_bytes(s, c, costs)
    seconds = search_seconds(s, n_samples, seqlen, search_samples, dev.fp32_flops, costs)
    fetch = download / costs.download_bytes_per_s

    base = costs.runtime_bytes + (costs.cuda_host_bytes if gpu else 0.0)
    model_ram = s.params * c
    loading = s.params * stored if stored != c else 0.0  # the source pages while casting to the compute dtype
    on_host = 0.0 if gpu else work - s.block_params * c + acts  # the search beside the model, on a CPU
    vram = costs.cuda_device_bytes + acts + max(work, s.embed_params * c) if gpu else None
    in_memory = PathEstimate("in-memory", base + model_ram + max(loading, on_host, shard), vram,
                             download + ckpt, seconds + fetch)
    outside = max(s.embed_params * c, s.block_params * c)  # embeddings while capturing, else one block
    streaming = PathEstimate("streaming", base + shard + (outside if gpu else max(s.embed_params * c, work) + acts),
                             vram, (min(costs.hub_shard_bytes, download) if delete_shards else download) + ckpt,
                             seconds + fetch)
    for p in (in_memory, streaming):
        _judge(p, dev, s, gpu)
    ok = [p for p in (in_memory, streaming) if p.fits]
    recommended = ok[0].name if ok else None
    reasons = [r for p in (in_memory, streaming) for r in p.reasons]
    if not ok:
        reasons.append("neither path fits: choose a smaller model" + ("" if gpu else ", or a GPU runtime")
                       + ", or a runtime with more memory")
    return Estimate(name, dev, s.params, s.layers, s.block_params, download, ckpt, in_memory, streaming, bool(ok),
                    reasons, recommended)


def _judge(p: PathEstimate, dev: Device, s: Shapes, gpu: bool) -> None:
    """Set ``p.fits`` and its reasons (each naming the resource, the figures and the fix)."""
    fix = {"in-memory": "use the streaming path (awq_nb.quantize_streaming, or --streaming on)",
           "streaming": "choose a smaller model or a runtime with more RAM"}[p.name]
    checks = [("RAM", p.ram_bytes, dev.ram_bytes, fix),
              ("GPU memory", p.vram_bytes, dev.vram_bytes, "choose a smaller model or a larger GPU"),
              ("disk", p.disk_bytes, dev.disk_bytes, "free disk space" + (
                  "; the streaming path can delete each shard once read (delete_shards=True)"
                  if p.name == "streaming" else ""))]
    for what, need, have, how in checks:
        if need is not None and have is not None and need > have:
            p.fits = False
            p.reasons.append(f"{p.name}: needs ~{need / GB:.1f} GB of {what}, the device has {have / GB:.1f} GB: {how}")
    if dev.session_hours is not None and p.seconds > dev.session_hours * 3600:
        p.fits = False
        p.reasons.append(f"{p.name}: ~{p.seconds / 3600:.0f} h (estimate) exceeds the {dev.session_hours:.0f} h session "
                         "limit: " + ("a smaller model" if gpu else "use a GPU runtime, or a smaller model"))

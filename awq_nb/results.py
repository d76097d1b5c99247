"""What the AWQ search finds, as plain data.

Search returns these records; applying them to a model is a separate step
(:func:`awq_nb.apply_awq`), and plots only read them. All tensors are fp32 on the CPU, so a
result can be saved with :meth:`AWQResult.save` and loaded in another session.

The file is safetensors (no pickle, so hub scanners and ``weights_only`` loaders are happy): the
tensors under keys such as ``scales.3.scales``, everything else as JSON in the metadata key
``awq_nb_result``. :meth:`AWQResult.load` also reads the ``torch.save`` files of earlier versions,
with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULT_KEY = "awq_nb_result"


def _encode(value, key: str, tensors: dict):
    """JSON-able ``value`` with every tensor moved into ``tensors[key...]`` and left as a reference."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, float) and value != value:
        return {"__float__": "nan"}
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return {"__float__": "inf" if value > 0 else "-inf"}
    return value


def _decode(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30


@dataclass
class ChannelStats:
    """Per-input-channel activation statistics of one Linear over the calibration tokens.

    ``mean_abs`` and ``max_abs`` are fp32 ``[K]`` (K = in_features); ``tokens`` is how many
    tokens were seen.
    """

    mean_abs: torch.Tensor
    max_abs: torch.Tensor
    tokens: int


@dataclass
class ScaleRecord:
    """The scale search of one scaling group in one decoder block.

    ``prev`` absorbs ``1/scales`` (a norm or a Linear), ``layers`` are multiplied by ``scales``
    along their input channels. ``losses[i]`` is the output MSE for ``alphas[i]``
    (``inf`` where a candidate gave NaN/inf and was skipped; a lower bound where ``pruned[i]``, i.e.
the search stopped summing once it exceeded the best); ``loss_fp`` is the MSE at alpha=0
    (plain RTN), ``best_alpha`` the chosen one; ``scales`` is fp32 ``[K]``.
    """

    block: int
    prev: str
    layers: list[str]
    inspect: str
    alphas: list[float]
    losses: list[float]
    best_alpha: float
    scales: torch.Tensor
    pruned: list[bool] = field(default_factory=list)  # losses[i] is only a lower bound (prune_grid)

    @property
    def loss_rtn(self) -> float:
        return self.losses[self.alphas.index(0.0)] if 0.0 in self.alphas else float("nan")

    @property
    def best_loss(self) -> float:
        return min(self.losses)


@dataclass
class ClipRecord:
    """The clipping search of one Linear (names are relative to the model).

    ``max_val`` is fp32 ``[N, K/g]``: weights of each group are clamped to ``[-max_val, max_val]``,
    or to ``[min_val, max_val]`` when the search shrank the two ends separately (``min_val`` set).
    ``ratios`` holds the chosen shrink ratio of the max per group (same shape), ``min_ratios`` that
    of the min (or None); ``ratio_grid`` the candidates. ``loss_before``/``loss_after`` are the
    summed output errors without and with clipping.
    """

    block: int
    layer: str
    max_val: torch.Tensor
    ratios: torch.Tensor
    ratio_grid: list[float]
    loss_before: float
    loss_after: float
    min_val: torch.Tensor | None = None
    min_ratios: torch.Tensor | None = None

    def all_ratios(self) -> torch.Tensor:
        """Every chosen shrink ratio, flat: both ends of each group when they were searched apart."""
        parts = [self.ratios] if self.min_ratios is None else [self.ratios, self.min_ratios]
        return torch.cat([p.reshape(-1) for p in parts])


@dataclass
class AWQResult:
    """Everything one AWQ run found, keyed so that plots and ``apply_awq`` can use it."""

    config: dict
    model_name: str = ""
    scales: list[ScaleRecord] = field(default_factory=list)
    clips: list[ClipRecord] = field(default_factory=list)
    saliency: dict[str, ChannelStats] = field(default_factory=dict)
    # per quantized Linear (full name): output MSE on calibration tokens, RTN vs AWQ
    layer_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    # per quantized Linear (full name): the codes of a rounding method that needs the search's Gram
    # matrices (awq_nb.rounding; empty for "rtn"). Held in memory only, not saved: the checkpoint
    # written from them holds them.
    rounded: dict = field(default_factory=dict, repr=False)

    def _as_dict(self) -> dict:
        return {
            "config": self.config,
            "model_name": self.model_name,
            "scales": [asdict(r) for r in self.scales],
            "clips": [asdict(r) for r in self.clips],
            "saliency": {k: asdict(v) for k, v in self.saliency.items()},
            "layer_errors": self.layer_errors,
            "seconds": self.seconds,
        }

    def save(self, path: str | Path) -> Path:
        """Write the result as one safetensors file (``.safetensors`` is the usual suffix); the
        file appears whole or not at all."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict = {}
        meta = _encode(self._as_dict(), "r", tensors)
        tmp = path.with_name(f".{path.name}.partial")
        save_file(tensors, str(tmp), metadata={RESULT_KEY: json.dumps(meta), "format": "pt"})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "AWQResult":
        """Read a file written by :meth:`save`, or an earlier version's ``torch.save`` file (weights only)."""
        path = Path(path)
        if _is_safetensors(path):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                d = _decode(json.loads(f.metadata()[RESULT_KEY]), tensors)
        else:
            d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(
            config=d["config"],
            model_name=d["model_name"],
            scales=[ScaleRecord(**r) for r in d["scales"]],
            clips=[ClipRecord(**r) for r in d["clips"]],
            saliency={k: ChannelStats(**v) for k, v in d["saliency"].items()},
            layer_errors=d["layer_errors"],
            seconds=d["seconds"],
        )

"""Round to nearest: every weight to its closest level of its group's grid, on its own."""
from __future__ import annotations

import torch

from ..quantizer import quantize_int


def round_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
                 gram: torch.Tensor | None = None) -> torch.Tensor:
    """Codes int32 ``[N, K]`` of ``w`` on the grid ``scale``/``zero`` (``gram`` is not used)."""
    return quantize_int(w, scale, zero, bits, group_size)

"""The one validated config for an AWQ run. Every tunable lives here, never as a literal in a method."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import AwqNbError
from .quantizer import MAX_BITS, MIN_BITS

GROUP_SIZES = (32, 64, 128, 256, -1)
PROPAGATE = ("fp", "quantized")  # the next block's input: the fp block's output, or the quantized block's


@dataclass
class AWQConfig:
    """Settings of one AWQ run.

    Quantizer: ``w_bit`` bits (2-8), groups of ``group_size`` input channels (-1: per output
    channel), asymmetric with a zero point unless ``zero_point=False``.

    Scale search: ``n_grid`` values of alpha in [0, 1); per-channel scales
    ``s = mean|x|^alpha / mean|w|^(1-alpha)`` ("duo", the default, as in AutoAWQ and
    llm-compressor; ``mean|w|`` is each weight's magnitude relative to its group's max) or, with
    ``duo_scaling=False``, the paper's ``s = mean|x|^alpha``; normalised so
    that ``sqrt(max(s) * min(s)) = 1``. The loss is the fp32 MSE of the inspected module's output,
    measured on the first ``search_samples`` calibration sequences. ``prune_grid`` (exact, on by
    default) stops summing a candidate's loss once it exceeds the best so far: the chosen alpha and
    scales are those of the full grid, and the losses of such candidates are recorded as lower
    bounds (``ScaleRecord.pruned``); alpha = 0 (plain rounding) is always measured in full.

    Clipping search: for each group, shrink its max |w| by ratios from 1.0 down towards
    ``1 - max_shrink`` in ``clip_grid`` steps, keep the ratio with the least output error over
    all calibration tokens; ``clip_chunk`` output channels at a time bound the memory. With a
    zero point, ``asym_clip`` (the default) shrinks each group's min and max by separate ratios
    (every pair of the grid: ~10x the candidates, a few seconds per block), which helped most at
    3 bits (docs/benchmarks.md); ``asym_clip=False`` shares one ratio, as AutoAWQ does. Each group
    is first scored on its own (the Gram matrix's diagonal block, as AutoAWQ); ``clip_sweeps``
    (default 2) passes over the groups then re-choose each group's candidate on the whole output
    row's error, so groups whose channels move together are
    clipped together (awq_nb/search.py; the trace then keeps each Linear's full ``X^T X``).
    ``clip_sweeps=0`` scores each group alone.

    Rounding: ``rounding`` picks how the scaled and clipped weights become integer codes
    (:mod:`awq_nb.rounding`): ``"rtn"`` rounds each weight to nearest (AWQ as published);
    ``"gptq"`` rounds column by column and pushes each column's error onto the columns not yet
    rounded through the inverse Gram matrix of the layer's input (GPTQ on the AWQ grid). Both
    searches score their candidates with round-to-nearest whatever the final rounding.

    Propagation: ``propagate`` says what the next block is searched on. ``"fp"`` (the default):
    the floating-point output of each original block, as AutoAWQ does. ``"quantized"``: the output
    of the block just searched with its weights quantized as decided (scales, clips, codes), so each
    block's search and rounding see the inputs the quantized model will give it (GPTQ's sequential
    form, llm-compressor's default); it costs one more forward per block, and a copy of the block and
    of its input activations while the block is searched.

    ``skip_indivisible``: keep Linears whose in_features is not a multiple of ``group_size`` in
    floating point instead of raising an error.
    """

    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    duo_scaling: bool = True  # measured better here: docs/benchmarks.md, side-by-side run
    search_samples: int = 16
    prune_grid: bool = True
    clip: bool = True
    clip_grid: int = 20
    asym_clip: bool = True
    clip_sweeps: int = 2
    max_shrink: float = 0.5
    clip_chunk: int = 256
    block_chunk: int = 2  # calibration sequences per forward through a block (bounds its temporaries; docs/benchmarks.md)
    rounding: str = "rtn"
    propagate: str = "fp"
    skip_indivisible: bool = False
    modules_to_not_convert: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.w_bit, int) or not MIN_BITS <= self.w_bit <= MAX_BITS:
            raise AwqNbError(f"w_bit={self.w_bit!r} is not supported: choose an integer from {MIN_BITS} to {MAX_BITS}.")
        if self.group_size not in GROUP_SIZES:
            raise AwqNbError(f"group_size={self.group_size!r} is not supported: choose one of {GROUP_SIZES} (-1 = per-channel).")
        if not isinstance(self.clip_sweeps, int) or self.clip_sweeps < 0:
            raise AwqNbError(f"clip_sweeps={self.clip_sweeps!r} must be a non-negative integer (0: score each group alone).")
        for name in ("n_grid", "search_samples", "clip_grid", "clip_chunk", "block_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise AwqNbError(f"{name}={v!r} must be a positive integer.")
        from .rounding import get_rounder

        get_rounder(self.rounding)  # an unknown name is an error listing the methods
        if self.propagate not in PROPAGATE:
            raise AwqNbError(f"propagate={self.propagate!r}: choose one of {PROPAGATE} (what the next block is searched on).")
        if not 0.0 < self.max_shrink < 1.0:
            raise AwqNbError(f"max_shrink={self.max_shrink!r} must lie in (0, 1): clipping keeps at least 1 - max_shrink of the max.")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tag(self) -> str:
        """Short name such as ``w4g128`` (``w4g-1`` per-channel, ``w4g128s`` symmetric)."""
        return f"w{self.w_bit}g{self.group_size}{'' if self.zero_point else 's'}"

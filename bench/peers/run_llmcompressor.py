"""Quantize a model with llm-compressor (AWQ, GPTQ, or AWQ then GPTQ) on CPU and save fake-quantized weights.

Run with the peer venv (bash bench/peers/setup.sh llmcompressor):

    .venv-peers/llmcompressor/bin/python bench/peers/run_llmcompressor.py \
        --model /tmp/smol-fp --calib calib.json --w-bit 4 --group-size 64 --out out/llmc-w4g64

Steps: load the fp model -> oneshot() with the recipe chosen by --recipe:
  awq       [AWQModifier(), QuantizationModifier()] (the non-deprecated form of
            AWQModifier(scheme="W4A16_ASYM")),
  gptq      [GPTQModifier()] with its defaults (block_size 128, dampening_frac 0.01),
  awq+gptq  [AWQModifier(), GPTQModifier()]: the AWQ scales folded in, then GPTQ's rounding,
calibration = the token-id rows
as a tokenized dataset, in order, one row per batch (its default batch_size=1) -> every
quantized Linear's weight is replaced by compressed-tensors' fake_quantize of it with the
weight_scale / weight_zero_point the QuantizationModifier attached -> write config, fp32
safetensors, tokenizer and peer.json to --out.

The weight scheme is built explicitly for both bit widths: int, asymmetric, group strategy,
group size and bits from the CLI (for 4 bits this equals the W4A16_ASYM preset with the group
size overridden). AWQModifier defaults are kept: duo_scaling=True, n_grid=20. llm-compressor's
AWQ has no clip search of its own; the range comes from the weight observer, by default
memoryless_minmax. `--observer memoryless_mse` picks its MSE range search (a grid over shrink
factors of each group's range, weight-space error), the nearest thing to AutoAWQ's clip search
(which minimizes output error); the observer used is recorded in peer.json.
"""

from __future__ import annotations

import importlib.metadata as md
import time

import torch

import peer_common

PATCHES = [
    "llmcompressor.pipelines.cache.IntermediatesCache.pin_memory replaced by a no-op when "
    "torch.accelerator.is_available() is False: AWQModifier._apply_smoothing pins the cached "
    "parent-module inputs before each grid search, and Tensor.pin_memory() raises "
    "'Cannot access accelerator device when none is available' on a CPU-only machine. "
    "Pinning only speeds host-to-device copies, so skipping it changes no result.",
]


def patch_pin_memory() -> list[str]:
    """Skip pinning of cached intermediates when there is no accelerator to copy to."""
    if torch.accelerator.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return PATCHES


RECIPES = ("awq", "gptq", "awq+gptq")


def build_recipe(w_bit: int, group_size: int, observer: str | None, recipe: str = "awq"):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(num_bits=w_bit, type="int", symmetric=False, strategy="group",
                               group_size=group_size, dynamic=False, observer=observer)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    quantize = (GPTQModifier if "gptq" in recipe else QuantizationModifier)(config_groups=groups, ignore=["lm_head"])
    return ([AWQModifier()] if "awq" in recipe else []) + [quantize], weights


@torch.no_grad()
def fake_quantize_(model) -> int:
    """Replace each quantized Linear's weight by its quantize->dequantize (compressed-tensors)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    n = 0
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if not isinstance(m, torch.nn.Linear) or scheme is None or scheme.weights is None:
            continue
        m.weight.data = fake_quantize(m.weight.data, m.weight_scale, m.weight_zero_point,
                                      scheme.weights).to(m.weight.dtype)
        n += 1
    return n


def main() -> None:
    parser = peer_common.parse_args(__doc__.split("\n")[0])
    parser.add_argument("--observer", default=None,
                        choices=("memoryless_minmax", "memoryless_mse"),
                        help="weight observer (default: llm-compressor's, memoryless_minmax)")
    parser.add_argument("--recipe", default="awq", choices=RECIPES, help="default %(default)s")
    a = parser.parse_args()
    peer_common.check_group_size(a.model, a.group_size)
    calib = peer_common.load_calib(a.calib)
    n_samples, seqlen = len(calib), len(calib[0])

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patches = patch_pin_memory()
    from llmcompressor.modifiers.transform.awq import AWQModifier

    clock = peer_common.BlockClock()
    # one timed call per decoder block: the pipeline also ends epochs with nothing to smooth
    instrumentation = ([clock.wrap(AWQModifier, "_apply_smoothing", at="end",
                                   when=lambda self, model: bool(self._smooth_activation_stats))]
                       if "awq" in a.recipe else [])
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    n_blocks = model.config.num_hidden_layers
    ds = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * seqlen] * n_samples})
    recipe, weight_args = build_recipe(a.w_bit, a.group_size, a.observer, a.recipe)

    t0, c0 = time.perf_counter(), peer_common.cpu_seconds()
    oneshot(model=model, tokenizer=tok, recipe=recipe, dataset=ds,
            num_calibration_samples=n_samples, max_seq_length=seqlen,
            shuffle_calibration_samples=False)
    n_linear = fake_quantize_(model)
    seconds = time.perf_counter() - t0
    cpu_seconds = peer_common.cpu_seconds() - c0

    peer_common.write_dense_folder(a.model, a.out, model.state_dict())
    peer_common.write_peer_json(a.out, {
        "peer": "llmcompressor" if a.recipe == "awq" else f"llmcompressor-{a.recipe}",
        "version": md.version("llmcompressor"),
        "compressed_tensors_version": md.version("compressed-tensors"),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "seconds_per_block": seconds / n_blocks,
        "block_seconds": clock.block_seconds(t0, t0 + seconds),
        "peak_rss_bytes": peer_common.peak_rss_bytes(),
        "w_bit": a.w_bit,
        "group_size": a.group_size,
        "n_samples": n_samples,
        "seqlen": seqlen,
        "n_blocks": n_blocks,
        "n_linear_quantized": n_linear,
        "settings": {
            "recipe": " + ".join(type(m).__name__ + "()" for m in recipe) + " (config_groups, ignore=['lm_head'])",
            "modifiers": [m.model_dump(mode="json", exclude={"config_groups"}) for m in recipe],
            "weights": weight_args.model_dump(mode="json"),
            "duo_scaling": True, "n_grid": 20,
            "observer": a.observer or "default (memoryless_minmax)",
            "clip_search": "none in AWQModifier or GPTQModifier; range from the weight observer",
            "pipeline": "independent -> sequential (default)", "batch_size": 1,
            "dtype": "float32",
            "final_weights": "compressed_tensors fake_quantize(W, weight_scale, "
                             "weight_zero_point) after oneshot",
            "torch_threads": torch.get_num_threads(),
        },
        "patches": patches,
        "instrumentation": instrumentation,
    })
    print(f"llmcompressor: {n_blocks} blocks, {n_linear} Linear, {seconds:.1f}s "
          f"({seconds / n_blocks:.1f}s/block) -> {a.out}")


if __name__ == "__main__":
    main()

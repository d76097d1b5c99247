"""Quantize a model with AutoAWQ 0.2.9 on CPU and save its fake-quantized weights densely.

Run with the peer venv (bash bench/peers/setup.sh autoawq):

    .venv-peers/autoawq/bin/python bench/peers/run_autoawq.py \
        --model /tmp/smol-fp --calib calib.json --w-bit 4 --group-size 64 --out out/autoawq-w4g64

Steps: load the fp model -> AutoAWQ's quantize() with export_compatible=True (scale search,
apply scales, clip search, apply clips; no packing) -> AutoAWQ's own pseudo_quantize_tensor on
every decoder Linear -> write config, fp32 safetensors, tokenizer and peer.json to --out.

AutoAWQ's defaults are kept (duo_scaling=True, n_grid=20 for scales and for clip, clip on,
max_shrink=0.5, 512 tokens sampled for the clip search). The patch below is the only change.
`--profile FILE` also writes cProfile stats of the quantize() call.
"""

from __future__ import annotations

import cProfile
import functools
import importlib.metadata as md
import time
from pathlib import Path

import torch

import peer_common

PATCHES = [
    "AwqQuantizer._compute_best_scale: module2inspect.state_dict is overridden for the call so "
    "the 'org_sd' snapshot holds clones. Upstream snapshots with v.cpu(), which on CPU returns "
    "the live parameter tensors; the in-place fc.weight.mul_(scales) of the first grid point "
    "then leaks into the snapshot, every later grid point and the final restore start from "
    "W*s0, and the saved weights keep an uncompensated scale.",
]


def patch_snapshot_clone(quantizer_cls) -> None:
    """Make the scale search's state_dict snapshot a copy instead of live tensors."""
    original = quantizer_cls._compute_best_scale

    @functools.wraps(original)
    def compute_best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        live = module2inspect.state_dict

        def cloned_state_dict(*a, **k):
            return {n: t.clone() for n, t in live(*a, **k).items()}

        module2inspect.state_dict = cloned_state_dict
        try:
            return original(self, x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict

    quantizer_cls._compute_best_scale = compute_best_scale


@torch.no_grad()
def fake_quantize_(awq_model) -> int:
    """Replace each decoder Linear weight by AutoAWQ's quantize->dequantize of it (fp32)."""
    from awq.utils.module import exclude_layers_to_not_quantize, get_named_linears

    q = awq_model.quantizer
    n = 0
    for layer in q.modules:
        linears = get_named_linears(layer)
        for lin in exclude_layers_to_not_quantize(linears, q.modules_to_not_convert).values():
            lin.weight.data = q.pseudo_quantize_tensor(lin.weight.data)[0]
            n += 1
    return n


def main() -> None:
    parser = peer_common.parse_args(__doc__.split("\n")[0])
    parser.add_argument("--profile", type=Path, help="write cProfile stats of quantize() here")
    a = parser.parse_args()
    peer_common.check_group_size(a.model, a.group_size)
    calib = peer_common.load_calib(a.calib)
    n_samples, seqlen = len(calib), len(calib[0])

    from awq import AutoAWQForCausalLM
    from awq.quantize.quantizer import AwqQuantizer
    from transformers import AutoTokenizer

    patch_snapshot_clone(AwqQuantizer)
    clock = peer_common.BlockClock()
    instrumentation = [clock.wrap(AwqQuantizer, "_get_input_feat", at="start")]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoAWQForCausalLM.from_pretrained(str(a.model), torch_dtype=torch.float32)
    quant_config = {"zero_point": True, "q_group_size": a.group_size, "w_bit": a.w_bit,
                    "version": "GEMM"}

    t0, c0 = time.perf_counter(), peer_common.cpu_seconds()
    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    # Token-id rows go through get_calib_dataset verbatim: rows longer than max_calib_seq_len
    # are dropped, the rest concatenated and cut into max_calib_seq_len blocks, so with
    # max_calib_seq_len=seqlen and max_calib_samples=n_samples each row is one sample.
    model.quantize(tok, quant_config=quant_config, calib_data=calib,
                   max_calib_samples=n_samples, max_calib_seq_len=seqlen,
                   export_compatible=True)
    t_loop_end = time.perf_counter()
    n_linear = fake_quantize_(model)
    if prof:
        prof.disable()
        prof.dump_stats(str(a.profile))
    seconds = time.perf_counter() - t0
    cpu_seconds = peer_common.cpu_seconds() - c0

    peer_common.write_dense_folder(a.model, a.out, model.model.state_dict())
    n_layers = len(model.quantizer.modules)
    peer_common.write_peer_json(a.out, {
        "peer": "autoawq",
        "version": md.version("autoawq"),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "seconds_per_block": seconds / n_layers,
        "block_seconds": clock.block_seconds(t0, t_loop_end),
        "peak_rss_bytes": peer_common.peak_rss_bytes(),
        "w_bit": a.w_bit,
        "group_size": a.group_size,
        "n_samples": n_samples,
        "seqlen": seqlen,
        "n_blocks": n_layers,
        "n_linear_quantized": n_linear,
        "settings": {
            "zero_point": True, "duo_scaling": True, "n_grid_scale": 20, "apply_clip": True,
            "n_grid_clip": 20, "max_shrink": 0.5, "clip_n_sample_token": 512,
            "dtype": "float32", "export_compatible": True,
            "final_weights": "AwqQuantizer.pseudo_quantize_tensor(W) in fp32 after scale+clip "
                             "(AutoAWQ's packing path would cast the Linear to fp16 first)",
            "torch_threads": torch.get_num_threads(),
        },
        "patches": PATCHES,
        "instrumentation": instrumentation,
    })
    print(f"autoawq: {n_layers} blocks, {n_linear} Linear, {seconds:.1f}s "
          f"({seconds / n_layers:.1f}s/block) -> {a.out}")


if __name__ == "__main__":
    main()

"""Quantize a synthetic model with real Llama shapes through the streaming path, and measure its memory.

    python bench/big_model.py                       # hidden 2048, 5632, 22 layers: ~2.2 GB in fp16
    python bench/big_model.py --layers 4 --both     # smaller; --both also runs the in-memory path
                                                    # and compares the two checkpoints byte for byte
    python bench/big_model.py --hidden 3072 --intermediate 8192 --layers 28 --heads 24 --kv-heads 8
                                                    # Llama-3.2-3B's shapes (vocab 32000): ~6 GB in fp16
    python bench/big_model.py --hidden 4096 --intermediate 11008 --layers 8 --heads 32 --kv-heads 32 --device cuda
                                                    # on a GPU: Llama-2-7B's block shapes, 8 of its 32 blocks;
                                                    # prints the peak GPU memory against issue #16's bound

The model has random weights (no hub here), saved as fp16 safetensors in several shards with a
word-level tokenizer; calibration is 4 x 128 tokens of random words and the grids are coarse, so
the numbers are about memory and the time per block, not quality. Each quantization runs in its
own process (``python -m awq_nb quantize``), whose JSON gives the peak RSS (``VmHWM``). Prints a
markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int, heads: int, kv_heads: int) -> int:
    """Write the synthetic model and tokenizer to ``folder``; return the fp16 weight bytes."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16 directly: no fp32 copy (12 GB for a 3B shape)
    try:
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{max(nbytes // 5, 1) // 2**20}MB")
    del model
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t1").save_pretrained(folder)
    return nbytes


def quantize(folder: Path, out: Path, calib: Path, streaming: str, device: str = "cpu") -> dict:
    cmd = [sys.executable, "-m", "awq_nb", "quantize", str(folder), "--out", str(out), "--group-size", "128", "--device", device,
           "--calib", str(calib), "--n-samples", "4", "--seqlen", "128", "--n-grid", "4", "--clip-grid", "4",
           "--search-samples", "2", "--streaming", streaming, "--save-search", "no"]
    start = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode != 0:
        raise SystemExit(f"quantize --streaming {streaming} failed:\n{p.stderr[-4000:]}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    return summary


def runtime_floor(folder: Path) -> int:
    """RSS of a process that has imported what a quantize run imports and built the model's skeleton
    on the meta device, with no weight read: what any run holds before its first block."""
    code = ("import sys, torch; from pathlib import Path; import awq_nb.cli; from awq_nb.streaming import skeleton; "
            "from awq_nb.memory import current_rss_bytes; skeleton(Path(sys.argv[1]), torch.float32); "
            "print(current_rss_bytes())")
    p = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    return int(p.stdout.split()[-1])


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != "awq_nb_summary.json")
    return names == sorted(p.name for p in b.iterdir() if p.name != "awq_nb_summary.json") and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="where the search runs (cuda: also checks the peak GPU memory "
                        "against one block's fp32 weights + the calibration activations + 1 GB, issue #16)")
    parser.add_argument("--both", action="store_true", help="also run the in-memory path and compare the files")
    parser.add_argument("--workdir", help="where to build (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        fp16 = build(tmp / "model", args.hidden, args.intermediate, args.layers, args.vocab, args.heads, args.kv_heads)
        build_s = time.perf_counter() - t0
        calib = tmp / "calib.txt"
        calib.write_text(" ".join(f"t{(i * 7919) % args.vocab}" for i in range(20000)))
        floor = runtime_floor(tmp / "model")
        runs = {"streaming": quantize(tmp / "model", tmp / "q-stream", calib, "on", args.device)}
        if args.both:
            runs["in-memory"] = quantize(tmp / "model", tmp / "q-memory", calib, "off", args.device)
        identical = same_files(tmp / "q-stream", tmp / "q-memory") if args.both else None
        shards = len(list((tmp / "model").glob("*.safetensors")))
    print(f"synthetic Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
          f"{args.vocab}: {fp16 / 1e9:.2f} GB in fp16, {shards} shards (built in {build_s:.0f} s)\n")
    attn = 2 * args.hidden * args.hidden + 2 * args.hidden * (args.hidden // args.heads) * args.kv_heads
    block_fp32 = 4 * (attn + 3 * args.hidden * args.intermediate)  # one decoder block's Linears, as searched
    print(f"runtime floor (imports and the meta skeleton, no weights): {floor / 1e9:.2f} GB; one block in fp32 "
          f"{block_fp32 / 1e9:.2f} GB\n")
    print("| path | peak RSS | x fp16 size | above the floor | search s | s per block | wall s |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        r["runtime_floor_bytes"] = floor
        print(f"| {name} | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['peak_rss_bytes'] / fp16:.2f} | "
              f"{(r['peak_rss_bytes'] - floor) / 1e9:.2f} GB | {r['seconds']:.0f} | {r['seconds'] / args.layers:.1f} | "
              f"{r['wall_seconds']:.0f} |")
    if args.device != "cpu":
        # issue #16's device target: one block's weights (fp32, as searched) + calibration activations + 1 GB
        bound = block_fp32 + 4 * 4 * 128 * args.hidden + 1e9  # 4 x 128 calibration tokens, fp32
        for name, r in runs.items():
            r["device_bound_bytes"] = bound
            print(f"{name}: peak device memory {r['peak_device_bytes'] / 1e9:.2f} GB, bound {bound / 1e9:.2f} GB "
                  f"(one fp32 block {block_fp32 / 1e9:.2f} GB + activations + 1 GB): "
                  f"{'within' if r['peak_device_bytes'] <= bound else 'OVER'}")
    if identical is not None:
        print(f"\ncheckpoints byte-identical: {identical}")
    print(json.dumps({"fp16_bytes": fp16, "layers": args.layers, "runs": runs, "identical": identical}))
    return 0 if identical in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Tests for awq_nb.checkpoint: save -> load round trips, the files we write, corrupt checkpoints,
atomic writes, and an independent decoder of the AutoAWQ "gemm" format (from docs/format.md).

Tolerances. The loaded model differs from the fake-quantized one only by the fp16 rounding of the
scales (the codes are the same integers, all other weights are fp16-representable here). So:
* against a fake-quant model built with fp16-rounded scales, logits agree to fp32 rounding
  (atol 1e-5);
* against ``pseudo_quantize`` (fp32 scales), each weight moves by <= 15 * s * 2**-11 (<= 0.7% of
  one quantization step); through these tiny random models that moves the logits by ~0.25% of the
  largest |logit| (measured 0.031 of 13.2): we allow 1% of it, and require the same 16 greedy tokens.
"""
import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import awq_nb
import awq_nb.checkpoint as ckpt
from awq_nb.arch import find_quantizable, set_weight_nk, weight_nk
from awq_nb.checkpoint import load_quantized, read_quant_config, save_quantized
from awq_nb.config import AWQConfig
from awq_nb.errors import AwqNbError
from awq_nb.quantizer import dequantize_int, pseudo_quantize, quant_params, quantize_int
from awq_nb.wqlinear import WQLinear, replace_with_wqlinear
from tiny_models import tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


pytestmark = pytest.mark.usefixtures("one_thread")
G = 64
AWQ_ORDER_FROM_SPEC = [0, 2, 4, 6, 1, 3, 5, 7]  # docs/format.md, written out independently of kernels/


# ---------------------------------------------------------------------------------------------
# helpers


def tiny_llama(tie=True, bias=False, intermediate=256, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=tie, attention_bias=bias,
                      max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, and fp16-representable
            p.copy_((p * 4).half().float())
    return model


def fake_quant(model, group_size=G, fp16_scales=False, skip=()):
    """A copy with every quantizable weight quantized and dequantized (RTN, w4)."""
    fq = copy.deepcopy(model)
    for name, m in find_quantizable(fq).items():
        if any(s in name for s in skip):
            continue
        w = weight_nk(m)
        scale, zero = quant_params(w, 4, group_size)
        if fp16_scales:
            q = quantize_int(w, scale, zero, 4, group_size)
            set_weight_nk(m, dequantize_int(q, scale.half().float(), zero, group_size))
        else:
            set_weight_nk(m, pseudo_quantize(w, 4, group_size))
    return fq


@torch.no_grad()
def greedy(model, ids, steps=16):
    for _ in range(steps):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.float()


def decode_gemm(qweight, qzeros, scales, group_size):
    """Independent decoder of one AutoAWQ "gemm" Linear, from the facts in docs/format.md:
    nibble i of word c holds column c*8 + ORDER[i]; W^T[k, n] = (q[k, n] - z[k//g, n]) * s[k//g, n]."""

    def unpack(words):
        words = words.to(torch.int64) & 0xFFFFFFFF
        out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
        for i in range(8):
            out[:, AWQ_ORDER_FROM_SPEC[i]::8] = (words >> (4 * i)) & 0xF
        return out

    q, z = unpack(qweight), unpack(qzeros)
    k = q.shape[0]
    rows = torch.arange(k) // group_size
    wt = (q - z[rows]).double() * scales.double()[rows]
    return wt.t()  # [N, K]


IDS = torch.tensor([[3, 17, 42, 99, 7, 250, 128, 64, 5, 11], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny tied Llama saved at w4g64 with a tokenizer, plus its fake-quantized references."""
    model, tok = tiny_llama(), tiny_tokenizer()
    out = save_quantized(model, tok, tmp_path_factory.mktemp("ck") / "tiny-awq", AWQConfig(w_bit=4, group_size=G))
    return {"model": model, "out": out, "fq": fake_quant(model), "fq16": fake_quant(model, fp16_scales=True)}


# ---------------------------------------------------------------------------------------------
# round trips


def test_round_trip_logits_and_greedy(saved):
    loaded, tok = load_quantized(saved["out"], dtype=torch.float32)
    assert tok is not None and tok("t5 t9 t200").input_ids == [5, 9, 200]
    assert isinstance(loaded.model.layers[1].mlp.down_proj, WQLinear)
    got = logits(loaded, IDS)
    assert torch.allclose(got, logits(saved["fq16"], IDS), atol=1e-5, rtol=0)
    ref = logits(saved["fq"], IDS)
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert torch.equal(greedy(loaded, IDS[:1]), greedy(saved["fq"], IDS[:1]))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # re-tied, not duplicated


def test_round_trip_fp16(saved):
    loaded, _ = load_quantized(saved["out"])  # default dtype: float16
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
    assert loaded.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16
    ref = logits(saved["fq16"], IDS)
    assert (logits(loaded, IDS) - ref).abs().max() < 2e-2 * ref.abs().max()


def test_files_and_config(saved):
    from transformers import AutoConfig, AwqConfig

    out = saved["out"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q == {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True, "version": "gemm",
                 "modules_to_not_convert": None}
    parsed = AutoConfig.from_pretrained(out)  # transformers parses it (without autoawq/gptqmodel)
    assert parsed.quantization_config["quant_method"] == "awq"
    assert AwqConfig.from_dict(parsed.quantization_config).format == "gemm"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        assert meta["format"] == "pt" and set(meta) == {"format", ckpt.CHECKSUM_KEY}
        assert set(json.loads(meta[ckpt.CHECKSUM_KEY])) == set(f.keys())  # a checksum for every tensor
        qw = f.get_slice("model.layers.0.mlp.down_proj.qweight")
        assert (qw.get_dtype(), qw.get_shape()) == ("I32", [256, 128 // 8])
        assert f.get_slice("model.layers.0.mlp.down_proj.qzeros").get_shape() == [256 // G, 16]
        sc = f.get_slice("model.layers.0.mlp.down_proj.scales")
        assert (sc.get_dtype(), sc.get_shape()) == ("F16", [256 // G, 128])
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
    assert "lm_head.weight" not in keys  # tied: written once
    assert not any(k.endswith("proj.weight") for k in keys)
    assert {"model.layers.1.self_attn.k_proj.qweight", "model.norm.weight"} <= keys


def test_checkpoint_decodes_as_the_format_describes(saved):
    """Our files, read by a decoder written from docs/format.md alone, give the fake-quant weights."""
    tensors = load_file(str(saved["out"] / "model.safetensors"))
    for name, m in find_quantizable(saved["fq16"]).items():
        w = decode_gemm(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], G)
        assert torch.allclose(w.float(), weight_nk(m), atol=1e-6, rtol=0), name


def test_loads_an_autoawq_style_checkpoint(tmp_path):
    """A checkpoint packed by the test itself from the format facts (legacy quant_config.json,
    'GEMM' in capitals, lm_head written although tied) loads and matches the fake-quant model."""
    model = tiny_llama()
    fq16 = fake_quant(model, fp16_scales=True)
    tensors = {}
    for key, t in model.state_dict().items():
        tensors[key] = t.half().contiguous().clone()
    for name, m in find_quantizable(model).items():
        w = weight_nk(m)
        scale, zero = quant_params(w, 4, G)
        q = quantize_int(w, scale, zero, 4, G)
        del tensors[f"{name}.weight"]
        tensors[f"{name}.qweight"] = pack_by_spec(q.t())
        tensors[f"{name}.qzeros"] = pack_by_spec(zero.t().to(torch.int64))
        tensors[f"{name}.scales"] = scale.t().half().contiguous()
    save_file(tensors, str(tmp_path / "awq_model_w4_g64.safetensors"))
    model.config.save_pretrained(tmp_path)
    (tmp_path / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": G, "w_bit": 4,
                                                            "version": "GEMM"}))
    loaded, tok = load_quantized(tmp_path, dtype=torch.float32)
    assert tok is None
    assert torch.allclose(logits(loaded, IDS), logits(fq16, IDS), atol=1e-5, rtol=0)


def pack_by_spec(values):
    """[R, C] ints 0..15 -> int32 [R, C/8]: nibble i of word c holds column c*8 + ORDER[i]."""
    v = values.to(torch.int64)
    words = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        words |= v[:, AWQ_ORDER_FROM_SPEC[i]::8] << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


AUTOAWQ_PYTHON = Path(__file__).resolve().parents[1] / ".venv-peers" / "autoawq" / "bin" / "python"
AUTOAWQ_READER = """
import json, sys, torch
from safetensors.torch import load_file
from awq.utils.packing_utils import dequantize_gemm
import awq.models.base as base
from awq import AutoAWQForCausalLM
ck, ref = sys.argv[1], load_file(sys.argv[2])
t = load_file(ck + "/model.safetensors")
worst = 0.0
for k in [k for k in t if k.endswith(".qweight")]:
    n = k[: -len(".qweight")]
    w = dequantize_gemm(t[n + ".qweight"], t[n + ".qzeros"], t[n + ".scales"], 4, %d)  # W^T [K, N] in fp16
    worst = max(worst, (w.float().t() - ref[n]).abs().max().item())
base.get_best_device = lambda: "cuda:0"  # keeps AutoAWQ off its ipex-only CPU path; device_map below is the CPU
m = AutoAWQForCausalLM.from_quantized(ck, fuse_layers=False, device_map={"": "cpu"}, dtype=torch.float16)
with torch.no_grad():
    logits = m.model(ref["ids"]).logits.float()
print(json.dumps({"weights": worst, "layer": type(m.model.model.layers[0].self_attn.q_proj).__name__,
                  "logits": (logits - ref["logits"]).abs().max().item()}))
""" % G


@pytest.mark.skipif(not AUTOAWQ_PYTHON.exists(), reason="AutoAWQ peer venv not set up (bash bench/peers/setup.sh autoawq)")
def test_autoawq_reads_our_checkpoint(saved, tmp_path):
    """AutoAWQ 0.2.9 itself (in its own venv) dequantizes our tensors to exactly the fake-quant
    weights rounded to fp16, and loads the folder with WQLinear_GEMM; its fp16 logits agree with
    ours within fp16 compute noise (1% of the largest |logit|)."""
    import subprocess

    ref = {n: weight_nk(m).half().float().contiguous() for n, m in find_quantizable(saved["fq16"]).items()}
    loaded, _ = load_quantized(saved["out"], dtype=torch.float16)
    ref.update(ids=IDS, logits=logits(loaded, IDS))
    save_file(ref, str(tmp_path / "ref.safetensors"))
    (tmp_path / "reader.py").write_text(AUTOAWQ_READER)
    cmd = [str(AUTOAWQ_PYTHON), str(tmp_path / "reader.py"), str(saved["out"]), str(tmp_path / "ref.safetensors")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["weights"] == 0.0 and got["layer"] == "WQLinear_GEMM"
    assert got["logits"] < 1e-2 * ref["logits"].abs().max().item()


def test_sharded_untied_with_bias(tmp_path):
    model = tiny_llama(tie=False, bias=True, seed=1)
    out = save_quantized(model, None, tmp_path / "sharded", AWQConfig(group_size=G), max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert "lm_head.weight" in index["weight_map"] and "model.layers.0.self_attn.q_proj.bias" in index["weight_map"]
    owners = {}
    for k, f in index["weight_map"].items():  # one Linear's tensors sit in one shard
        owners.setdefault(k.rpartition(".")[0], set()).add(f)
    assert all(len(v) == 1 for v in owners.values())
    loaded, _ = load_quantized(out, dtype=torch.float32)
    assert torch.allclose(logits(loaded, IDS), logits(fake_quant(model, fp16_scales=True), IDS), atol=1e-5, rtol=0)


def test_wqlinear_model_saves_the_same(tmp_path, saved):
    model = replace_with_wqlinear(copy.deepcopy(saved["model"]), AWQConfig(group_size=G))
    assert torch.allclose(logits(model, IDS), logits(saved["fq16"], IDS), atol=1e-5, rtol=0)
    out = save_quantized(model, None, tmp_path / "from-wq")  # config read from the WQLinear modules
    a, b = load_file(str(out / "model.safetensors")), load_file(str(saved["out"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_modules_to_not_convert_and_skip_indivisible(tmp_path):
    model = tiny_llama(intermediate=96, seed=2)  # down_proj has K=96: not a multiple of 64
    with pytest.raises(AwqNbError, match="model.layers.0.mlp.down_proj: in_features=96"):
        save_quantized(model, None, tmp_path / "a", AWQConfig(group_size=G))
    assert not (tmp_path / "a").exists()
    cfg = AWQConfig(group_size=G, skip_indivisible=True, modules_to_not_convert=["o_proj"])
    out = save_quantized(model, None, tmp_path / "b", cfg)
    q = read_quant_config(out)
    assert q["modules_to_not_convert"] == ["o_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    loaded, _ = load_quantized(out, dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert isinstance(loaded.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    ref = fake_quant(model, fp16_scales=True, skip=("o_proj", "down_proj"))
    assert torch.allclose(logits(loaded, IDS), logits(ref, IDS), atol=1e-5, rtol=0)


def test_gpt2_conv1d_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256,
                                                        n_positions=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    out = save_quantized(model, None, tmp_path / "gpt2", AWQConfig(group_size=32))
    loaded, _ = load_quantized(out, dtype=torch.float32)
    assert isinstance(loaded.transformer.h[0].attn.c_attn, WQLinear)
    ref = fake_quant(model, group_size=32, fp16_scales=True)
    assert torch.allclose(logits(loaded, IDS), logits(ref, IDS), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# settings the format cannot hold


@pytest.mark.parametrize("cfg,match", [
    (AWQConfig(w_bit=3, group_size=G), "4-bit codes only"),
    (AWQConfig(group_size=G, zero_point=False), "symmetric"),
    (AWQConfig(group_size=-1), "per-channel"),
])
def test_unrepresentable_configs(tmp_path, saved, cfg, match):
    with pytest.raises(AwqNbError, match=match):
        save_quantized(saved["model"], None, tmp_path / "x", cfg)
    with pytest.raises(AwqNbError, match=match):
        replace_with_wqlinear(copy.deepcopy(saved["model"]), cfg)
    assert not (tmp_path / "x").exists()


def test_fp_model_without_config_is_refused(tmp_path, saved):
    with pytest.raises(AwqNbError, match="no WQLinear modules"):
        save_quantized(saved["model"], None, tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# corrupt or inconsistent checkpoints


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


K = "model.layers.1.mlp.up_proj"  # the layer the corruptions below damage


def _drop_qzeros(t):
    t.pop(f"{K}.qzeros")


def _gemv_shaped_qweight(t):  # [K, N/8] = [128, 32] stored as [256, 16]
    t[f"{K}.qweight"] = t[f"{K}.qweight"].reshape(256, 16)


def _int64_qweight(t):
    t[f"{K}.qweight"] = t[f"{K}.qweight"].long()


def _unquantized_layer(t):
    for suffix in ("qweight", "qzeros", "scales"):
        t.pop(f"{K}.{suffix}")
    t[f"{K}.weight"] = torch.zeros(256, 128, dtype=torch.float16)


def _truncate(path):
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])


def _drop_quantization_config(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = None
    (path / "config.json").write_text(json.dumps(cfg))


def _pickle_only(path):
    (path / "model.safetensors").rename(path / "pytorch_model.bin")


def _index_with_missing_shard(path):
    index = {"weight_map": {"a": "model-00002-of-00002.safetensors"}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


CORRUPTIONS = {  # name: (damage the copied folder, expected error)
    "missing tensor": (lambda p: _edit_tensors(p, _drop_qzeros), f"lacks tensor '{K}.qzeros'"),
    "gemv-shaped qweight": (lambda p: _edit_tensors(p, _gemv_shaped_qweight),
                            rf"'{K}.qweight' has shape \[256, 16\], expected \[128, 32\]"),
    "int64 qweight": (lambda p: _edit_tensors(p, _int64_qweight), "has dtype I64, expected I32"),
    "unquantized but not listed": (lambda p: _edit_tensors(p, _unquantized_layer),
                                   "add it to quantization_config.modules_to_not_convert"),
    "wrong group size": (lambda p: _edit_config(p, group_size=32), r"expected \[4, 16\] for group_size=32"),
    "gptq": (lambda p: _edit_config(p, quant_method="gptq"), "quant_method='gptq' is not 'awq'"),
    "gemv": (lambda p: _edit_config(p, version="gemv"), "version 'gemv' is not supported"),
    "marlin": (lambda p: _edit_config(p, version="marlin"), "version 'marlin' is not supported"),
    "3 bits": (lambda p: _edit_config(p, bits=3), "4-bit codes only"),
    "symmetric": (lambda p: _edit_config(p, zero_point=False), "symmetric"),
    "truncated file": (_truncate, "model.safetensors is not a readable safetensors file"),
    "no quantization_config": (_drop_quantization_config, "not an AWQ checkpoint"),
    "pickle only": (_pickle_only, "never unpickles"),
    "missing shard": (_index_with_missing_shard, "lists model-00002-of-00002.safetensors, which is missing"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoints_give_clear_errors(tmp_path, saved, case):
    corrupt, match = CORRUPTIONS[case]
    path = _copy(saved["out"], tmp_path / "bad")
    corrupt(path)
    with pytest.raises(AwqNbError, match=match):
        load_quantized(path)


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_failed_save_leaves_no_folder(tmp_path, saved, monkeypatch):
    calls = []

    real = ckpt.write_shard

    def failing_write_shard(file, metadata):
        calls.append(file.path)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(file, metadata)

    monkeypatch.setattr(ckpt, "write_shard", failing_write_shard)
    with pytest.raises(OSError, match="simulated"):
        save_quantized(saved["model"], None, tmp_path / "out", AWQConfig(group_size=G), max_shard_size="100KB")
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a hidden partial one


def test_failed_resave_keeps_the_previous_checkpoint(tmp_path, saved, monkeypatch):
    out = _copy(saved["out"], tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(ckpt, "write_shard", lambda *a, **k: (_ for _ in ()).throw(OSError("interrupted (simulated)")))
    with pytest.raises(OSError, match="simulated"):
        save_quantized(saved["model"], None, out, AWQConfig(group_size=G), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before and [p.name for p in tmp_path.iterdir()] == ["out"]
    load_quantized(out)


def test_overwrite_rules(tmp_path, saved):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "important.txt").write_text("keep me")
    with pytest.raises(AwqNbError, match="not empty .*overwrite=True"):
        save_quantized(saved["model"], None, other, AWQConfig(group_size=G))
    assert [p.name for p in other.iterdir()] == ["important.txt"]
    save_quantized(saved["model"], None, other, AWQConfig(group_size=G), overwrite=True)
    assert (other / "important.txt").read_text() == "keep me" and (other / "model.safetensors").is_file()
    # an earlier AWQ checkpoint is not replaced without overwrite=True either
    with pytest.raises(AwqNbError, match="holds an AWQ checkpoint"):
        save_quantized(saved["model"], None, other, AWQConfig(group_size=32))
    assert read_quant_config(other)["group_size"] == G
    (tmp_path / "empty").mkdir()
    save_quantized(saved["model"], None, tmp_path / "empty", AWQConfig(group_size=G))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes"]


def test_overwrite_replaces_only_the_checkpoint_files(tmp_path, saved):
    # The reported data loss: re-saving into a checkpoint folder deleted the model card, the
    # summary and the search results. Now only the checkpoint's own files change.
    out = tmp_path / "ckpt"
    save_quantized(saved["model"], None, out, AWQConfig(group_size=G), max_shard_size="100KB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    (out / "README.md").write_text("card")
    (out / "awq_nb_summary.json").write_text("{}")
    model, _ = load_quantized(out)
    save_quantized(model, None, out, overwrite=True)  # one shard now
    names = sorted(p.name for p in out.iterdir())
    assert "README.md" in names and "awq_nb_summary.json" in names
    assert (out / "README.md").read_text() == "card"
    assert "model.safetensors" in names and not any(n.startswith("model-") for n in names), names
    assert "model.safetensors.index.json" not in names  # stale shards and index are gone
    load_quantized(out)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_stale_partials_of_a_killed_save_are_removed_and_reported(tmp_path, saved):
    out = tmp_path / "out"
    stale = [tmp_path / ".out.abc123.partial", tmp_path / ".out.partial-xyz", tmp_path / ".out.q1w2.old"]
    fresh = tmp_path / ".out.new.partial"
    unrelated = tmp_path / ".other.abc.partial"
    for d in (*stale, fresh, unrelated):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half written")
    past = ckpt._PROCESS_START - 3600
    for d in (*stale, unrelated):
        os.utime(d, (past, past))
    with pytest.warns(UserWarning, match="removed 3 unfinished folder"):
        save_quantized(saved["model"], None, out, AWQConfig(group_size=G))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", fresh.name, unrelated.name])  # another target's and a live one's stay


# ---------------------------------------------------------------------------------------------
# a real model (the lead un-skips this once awq_nb.load_model exists)


@torch.no_grad()
def greedy_cached(model, ids, steps=16):
    """Greedy decoding with the KV cache: one token per forward after the prompt."""
    out = model(ids, use_cache=True)
    for _ in range(steps):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return ids


def test_smollm2_roundtrip(tmp_path):
    if not hasattr(awq_nb, "load_model"):
        pytest.skip("awq_nb.load_model is not there yet (models.py is being written by the lead)")
    try:
        model, tok = awq_nb.load_model("smollm2-135m")
    except AwqNbError as e:  # the bundled-model package is not installed here
        pytest.skip(f"smollm2-135m is not available: {e}")
    model = model.half().float().eval()  # the checkpoint stores the unquantized weights in fp16
    fq = fake_quant(model, group_size=G)
    out = save_quantized(model, tok, tmp_path / "smollm2-awq", AWQConfig(w_bit=4, group_size=G))
    del model
    loaded, tok2 = load_quantized(out, dtype=torch.float32)
    prompt = tok2("The capital of France is", return_tensors="pt").input_ids
    seq = greedy_cached(fq, prompt)  # the fake-quant model's 16 greedy tokens
    ref, got = logits(fq, seq), logits(loaded, seq)
    # fp16 scales: compare relative to the logit range (measured ~1e-3 of it)
    assert (got - ref).abs().max() < 1e-2 * ref.abs().max()
    # The loaded model's greedy tokens are the same 16 iff its argmax at every position from the
    # end of the prompt on picks the next token of `seq` (teacher forcing: one forward instead of 16).
    p = prompt.shape[1]
    assert torch.equal(got[0, p - 1:-1].argmax(-1), seq[0, p:])


def _flip_byte_in(file, tensor: str):
    """Flip one byte in the middle of ``tensor``'s data inside a safetensors file."""
    raw = bytearray(file.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + header_len])[tensor]["data_offsets"]
    raw[8 + header_len + (start + end) // 2] ^= 0x10
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize("tensor", ["model.layers.0.self_attn.q_proj.qweight", "model.embed_tokens.weight"])
def test_a_flipped_byte_is_caught_at_load(tmp_path, saved, tensor):
    path = _copy(saved["out"], tmp_path / "ck")
    _flip_byte_in(path / "model.safetensors", tensor)
    with pytest.raises(AwqNbError, match=f"model.safetensors: tensor '{tensor}' does not match the checksum"):
        load_quantized(path)
    load_quantized(path, verify=False)  # the escape hatch: loads, unverified


def test_saving_twice_gives_the_same_bytes(tmp_path, saved):
    # safetensors keeps metadata in a hash map whose order changes between saves; the header is
    # rewritten with sorted keys, so a checkpoint's files (and their hashes) depend on content only.
    a = save_quantized(saved["model"], None, tmp_path / "a", AWQConfig(group_size=G), max_shard_size="100KB")
    b = save_quantized(saved["model"], None, tmp_path / "b", AWQConfig(group_size=G), max_shard_size="100KB")
    names = sorted(p.name for p in a.iterdir())
    assert len(names) > 3 and names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    with safe_open(str(next(a.glob("*.safetensors"))), "pt") as f:
        assert list(f.metadata()) and f.keys()  # still a valid safetensors file
    load_quantized(a)

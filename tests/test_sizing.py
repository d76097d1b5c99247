"""awq_nb.estimate: sizes from the config agree with a model built on the meta device, the memory
model reproduces the measured runs it was not fitted to, and the verdicts say what does not fit."""
import pytest
import torch

import awq_nb
from awq_nb import AwqNbError, sizing

GB = 1e9

# Published shapes (each model's config.json on the hub), written out: the hub is not reachable here.
LLAMA31_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                  torch_dtype="bfloat16")
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, head_dim=128,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
QWEN25_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                 torch_dtype="bfloat16")
GEMMA3_4B_TEXT = dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                      tie_word_embeddings=True, torch_dtype="bfloat16")
LLAMA31_70B = dict(LLAMA31_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
# bench/big_model.py's synthetic model (docs/big-models.md, 2026-12-01), stored in fp16
BENCH = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, torch_dtype="float16")


def _meta_counts(cfg: dict) -> tuple[int, int]:
    """(all parameters, the Linear weights of block 0) of the model built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.tie_weights()  # built under init_empty_weights, Gemma3's head is not tied to the embeddings yet
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    block = model.model.layers[0]
    linears = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    return total, linears


def _bundled_config(name: str) -> dict:
    import json
    from pathlib import Path

    from awq_nb.models import resolve_model_path

    return json.loads((Path(resolve_model_path(name)) / "config.json").read_text())


@pytest.mark.parametrize("cfg", [LLAMA31_8B, MISTRAL_7B, QWEN25_7B, GEMMA3_4B_TEXT, BENCH, "smollm2-135m", "gemma3-270m"],
                         ids=["llama3.1-8b", "mistral-7b", "qwen2.5-7b", "gemma3-4b", "bench", "smollm2", "gemma3-270m"])
def test_sizes_agree_with_a_meta_device_model(cfg):
    cfg = _bundled_config(cfg) if isinstance(cfg, str) else cfg
    shapes = sizing.shapes_of(cfg)
    total, block_linears = _meta_counts(cfg)
    assert shapes.block_params == block_linears  # every Linear of a block, exactly
    assert shapes.params == pytest.approx(total, rel=2e-3)  # norms and biases are left out


def test_published_sizes():
    # Llama-3.1-8B is "8B": 8.03e9 parameters, 16 GB in bf16; its AWQ checkpoints are ~5.7 GB
    est = awq_nb.estimate(LLAMA31_8B, "T4")
    assert 8.0e9 < est.params < 8.1e9
    assert est.download_bytes == pytest.approx(2 * est.params)
    assert 5.5 * GB < est.checkpoint_bytes < 6.0 * GB


def test_checkpoint_size_matches_a_saved_checkpoint(tmp_path):
    from awq_nb.checkpoint import save_quantized
    from awq_nb.wqlinear import replace_with_wqlinear
    from tiny_models import tiny_model

    model = tiny_model("llama", hidden=128, layers=2)
    replace_with_wqlinear(model, awq_nb.AWQConfig(w_bit=4, group_size=32))
    out = save_quantized(model, None, tmp_path / "q", awq_nb.AWQConfig(w_bit=4, group_size=32))
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    predicted = sizing.checkpoint_bytes(sizing.shapes_of(model.config.to_dict()), group_size=32)
    assert predicted == pytest.approx(written, rel=0.1)  # headers and norms are not counted


@pytest.mark.parametrize("path, settings, measured", [
    # docs/big-models.md, 2026-12-01: `python bench/big_model.py --both`, 4 x 128 tokens, fp32 search.
    # The streaming run is the one Costs.temp_factor was fitted to; the others were not.
    ("streaming", dict(model=BENCH, n_samples=4, seqlen=128, search_samples=2), 2.66 * GB),
    ("in_memory", dict(model=BENCH, n_samples=4, seqlen=128, search_samples=2), 7.19 * GB),
    # docs/colab.md, 2026-12-01: `python bench/big_model.py --layers 4` (streaming), peak RSS 2.14 GB
    ("streaming", dict(model=dict(BENCH, num_hidden_layers=4), n_samples=4, seqlen=128, search_samples=2), 2.14 * GB),
    # docs/benchmarks.md, 2026-11-30: SmolLM2 w4g64 at 128 x 512, the CLI, peak RSS 1.438 GB
    ("in_memory", dict(model="smollm2-135m", group_size=64), 1.438 * GB),
])
def test_peak_ram_reproduces_measured_runs(path, settings, measured):
    est = awq_nb.estimate(device="cpu", ram_gb=24, disk_gb=100, dtype="float32", **settings)
    assert getattr(est, path).ram_bytes == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize("cfg", [LLAMA31_8B, MISTRAL_7B, QWEN25_7B], ids=["llama3.1-8b", "mistral-7b", "qwen2.5-7b"])
def test_7_8b_on_a_free_t4_only_streams(cfg):
    est = awq_nb.estimate(cfg, "T4")
    assert est.fits and est.recommended == "streaming"
    assert not est.in_memory.fits and est.streaming.fits
    assert est.in_memory.ram_bytes > 12.7 * GB > est.streaming.ram_bytes
    assert est.streaming.vram_bytes < 15 * GB
    assert any("RAM" in r and "streaming" in r for r in est.reasons)
    text = str(est)
    assert "estimate" in text and "streaming" in text and "fits: yes" in text


def test_more_ram_lets_the_in_memory_path_fit():
    assert awq_nb.estimate(LLAMA31_8B, "T4", ram_gb=64).in_memory.fits
    a100 = awq_nb.estimate(LLAMA31_8B, "A100-40GB")
    assert a100.in_memory.fits and a100.in_memory.seconds < awq_nb.estimate(LLAMA31_8B, "T4").in_memory.seconds


def test_70b_does_not_fit_a_t4():
    est = awq_nb.estimate(LLAMA31_70B, "T4")
    assert not est.fits and est.recommended is None
    assert any("smaller model" in r for r in est.reasons)
    assert any("GPU memory" in r for r in est.reasons) and any("disk" in r for r in est.reasons)
    assert "fits: NO" in str(est)


def test_deleting_shards_lowers_the_disk_needed():
    keep, drop = (awq_nb.estimate(LLAMA31_70B, "T4", delete_shards=d).streaming.disk_bytes for d in (False, True))
    assert drop < keep - 100 * GB


def test_cpu_device_reads_this_machine(monkeypatch):
    import awq_nb.memory

    monkeypatch.setattr(awq_nb.memory, "available_ram_bytes", lambda: 8 * GB)
    est = awq_nb.estimate(LLAMA31_8B, "cpu")
    assert est.device.ram_bytes == 8 * GB and est.device.vram_bytes is None and est.streaming.vram_bytes is None
    assert not est.fits and any("GPU runtime" in r for r in est.reasons)
    assert est.streaming.seconds > 20 * awq_nb.estimate(LLAMA31_8B, "T4").streaming.seconds


def test_auto_device_without_a_gpu_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    est = awq_nb.estimate(BENCH, "auto")
    assert est.device.vram_bytes is None and "CPU" in est.device.name


def test_dtype_sets_the_model_bytes():
    fp32, fp16 = (awq_nb.estimate(LLAMA31_8B, "A100-40GB", dtype=d) for d in (torch.float32, "float16"))
    # fp32: the model in 4 bytes a weight, plus the bf16 file's pages while it is cast
    assert fp32.in_memory.ram_bytes > 6 * fp16.params > 2 * fp16.params > fp16.in_memory.ram_bytes - 4 * GB
    with pytest.raises(AwqNbError, match="dtype='int8' is not supported"):
        awq_nb.estimate(LLAMA31_8B, dtype="int8")


def test_calibration_tokens_cost_memory_and_time():
    small, large = (awq_nb.estimate(BENCH, "cpu", ram_gb=24, disk_gb=100, n_samples=n) for n in (32, 256))
    assert large.streaming.ram_bytes - small.streaming.ram_bytes == pytest.approx(224 * 512 * 2048 * 4)
    assert large.streaming.seconds > small.streaming.seconds


def test_accepts_a_pretrained_config_and_a_hub_id(monkeypatch):
    from transformers import AutoConfig, LlamaConfig

    hf = LlamaConfig(**{k: v for k, v in LLAMA31_8B.items() if k != "model_type"})
    assert awq_nb.estimate(hf).params == awq_nb.estimate(LLAMA31_8B).params
    asked = []

    def fake(name, **kw):
        asked.append(name)
        return hf

    monkeypatch.setattr(AutoConfig, "from_pretrained", staticmethod(fake))
    est = awq_nb.estimate("meta-llama/Llama-3.1-8B", "T4")
    assert asked == ["meta-llama/Llama-3.1-8B"] and est.model == "meta-llama/Llama-3.1-8B" and est.download_bytes > 15 * GB


def test_local_folder_needs_no_download(tmp_path):
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "m")
    est = awq_nb.estimate(str(tmp_path / "m"), "cpu", ram_gb=8, disk_gb=10)
    assert est.download_bytes == 0 and est.fits


@pytest.mark.parametrize("cfg, words", [
    (dict(model_type="t5", d_model=512, vocab_size=32128), ["t5", "not a causal LM"]),
    (dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, vocab_size=30522),
     ["BertLMHeadModel", "not an architecture awq_nb quantizes"]),
    ({k: v for k, v in LLAMA31_8B.items() if k != "hidden_size"}, ["lacks hidden_size", "full config.json"]),
    ({k: v for k, v in LLAMA31_8B.items() if k != "intermediate_size"}, ["lacks intermediate_size"]),
    ({k: v for k, v in LLAMA31_8B.items() if k != "model_type"}, ["no model_type"]),
])
def test_bad_configs_are_named(cfg, words):
    with pytest.raises(AwqNbError) as e:
        awq_nb.estimate(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_model_and_device_are_named(monkeypatch):
    from transformers import AutoConfig

    def offline(name, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(AutoConfig, "from_pretrained", staticmethod(offline))
    with pytest.raises(AwqNbError, match="could not read the config of 'someone/model'.*network"):
        awq_nb.estimate("someone/model")
    with pytest.raises(AwqNbError, match="did you mean the bundled 'smollm2-135m'"):
        awq_nb.estimate("smollm2-135")
    with pytest.raises(AwqNbError, match="device='TPU' is not known"):
        awq_nb.estimate(LLAMA31_8B, "TPU")
    with pytest.raises(AwqNbError, match="takes a hub id"):
        awq_nb.estimate(42)

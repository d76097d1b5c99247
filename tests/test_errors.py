"""Bad input gets a clear error that names the problem and the fix, and nothing is silently wrong.

Library-level checks on tiny models (fast); the CLI's exit codes for them are in test_cli.py.
"""
import json
import warnings

import pytest
import torch

from awq_nb import AWQConfig, check_model, load_model
from awq_nb.cli import main as cli_main
from awq_nb.errors import AwqNbError
from awq_nb.evaluate import perplexity
from awq_nb.models import _check_local_folder, check_seqlen
from awq_nb.wqlinear import replace_with_wqlinear
from tiny_models import tiny_model, tiny_tokenizer


def _folder(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_other_quantization_formats_are_named_with_what_reads_them(tmp_path):
    path = _folder(tmp_path, {"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(AwqNbError, match="gptq checkpoint, not AWQ.*optimum"):
        load_model(path)


def test_encoder_decoder_is_refused_before_loading(tmp_path):
    path = _folder(tmp_path, {"model_type": "t5", "d_model": 64})
    with pytest.raises(AwqNbError, match="'t5' is not a causal LM"):
        load_model(path)


def test_ignored_custom_code_is_said(tmp_path):
    path = _folder(tmp_path, {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling.MyLlama"}})
    with pytest.warns(UserWarning, match="custom code .auto_map. that is ignored"):
        _check_local_folder(path, trust_remote_code=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_local_folder(path, trust_remote_code=True)


def test_bundled_name_typo_is_caught_at_once():
    with pytest.raises(AwqNbError, match="did you mean the bundled 'smollm2-135m'"):
        load_model("smollm2-136m")


def test_nan_in_a_norm_weight_is_an_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[3] = float("nan")
    with pytest.raises(AwqNbError, match="input_layernorm.weight has NaN"):
        check_model(model, AWQConfig(group_size=32))


def test_an_already_quantized_model_is_named_so():
    model = tiny_model("llama")
    replace_with_wqlinear(model, AWQConfig(group_size=32))
    with pytest.raises(AwqNbError, match="already AWQ-quantized"):
        check_model(model, AWQConfig(group_size=32))


def test_seqlen_beyond_learned_positions_is_an_error_and_beyond_rotary_a_warning():
    gpt2 = tiny_model("gpt2")
    limit = gpt2.config.n_positions
    check_seqlen(gpt2, limit)
    with pytest.raises(AwqNbError, match=f"longer than this model's {limit} positions"):
        check_seqlen(gpt2, limit + 1)
    llama = tiny_model("llama")
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        check_seqlen(llama, llama.config.max_position_embeddings + 1)


def test_perplexity_never_reports_nan():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    windows = torch.randint(0, model.config.vocab_size, (2, 16))
    with pytest.raises(AwqNbError, match="non-finite"):
        perplexity(model, windows=windows)


def test_cli_unexpected_errors_are_one_line_with_exit_1(monkeypatch, capsys, tmp_path):
    import awq_nb.cli as cli

    def boom(a):
        raise RuntimeError("something odd\nsecond line")

    monkeypatch.setattr(cli, "cmd_eval", boom)
    assert cli_main(["eval", "whatever"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: RuntimeError: something odd (unexpected; run again with --debug for the traceback, "
                   "and report it if the input looks right)"]
    with pytest.raises(RuntimeError):
        cli_main(["--debug", "eval", "whatever"])


def test_pickle_only_folders_say_how_to_convert_or_opt_in(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # what older hub repositories hold
    with pytest.raises(AwqNbError, match="only pickled weights .*convert once.*allow_pickle=True"):
        load_model(str(tmp_path))
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="can run code"):
        loaded, _ = load_model(str(tmp_path), allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_offline_mode_is_said_when_the_hub_cannot_be_asked(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # it reads the variable at import
    with pytest.raises(AwqNbError, match="Offline mode is on .HF_HUB_OFFLINE=1."):
        load_model("no-such-org/no-such-model")


def test_quantizing_an_awq_checkpoint_again_is_named(tmp_path, capsys):
    from awq_nb.checkpoint import save_quantized

    model = tiny_model("llama")
    save_quantized(model, tiny_tokenizer(), tmp_path / "ck", AWQConfig(group_size=32))
    assert cli_main(["quantize", str(tmp_path / "ck"), "--out", str(tmp_path / "again"), "--group-size", "32"]) == 2
    assert "already AWQ-quantized" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()

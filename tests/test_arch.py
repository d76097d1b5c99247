"""Every registered family: folding arbitrary positive scales into the weights leaves the logits unchanged."""
import pytest
import torch
from torch import nn

import awq_nb
from awq_nb.arch import REGISTRY, get_blocks, get_spec, resolve_groups, weight_nk
from awq_nb.results import AWQResult, ScaleRecord
from tiny_models import FAMILIES, tiny_model


def _random_scale_result(model, seed=1):
    spec = get_spec(model)
    g = torch.Generator().manual_seed(seed)
    recs = []
    for i, block in enumerate(get_blocks(model, spec)):
        for rg in resolve_groups(block, spec):
            s = torch.exp(torch.randn(rg.in_features, generator=g) * 0.7)  # spans ~0.1 .. 10
            recs.append(ScaleRecord(i, rg.group.prev, list(rg.group.layers), rg.group.inspect, [0.0], [0.0], 0.0, s))
    return AWQResult(config=awq_nb.AWQConfig().to_dict(), scales=recs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folding_scales_keeps_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    result = _random_scale_result(model)
    n_groups_expected = {"gpt2": 2, "gpt_neox": 2, "llama": 3, "mistral": 3, "qwen2": 3, "qwen3": 3, "gemma3": 3}.get(family, 4)
    assert len(result.scales) == n_groups_expected * len(get_blocks(model)), "unexpected number of scaling groups"
    w_before = {n: weight_nk(m).clone() for n, m in awq_nb.arch.find_quantizable(model).items()}
    awq_nb.apply_awq(model, result)
    changed = sum(not torch.equal(w_before[n], weight_nk(m)) for n, m in awq_nb.arch.find_quantizable(model).items())
    assert changed >= len(result.scales), "scales were not folded into the weights"
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def test_gqa_skips_v_to_o():
    model = tiny_model("llama")  # 2 kv heads of 4: v_proj rows (32) != o_proj inputs (64)
    prevs = {rg.group.prev for rg in resolve_groups(get_blocks(model)[0], get_spec(model))}
    assert "self_attn.v_proj" not in prevs and "input_layernorm" in prevs


def test_every_registry_entry_has_a_family_test():
    covered = {FAMILIES[f][1] for f in FAMILIES}
    assert set(REGISTRY) <= covered, f"add tiny models for {set(REGISTRY) - covered}"


def test_unregistered_architecture_error_says_how_to_add():
    class MyNewLM(nn.Module):
        pass

    with pytest.raises(awq_nb.AwqNbError, match=r"MyNewLM.*REGISTRY.*ArchSpec"):
        get_spec(MyNewLM())


def test_nonpositive_scales_rejected():
    model = tiny_model("llama")
    result = _random_scale_result(model)
    result.scales[0].scales[3] = -1.0
    with pytest.raises(awq_nb.AwqNbError, match="finite and positive"):
        awq_nb.apply_awq(model, result)

"""Show the AutoAWQ CPU snapshot bug on one random Linear, and that the runner's patch fixes it.

    .venv-peers/autoawq/bin/python bench/peers/check_autoawq_patch.py

AwqQuantizer._compute_best_scale must leave the inspected module's weights as it found them
(it restores a snapshot after every grid point). On CPU the upstream snapshot aliases the live
weights, so the module comes back scaled by the first grid point's scales. Exits 1 if the
patched call still changes the weights, or if the unpatched call no longer does (then the
patch may be obsolete).
"""

from __future__ import annotations

import sys

import torch

from run_autoawq import patch_snapshot_clone


def weight_change_after_search(quantizer_cls) -> float:
    """Max |W_after - W_before| of one scale search on a random 256->128 Linear."""
    torch.manual_seed(0)
    q = object.__new__(quantizer_cls)        # only the attributes the search reads
    q.w_bit, q.group_size, q.zero_point, q.duo_scaling = 4, 64, True, True
    q.max_chunk_memory, q.n_parallel_calib_samples = 1 << 30, None
    lin = torch.nn.Linear(256, 128, bias=False)
    x = torch.randn(4, 32, 256) * torch.linspace(0.1, 5.0, 256)
    before = lin.weight.detach().clone()
    with torch.no_grad():
        w_mean = (lin.weight.abs().view(-1, 64) / lin.weight.abs().view(-1, 64).amax(1, True))
        w_mean = w_mean.view(128, 256).mean(0)
        q._compute_best_scale(x, w_mean, x.abs().view(-1, 256).mean(0), lin, [lin], lin(x), {})
    return (lin.weight.detach() - before).abs().max().item()


def main() -> int:
    from awq.quantize.quantizer import AwqQuantizer

    upstream = weight_change_after_search(AwqQuantizer)
    patch_snapshot_clone(AwqQuantizer)
    patched = weight_change_after_search(AwqQuantizer)
    print(f"max |dW| after one scale search: upstream {upstream:.3e}, patched {patched:.3e}")
    ok = upstream > 1e-3 and patched == 0.0
    print("OK: upstream leaks the first grid point's scaling, the patch restores W exactly"
          if ok else "UNEXPECTED: see numbers above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

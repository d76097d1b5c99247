"""Everything a laptop user needs works where Triton cannot be installed (macOS, Windows, CPU pip).

Each test runs in a child process whose ``sitecustomize`` (tests/no_triton/) makes ``import
triton`` fail: the package imports, the kernel names that need no Triton, INT4 inference through
``WQLinear`` and a save/load round trip on CPU, and every notebook top to bottom in fast mode.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = ROOT / "tests" / "no_triton"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def no_triton_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(BLOCKER), str(ROOT / "tests"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_python(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=no_triton_env(), timeout=timeout, cwd=ROOT)


def test_the_blocker_blocks():
    done = run_python("""
        import importlib.util
        assert importlib.util.find_spec("triton") is None
        try:
            import triton
        except ImportError:
            print("blocked")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "blocked", done.stderr[-2000:]


def test_package_kernels_and_int4_inference_without_triton(tmp_path):
    done = run_python(f"""
        import torch
        import awq_nb
        from awq_nb import AWQConfig
        from awq_nb.kernels import (awq_matmul, choose_kernel, dequantize_ref, explain, gemm_ref, pack_awq,
                                    prepare_cpu_int4, to_native, from_native, unpack_awq)
        from awq_nb.checkpoint import load_quantized, save_quantized
        from awq_nb.wqlinear import WQLinear, replace_with_wqlinear, prepare_cpu_int4 as prepare_model
        from tiny_models import tiny_model

        assert explain.prepare_triton() is None
        assert "Triton kernels need Linux" in explain.mode_line(None)
        assert "def _gemv_kernel" in explain.kernel_source("gemv", "_gemv_kernel")

        lin = torch.nn.Linear(256, 128).half()
        q = WQLinear.from_linear(lin, 4, 64)
        x = torch.randn(3, 256).half()
        ref = gemm_ref(x, q.qweight, q.qzeros, q.scales, 64, q.bias)
        assert torch.allclose(q(x).float(), ref.float(), atol=2e-2, rtol=2e-2)
        assert q.prepare_cpu_int4()
        assert torch.allclose(q(x).float(), ref.float(), atol=5e-2, rtol=5e-2)
        w = to_native(q.qweight, q.qzeros, q.scales, 64)
        assert torch.equal(from_native(w)[0], q.qweight)

        model, tok = tiny_model("llama"), None
        ids = torch.randint(0, model.config.vocab_size, (1, 12))
        config = AWQConfig(w_bit=4, group_size=32)
        replace_with_wqlinear(model, config)
        with torch.no_grad():
            before = model(ids).logits
        save_quantized(model, tok, {str(tmp_path / 'ckpt')!r}, config)
        loaded, _ = load_quantized({str(tmp_path / 'ckpt')!r})
        with torch.no_grad():
            after = loaded(ids).logits
        assert torch.allclose(before.float(), after.float(), atol=1e-2), (before - after).abs().max()
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_without_triton(path: Path, tmp_path):
    pytest.importorskip("nbclient")
    done = run_python(f"""
        import os
        os.environ.update(AWQ_NB_FAST="1", AWQ_NB_OUT={str(tmp_path / 'outputs')!r}, HF_HUB_OFFLINE="1",
                          TOKENIZERS_PARALLELISM="false")
        os.environ.pop("AWQ_NB_MODEL", None)
        import nbclient, nbformat
        nb = nbformat.read({str(path)!r}, as_version=4)
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={{"metadata": {{"path": {str(path.parent)!r}}}}}).execute()
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        errors = [o for o in outputs if o.get("output_type") == "error"]
        assert not errors, errors
        shown = [o.get("text", "") + "".join(str(v) for v in o.get("data", {{}}).values()) for o in outputs]
        notes = sum("Triton kernels need Linux" in s for s in shown)
        print("TRITON_NOTES=" + str(notes))
    """, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    if path.name.startswith("05_"):  # says it once, visibly, instead of a traceback
        assert done.stdout.strip().endswith("TRITON_NOTES=1"), done.stdout[-500:]


def test_native_weight_runs_through_torch_without_triton():
    # A CUDA GPU without Triton (Windows) takes the native path with torch's dequantize + matmul;
    # the same function runs here on CPU tensors.
    done = run_python("""
        import torch
        from awq_nb.kernels import dispatch, gemm_ref, to_native
        from awq_nb.kernels.native import dequantize_native
        from awq_nb.kernels.reference import dequantize_ref
        from awq_nb.kernels.layout import pack_awq

        g = torch.Generator().manual_seed(0)
        qweight = pack_awq(torch.randint(0, 16, (256, 72), generator=g, dtype=torch.int32))
        qzeros = pack_awq(torch.randint(0, 16, (4, 72), generator=g, dtype=torch.int32))
        scales = (torch.rand(4, 72, generator=g) * 0.02).half()
        w = to_native(qweight, qzeros, scales, 64)
        assert torch.equal(dequantize_native(w), dequantize_ref(qweight, qzeros, scales, 64))
        assert not dispatch.triton_available()
        x = torch.randn(3, 256, generator=g)
        out = dispatch._cuda_matmul(dispatch.GEMV, x, w, None)
        ref = gemm_ref(x, qweight, qzeros, scales, 64)
        assert torch.allclose(out, ref, atol=1e-2, rtol=1e-2), (out - ref).abs().max()
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

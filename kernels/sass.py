"""Compile the INT4 kernels for a GPU that is not there, and read their machine code.

No GPU is needed: Triton compiles for a named target (``GPUTarget("cuda", 90, 32)``), and the
triton wheel ships NVIDIA's ``ptxas`` (registers, spills) and ``nvdisasm`` (SASS). What matters
is that the compile sees exactly what a launch would: the same kernel arguments, the same
launch configuration, and the same *specialization*. Triton's JIT specializes every launch on its
arguments: pointers and integers divisible by 16 get ``tt.divisibility = 16`` (which is what
allows 128-bit loads), integers equal to 1 become constants. :func:`compile_launch` builds real
(CPU) argument tensors with the shapes of the launch, runs them through the JIT's own binder to
get that specialization, and compiles with it. (Without it the same GEMV showed scalar loads and
201 registers instead of 128-bit loads and ~120 registers.)

:func:`analyze` then reads the SASS. The hottest loop is the body of the backward branch that
contains the weight loads; the kernels mark their K loop ``loop_unroll_factor=1`` so that body is
one K step, whose number of weights per thread the launch configuration gives. Counted per loop:
instructions, global loads and their widths, shared-memory and barrier instructions.

The instruction budget: at ~4.3 TB/s an H200's 132 SMs at ~1.98 GHz must each consume ~33 int4
weights per clock while issuing at most 128 thread-instructions per clock, so ~3.9 instructions
per weight is the most a bandwidth-bound GEMV can spend (docs/kernels.md).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch

BUDGET_PER_WEIGHT = 3.9  # instructions per weight an H200 can issue at full memory bandwidth


def tool_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def tools_available() -> str | None:
    """None when ptxas and nvdisasm are present in the triton wheel, else a reason."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    missing = [t for t in ("ptxas", "nvdisasm") if not os.path.exists(os.path.join(tool_dir(), t))]
    return f"{', '.join(missing)} not found in {tool_dir()}" if missing else None


def _ptxas() -> str:
    for name in ("ptxas-blackwell", "ptxas"):  # the newer one knows every target the older does
        path = os.path.join(tool_dir(), name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError("ptxas not found in the triton wheel")


@dataclass
class Compiled:
    ptx: str
    sass: str
    registers: int
    spill_bytes: int
    smem_bytes: int


def compile_launch(kernel, args: tuple, meta: dict, capability: int) -> Compiled:
    """Compile ``kernel[grid](*args, **meta)`` for sm_<capability> with the JIT's specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kernel  # a triton JITFunction
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    options = {key: meta[key] for key in ("num_warps", "num_stages", "enable_fp_fusion") if key in meta}
    kwargs = {key: value for key, value in meta.items() if key not in options}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, parsed = binder(*args, **kwargs, **options)
    _, signature, constexprs, attrs = fn._pack_args(backend, {**kwargs, **options}, bound, specialization, parsed)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", ptx_path, "-o", cubin_path],
                              capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(tool_dir(), "nvdisasm"), "-c", cubin_path],
                              capture_output=True, text=True, check=True).stdout
    registers = int(re.findall(r"Used (\d+) registers", done.stderr)[-1])
    spills = int((re.findall(r"(\d+) bytes spill stores", done.stderr) or ["0"])[-1])
    return Compiled(compiled.asm["ptx"], sass, registers, spills, int(compiled.metadata.shared))


def instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """The SASS instruction texts in order, and each label's index into them."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins:
            instrs.append(ins.group(1))
    return instrs, labels


def loops(sass: str) -> list[list[str]]:
    """Bodies of the backward branches (label .. branch), innermost first."""
    instrs, labels = instructions(sass)
    bodies = []
    for i, ins in enumerate(instrs):
        target = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", ins)
        if target and labels.get(target.group(1), i + 1) <= i:
            bodies.append(instrs[labels[target.group(1)]:i + 1])
    return sorted(bodies, key=len)


def opcode(ins: str) -> str:
    words = ins.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0] if words else ""


@dataclass
class LoopStats:
    instructions: int
    global_loads: list[str]
    widest_load_bits: int          # of the weight loads (plain LDG)
    shared_or_barrier: int
    opcodes: dict


def loop_stats(body: list[str]) -> LoopStats:
    ops = [opcode(i) for i in body]
    loads = [o for o in ops if o.startswith("LDG")]
    # Weights come through tl.load (plain LDG); x, scales and zeros through the asm helpers'
    # ld.global.nc, which SASS shows as LDG.*.CONSTANT. The weights' width is what matters.
    bits = [128 if ".128" in o else 64 if ".64" in o else 32 for o in loads if ".CONSTANT" not in o]
    shared = sum(o.startswith(("LDS", "STS", "BAR", "LDSM", "STSM")) for o in ops)
    counts: dict = {}
    for o in ops:
        base = o.split(".")[0]
        counts[base] = counts.get(base, 0) + 1
    return LoopStats(len(body), loads, max(bits, default=0), shared, dict(sorted(counts.items(), key=lambda kv: -kv[1])))


def hottest_loop(sass: str, min_weight_loads: int = 1) -> LoopStats | None:
    """The innermost backward-branch loop that issues global loads (the K loop)."""
    for body in loops(sass):
        stats = loop_stats(body)
        if len(stats.global_loads) >= min_weight_loads:
            return stats
    return None


@dataclass
class KernelReport:
    name: str
    sm: int
    m: int
    registers: int
    spill_bytes: int
    smem_bytes: int
    weight_load_bits: int
    loop_instructions_per_weight: float
    loop_shared_or_barrier: int
    ctas_4096: int
    ctas_8192: int
    config: str = ""
    loop_instructions: int = 0
    weights_per_thread_per_step: int = 0
    ceiling_tb_s: float = 0.0   # H200 at 132 SMs x 1.98 GHz if issue were the only limit

    def as_json(self) -> dict:
        return asdict(self)


def issue_ceiling_tb_s(per_weight: float, sms: int = 132, ghz: float = 1.98) -> float:
    """Bytes per second of int4 weights (0.5 B each) that ``per_weight`` instructions allow."""
    return 128 / per_weight * 0.5 * sms * ghz * 1e9 / 1e12


def example_native(k: int, n: int, group_size: int, scale_dtype=torch.float16):
    """A zero-filled native weight of the given shape on CPU (for compiling; values do not matter)."""
    from .native import NativeInt4

    return NativeInt4(torch.zeros(k // 8, n, dtype=torch.int32), torch.zeros(k // group_size, n, dtype=torch.uint8),
                      torch.zeros(k // group_size, n, dtype=scale_dtype), group_size)

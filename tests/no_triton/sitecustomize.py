"""Make ``import triton`` fail in this process, as on macOS/Windows where Triton has no wheels.

Put this folder first on PYTHONPATH. ``sys.modules["triton"] = None`` makes ``import triton``
raise ModuleNotFoundError and ``importlib.util.find_spec("triton")`` return None, which is how
an uninstalled package looks to torch and transformers too.
"""
import sys

for _name in ("triton", "triton.language"):
    sys.modules[_name] = None

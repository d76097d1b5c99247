"""awq-nb: activation-aware weight quantization, one visible step at a time."""
__version__ = "0.1.0"

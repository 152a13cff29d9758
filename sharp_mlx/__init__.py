"""sharp_mlx: SHARP layer sharing with low-rank recovery for Llama models in MLX."""

from .io.checkpoint import load, save

__all__ = ["load", "save"]

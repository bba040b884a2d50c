"""Small built-in models with the real block structure of DiTs and UNets (no diffusers needed)."""

from difforge.models.tiny import TinyDiT, TinyUNet, UNetResBlock

__all__ = ["TinyDiT", "TinyUNet", "UNetResBlock"]

"""Fused kernels for the Anima hot path (Triton) beside their plain-PyTorch references (kernels/reference.py)."""

"""Fused attention kernels in Triton, with a PyTorch fallback. Imports nothing from Anexa."""

"""Triton kernels, one module per op family (``sgmv``: shrink, expand, fused add_lora).

Importing this package imports Triton; ``import lora_kernels`` does not (it loads this on first use).
"""

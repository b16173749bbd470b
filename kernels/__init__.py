"""Fused tensor ops for the engine (torch reference + optional Triton/CUDA), selected at runtime.

Reserved: no op is fused yet; the engine uses plain torch until a GPU benchmark shows a hot spot.
"""

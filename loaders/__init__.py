"""Data path: dataset sources, .beton conversion, FFCV loading and the DALI memory-driven RandAugment.

Submodules import ffcv / DALI lazily; importing this package loads neither.
"""

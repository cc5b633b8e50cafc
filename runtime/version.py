"""The toolchain's version, and the first runtime version that can load builds of the current graph contract.

One number for both layers (one distribution, ``ecar-export``): ``runtime.__version__`` and
``ecar_export.__version__`` are this. Builds record both in their manifest
(:mod:`runtime.manifest`); a runtime older than a build's ``runtime.min_version`` refuses it,
naming both versions.
"""

__version__ = "0.4.0"
# Graph contract 2 (one backbone for every stage, external weight data) first loads in 0.2.0; manifests whose
# model config names its tokenizer (its kind, layout, latent scale and shift, image output) in 0.3.0;
# graph contract 3 (the request plan and the stage constants as build data, flow graphs over token grids) in 0.4.0.
MIN_RUNTIME_FOR_CONTRACT = "0.4.0"

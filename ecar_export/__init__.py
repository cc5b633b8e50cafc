"""Torch side of the ECAR toolchain (the export layer): the reference model, checkpoints, demo
training, ONNX export, precision recipes and engine builders. Needs the ``export`` extra."""

from runtime.version import __version__

__all__ = ["__version__"]

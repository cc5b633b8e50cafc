"""Torch side of the ECAR toolchain: the reference model, checkpoints, demo training,
per-stage ONNX export and engine builders."""

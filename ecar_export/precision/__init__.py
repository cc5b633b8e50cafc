"""Precision recipes: rewrite fp32 ONNX graphs into FP16 or explicit-INT8 (Q/DQ) graphs.

TensorRT 11 builds strongly typed networks only, so precision is decided here, in the
graphs; ONNX Runtime runs the very same graphs on the CPU, which is how they are tested.
"""

"""TensorRT facts shared by the plan builder (``ecar_export``) and the runtime backend.

Nothing here imports TensorRT at module import time: :func:`loader.load_tensorrt` does, when
called. :mod:`runtime.trt.loader` finds TensorRT and the CUDA build it needs, owns the
process-wide TensorRT logger and creates runtimes; :mod:`runtime.trt.compat` decides whether
a build's plans can run on this machine.
"""

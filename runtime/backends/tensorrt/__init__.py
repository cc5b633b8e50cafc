"""The TensorRT backend and everything TensorRT-specific that the runtime and the plan builder share.

=================  ==================================================================
``backend``        :class:`TensorRTBackend` (load, ``run``, the device-resident request), ``probe``
``engine``         one deserialized plan checked against its graph contract; enqueue
``workspace``      every buffer of a request at one batch size (device and pinned host)
``memory``         device allocations, pinned host arrays, the shared activation buffer, event timing
``cuda_graphs``    CUDA-graph capture of a stage's flow loop
``shapes``         concrete shapes from the contract's symbolic dims
``gpu``            the CUDA driver API through ctypes (devices, memory, streams, events, graphs)
``loader``         finding TensorRT and the CUDA build it needs, its logger, runtimes and builders
``compat``         whether a build's plans can run on this machine
=================  ==================================================================

The plan builder (``ecar_export.backends.tensorrt``) uses ``gpu``, ``loader`` and ``compat``.
Nothing here imports TensorRT at import time.
"""

from runtime.backends.tensorrt.backend import TensorRTBackend, probe

__all__ = ["TensorRTBackend", "probe"]

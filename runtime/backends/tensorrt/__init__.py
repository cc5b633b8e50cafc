"""The TensorRT backend, one job per module.

=================  ==================================================================
``backend``        :class:`TensorRTBackend` (load, ``run``, the device-resident stage loop), ``probe``
``engine``         one deserialized plan checked against its graph contract; enqueue
``workspace``      every buffer of a request at one batch size (device and pinned host)
``memory``         device allocations, pinned host arrays, the shared activation buffer, event timing
``cuda_graphs``    CUDA-graph capture of a stage's flow loop
``shapes``         concrete shapes from the contract's symbolic dims
=================  ==================================================================

Finding TensorRT, its logger and the plan-compatibility rules live in :mod:`runtime.trt`,
shared with the plan builder. Nothing here imports TensorRT at import time.
"""

from runtime.backends.tensorrt.backend import DeviceRunResult, TensorRTBackend, probe

__all__ = ["DeviceRunResult", "TensorRTBackend", "probe"]

"""What a build does for each backend after the ONNX graphs are written (the runtime side: ``runtime.backends``).

==============  ==================================================================
``tensorrt``    compile every graph into a TensorRT plan (one profile per stage)
``openvino``    have OpenVINO read and compile every graph once, so a graph it cannot run
                fails the build, not the first request
==============  ==================================================================

ONNX Runtime needs nothing beyond the graphs.
"""

"""composekit's export toolchain: checkpoint converters (and, later, ONNX / TensorRT exporters).

Needs the ``export`` extra (torch, diffusers, transformers). Run ``composekit-export --help``.
"""

"""composekit's export toolchain: ONNX export, TensorRT engines and checkpoint converters.

Installed as ``composekit_export`` (the repository folder is ``export/``). Needs the ``export`` extra
(torch, diffusers, transformers, onnx, onnxruntime). Run ``composekit-export --help``.
"""

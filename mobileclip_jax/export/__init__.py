"""Mobile export: the two towers as ONNX or TFLite models, checked against JAX (optional extra).

  python launch/export.py --checkpoint=RUN_OR_MODEL --format=onnx|tflite --out=DIR \
      [--precision=fp32|fp16|int8] [--batch=1] [--image_size=...] [--context_length=...]

Modules: towers.py (inference form, fixed shapes, the tower functions), portable.py (platform
choices resolved for export), onnx_format.py / tflite_format.py (one format each: write, run),
bundle.py (the export directory and its JSON), coreml.py (Core ML from the PyTorch export),
app_zeroshot.py (zero-shot accuracy of an exported pair on the demo world).
"""
from mobileclip_jax.export.bundle import export_checkpoint
from mobileclip_jax.export.bundle import export_variables
from mobileclip_jax.export.bundle import FORMATS
from mobileclip_jax.export.towers import Shapes

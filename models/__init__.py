"""The model zoo: torch-built models (``models.zoo``), the onnx package's real architectures with
random weights (``models.light``, no torch), and a small trained digits CNN (``models.digits``).

This package imports nothing on its own, so ``models.light`` stays usable without torch.
"""

"""vanillakd: knowledge distillation for image classification on PyTorch + timm."""
__version__ = "0.1.0"

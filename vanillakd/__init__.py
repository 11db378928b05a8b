"""vanillakd: knowledge distillation for image classification on PyTorch + timm."""
import warnings

__version__ = "0.1.0"

# timm releases before 1.0.3x declare a torch.jit.interface at import, which recent torch deprecates with a
# FutureWarning on every start: nothing a user can act on, and it breaks our one-line error output
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)

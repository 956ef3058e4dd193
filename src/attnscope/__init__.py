"""attnscope: capture, explain, steer and evaluate attention in pretrained transformers."""
__version__ = "0.1.0"

from .capture.session import capture
from .capture.trace import Trace
from .core.tokens import TokenMap
from .models.images import load_image
from .models.zoo import ZOO, load, wrap

__all__ = ["capture", "Trace", "TokenMap", "load", "wrap", "load_image", "ZOO", "__version__"]

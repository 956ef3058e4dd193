"""attnscope: capture, explain, steer and evaluate attention in pretrained transformers."""
__version__ = "0.1.0"

from . import capture  # callable package: attnscope.capture(model, ...) opens a capture block
from .capture.trace import Trace
from .core.tokens import TokenMap
from .models.images import load_image
from .models.zoo import ZOO, load, wrap
from . import heads  # noqa: E402  (attnscope.heads.table)
from . import explain, steer  # noqa: E402  callable packages: attnscope.explain(...), attnscope.steer(...)
from .explain import Explanation  # noqa: E402
from . import check  # noqa: E402  callable package: attnscope.check(model) runs the verdict table
from . import flow  # noqa: E402  attnscope.flow.knockout_curve: information flow by attention knockout
from . import ground  # noqa: E402  callable package: attnscope.ground(model, image, question) -> Grounding

__all__ = ["capture", "Trace", "TokenMap", "load", "wrap", "load_image", "ZOO", "explain", "Explanation", "steer",
           "heads", "check", "flow", "ground", "__version__"]

"""pfclib: Partial FC — sampled, model-parallel margin-softmax heads for face recognition."""

__version__ = "0.1.0"

from pfclib import margins  # noqa: F401  (public re-export)
from pfclib.head import PartialFC  # noqa: F401  (public re-export)

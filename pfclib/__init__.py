"""pfclib: Partial FC — sampled, model-parallel margin-softmax heads for face recognition."""

__version__ = "0.1.0"

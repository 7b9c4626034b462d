"""The one training loop, shared by the dVAE, the prior and CLIP through a loss callback and hooks."""

from .loop import FitResult, fit, seed_everything
from .data import TensorBatches
from .stream import ParquetBatches, TokenParquet

__all__ = ["FitResult", "ParquetBatches", "TensorBatches", "TokenParquet", "fit", "seed_everything"]

"""prsl-kernels: fused kernels for the Partially Recentralization Softmax Loss."""

from .loss import PRSLLoss, RowStats, prsl_loss
from .spec import IGNORE_INDEX

__all__ = ["prsl_loss", "PRSLLoss", "RowStats", "IGNORE_INDEX"]
__version__ = "0.1.0"

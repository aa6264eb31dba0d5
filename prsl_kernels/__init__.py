"""prsl-kernels: fused kernels for the Partially Recentralization Softmax Loss."""

from .linear import LinearPRSLLoss, linear_prsl_loss
from .loss import PRSLLoss, RowStats, prsl_loss
from .spec import IGNORE_INDEX

__all__ = ["prsl_loss", "PRSLLoss", "linear_prsl_loss", "LinearPRSLLoss", "RowStats", "IGNORE_INDEX"]
__version__ = "0.1.0"

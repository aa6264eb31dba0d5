"""prsl-kernels: fused kernels for the Partially Recentralization Softmax Loss."""

from .linear import LinearPRSLLoss, linear_prsl_loss
from .loss import PRSLLoss, RowStats, prsl_loss
from .spec import IGNORE_INDEX
from .vocab_parallel import vocab_parallel_linear_prsl_loss, vocab_parallel_prsl_loss

__all__ = ["prsl_loss", "PRSLLoss", "linear_prsl_loss", "LinearPRSLLoss", "RowStats", "IGNORE_INDEX",
           "vocab_parallel_prsl_loss", "vocab_parallel_linear_prsl_loss"]
__version__ = "0.1.0"

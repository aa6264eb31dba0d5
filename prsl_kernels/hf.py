"""Hugging Face hooks, in one import: PRSL as a model ``loss_function``, a
``Trainer(compute_loss_func=...)``, or the one-call model patch :func:`apply_prsl`.

The token losses live in ``hf_losses.py`` and the model patch in ``hf_patch.py``; this
module only gathers their public names (it imports nothing that imports it back).

Example (any HF causal LM)::

    model.loss_function = prsl_loss_function(k=20, b=0.5)          # model(..., labels=...) -> PRSL
    trainer = Trainer(model, args, compute_loss_func=PRSLComputeLoss(k=20, b=0.5, shift=True), ...)
    loss_fn = apply_prsl(model, k=20, b=0.5)                       # fused: no logits in training

``apply_prsl`` guards against a forward that bypasses PRSL, which a bare
``model.loss_function = ...`` cannot.
"""

from .hf_losses import (CEComputeLoss, PRSLComputeLoss, PRSLLinearTokenLoss, PRSLTokenLoss, align_labels,
                        prsl_loss_function)
from .hf_patch import apply_prsl, apply_prsl_fused_linear, remove_prsl, remove_prsl_fused_linear

__all__ = ["align_labels", "PRSLTokenLoss", "PRSLLinearTokenLoss", "PRSLComputeLoss", "CEComputeLoss",
           "prsl_loss_function", "apply_prsl", "apply_prsl_fused_linear", "remove_prsl", "remove_prsl_fused_linear"]

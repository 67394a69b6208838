"""Using a submodule's weight without calling the submodule.

The embedding (``F.embedding_bag`` over ``word_embeddings.weight``) and the head (its own
fused cross entropy over ``output_layer.weight``) read those weights directly. Wrappers that
prepare parameters in a module's forward pre-hook would then never prepare them: megatron's
DDP with ``overlap_param_gather`` waits for a bucket's parameter all-gather, and dispatches
the next bucket's, in exactly such a hook. ``weight_of`` runs the module's forward pre-hooks
first, as a call of the module would.
"""
from __future__ import annotations

from torch import Tensor, nn


def weight_of(module: nn.Module) -> Tensor:
    """``module.weight`` after the module's forward pre-hooks (no-op when it has none)."""
    for hook in tuple(module._forward_pre_hooks.values()):
        hook(module, ())
    return module.weight

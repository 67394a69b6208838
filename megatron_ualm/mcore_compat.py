"""Every difference between the megatron-core releases we support, in one place.

Supported: megatron-core 0.16.1 up to the newest release (0.19.x); CI runs the whole suite
on both ends of that range (``scripts/test.sh`` and ``.ci/run``). Each difference is detected
by what the installed release offers (a method, a keyword), never by comparing version
strings, so a release in between takes whichever path its API has, and no path changes
behaviour: both branches of every function here compute the same thing.

The differences, oldest first:
* 0.18: ``TransformerLayer`` builds its MLP through ``MLP.as_mlp_submodule(..., pg_collection=,
  is_mtp_layer=)`` and passes those keywords to whatever the spec names; 0.16/0.17 build a
  ``ModuleSpec`` and give an MLP subclass no TP group (it falls back to the default one).
* 0.19: the optimizer's ``get_main_grads_for_grad_norm`` became ``get_grads_for_grad_norm``
  (with optional separate grad-norm groups, which UALM never registers); ``step`` resets
  ``grad_norms_by_group``; the unfused RoPE takes ``mla_rotary_interleaved=`` (handled in
  ``model/rope.py`` by passing every keyword through); a distributed checkpoint may have no
  ``common.pt`` (that state is inside the sharded files); ``import megatron.core`` needs
  ``triton``; an asynchronous ``dist_checkpointing.save`` uses NVRx's writer unless asked
  for megatron's own (``start_sharded_save``).
* Loading the distributed optimizer without apex/TE (0.16 at least; the work-arounds are
  no-ops where the bugs are absent): ``prepare_optimizer_for_loading`` and
  ``load_optimizer_state`` below.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, List

import torch


def megatron_core_version() -> str:
    """The installed megatron-core's version string (``"<unknown>"`` if it cannot be read)."""
    try:
        from megatron.core.package_info import __version__
    except Exception:  # pragma: no cover - megatron-core missing or broken
        return "<unknown>"
    return str(__version__)


def mlp_submodule(mlp_class: type, submodules: Any) -> Any:
    """What a ``TransformerLayerSubmodules.mlp`` should hold for ``mlp_class`` (a subclass of
    megatron's ``MLP``) so that it is built with the layer's own TP group on every release."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    if hasattr(mlp_class, "as_mlp_submodule"):  # >= 0.18: a builder called with pg_collection
        return functools.partial(mlp_class.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=mlp_class, submodules=submodules)


def grads_for_norm(optimizer_part: Any) -> List[Any]:
    """The gradients megatron counts in the global gradient norm of one optimizer part (not
    shared, not a tensor-parallel duplicate), under either release's method name."""
    if hasattr(optimizer_part, "get_grads_for_grad_norm"):  # >= 0.19
        return optimizer_part.get_grads_for_grad_norm()
    return optimizer_part.get_main_grads_for_grad_norm()


def has_separate_grad_norm_groups(optimizer_part: Any) -> bool:
    """True when some parameter belongs to a separately clipped grad-norm group (0.19+); such a
    model keeps megatron's own clipping. UALM registers none."""
    try:
        from megatron.core.optimizer.optimizer import _get_param_grad_norm_group, _is_separate_grad_norm_group
    except ImportError:  # <= 0.18: no such groups
        return False
    return any(_is_separate_grad_norm_group(_get_param_grad_norm_group(p))
               for p in optimizer_part.get_parameters())


def begin_optimizer_step(optimizer: Any) -> None:
    """What megatron's own ``step`` does before anything else (0.19: forget last step's
    per-group norms), for code that replaces ``step``."""
    for part in [optimizer, *getattr(optimizer, "chained_optimizers", [])]:
        if hasattr(part, "grad_norms_by_group"):
            part.grad_norms_by_group = {}


def start_sharded_save(sharded_state_dict: dict, directory: str, strategy: Any) -> Any:
    """``dist_checkpointing.save(..., async_sharded_save=True)``: writes the common state, plans
    the sharded files and returns megatron's ``AsyncRequest``, which writes them when executed
    (``execute_sync()``, or scheduled on an ``AsyncCallsQueue``). Same writer on every release:
    megatron's own (fork-based, in ``strategies/async_utils``); 0.19 would otherwise take
    NVRx's (``async_strategy="nvrx"``, from nvidia-resiliency-ext), so it is asked for "mcore",
    which is also what its synchronous save uses."""
    from megatron.core import dist_checkpointing
    kwargs = {}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:  # >= 0.19
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded_state_dict, directory, sharded_strategy=strategy,
                                   async_sharded_save=True, **kwargs)


# --- loading the distributed optimizer's state -------------------------------------------------
def inner_distributed_optimizers(optimizer) -> list:
    """The ``DistributedOptimizer`` parts of a (possibly chained) megatron optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in parts if isinstance(o, DistributedOptimizer)]


def prepare_optimizer_for_loading(optimizer) -> None:
    """Give a fresh distributed optimizer the state entries loading needs.

    megatron-core 0.16 quirk: without apex/TE, ``DistributedOptimizer.sharded_state_dict``
    reads the Adam ``step`` from the inner torch optimizer's state, which exists only after a
    first step. Megatron's own remedy (used for its FSDP format) is a zero-gradient dummy step;
    every value it creates is then overwritten by the loaded state.
    """
    for opt in inner_distributed_optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` with work-arounds for two megatron-core 0.16 bugs.

    Without apex/TE, ``DistributedOptimizer.load_state_dict`` first puts the Adam ``step`` into
    every inner state, then the fully-reshardable / model-space loaders copy the saved tensors
    over *every* key of that state, including ``step``, which they never provide -> KeyError.
    For the duration of the load each distributed optimizer gets (as an instance attribute, not
    a global patch) a setter that keeps the already-restored ``step``.
    """
    patched = []
    for opt in inner_distributed_optimizers(optimizer):
        original = opt._set_main_param_and_optimizer_states

        def keep_step(model_param, tensors, _opt=opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            current = _opt.optimizer.state.get(main_param, {})
            if "step" in current and "step" not in tensors:
                tensors = {**tensors, "step": current["step"]}
            _original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = keep_step
        patched.append(opt)
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method
    # Second 0.16 bug on the same path: one `step` tensor is shared by every parameter's
    # state, and torch Adam increments it in place once per parameter, so the bias correction
    # after resume would be wrong. Give each parameter its own copy.
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        for param_state in getattr(inner, "state", {}).values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()

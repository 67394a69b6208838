"""Training loop pieces: checkpoints (``checkpoint.py``) and preemption signals (``signals.py``).

Import the submodules directly (``from megatron_ualm.training.checkpoint import ...``) so
importing this package stays cheap.
"""

"""Ensemble defenses: regularizers on the members' input gradients (and/or outputs).

Each built-in module exposes a pure function ``regularizer(grads, **hyperparameters)`` (grads of
shape (k, B, *input_shape), returning a batch-averaged scalar) and a :class:`Defense` named
``DEFENSE`` that the ``ncen.defenses`` entry-point group registers.
"""

from ncen_cli.defenses.base import EPS, Defense, DefenseInputs, Hyperparameter, cosine, flat_norms

__all__ = ["EPS", "Defense", "DefenseInputs", "Hyperparameter", "cosine", "flat_norms"]

"""Ensemble defenses: regularizers on the members' input gradients (and/or outputs).

Each built-in regularizer module exposes one pure function ``terms(grads, **hyperparameters)``
(grads of shape (k, B, *input_shape); returns named, weighted, batch-averaged scalar terms) and a
:class:`Defense` named ``DEFENSE`` that the ``ncen.defenses`` entry-point group registers; the
hyperparameters' defaults live only in the Defense's :class:`Hyperparameter` table.
"""

from ncen_cli.defenses.base import EPS, Defense, DefenseInputs, Hyperparameter, flat_norms

__all__ = ["EPS", "Defense", "DefenseInputs", "Hyperparameter", "flat_norms"]

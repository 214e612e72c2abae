"""BIM's entry point (``ncen.attacks``: ``bim = "ncen_cli.attacks.bim:ATTACK"``). BIM is PGD's body
registered with other defaults (from x, 10 steps); both live in :mod:`ncen_cli.attacks.pgd`."""

from ncen_cli.attacks.pgd import BIM as ATTACK

__all__ = ["ATTACK"]

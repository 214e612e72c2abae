"""Entry-point registries for architectures, defenses, attacks and datasets.

Built-ins register through the same entry-point groups (in ncen's own ``pyproject.toml``) as
third-party plugins, so a separately installed package adds a defense by declaring, e.g.::

    [project.entry-points."ncen.defenses"]
    trs = "my_package.trs:DEFENSE"

Loading is lazy: listing names reads only package metadata; only the object asked for is imported.
A plugin that fails to import is reported (``ncen plugins``) and never fatal.
Set ``NCEN_PLUGINS`` to a comma-separated list of distribution names to restrict which third-party
distributions load (ncen's built-ins always load); set it to an empty string to load built-ins only.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ncen_cli.errors import UsageError

GROUPS: dict[str, str] = {
    "archs": "ncen.archs",
    "defenses": "ncen.defenses",
    "attacks": "ncen.attacks",
    "datasets": "ncen.datasets",
}
BUILTIN_DISTRIBUTION = "ncen"


@dataclass
class Registration:
    """One registered name in one group, and the outcome of loading it (if it was loaded)."""

    group: str
    name: str
    value: str
    distribution: str
    entry_point: EntryPoint | None = None
    loaded: Any = None
    error: str | None = None

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION


@dataclass
class Registry:
    """Lazy registry of one kind (``kind`` is a key of :data:`GROUPS`)."""

    kind: str
    _extra: dict[str, Registration] = field(default_factory=dict)

    def _allowed(self, distribution: str) -> bool:
        allowed = os.environ.get("NCEN_PLUGINS")
        if distribution == BUILTIN_DISTRIBUTION or allowed is None:
            return True
        return distribution in {d.strip() for d in allowed.split(",") if d.strip()}

    def registrations(self) -> dict[str, Registration]:
        """All names registered in this group (nothing imported yet), sorted by name."""
        found: dict[str, Registration] = {}
        for ep in entry_points(group=GROUPS[self.kind]):
            dist = ep.dist.name if ep.dist is not None else "?"
            if not self._allowed(dist):
                continue
            reg = Registration(GROUPS[self.kind], ep.name, ep.value, dist, ep)
            # a built-in name cannot be shadowed by a plugin
            if ep.name in found and found[ep.name].builtin:
                continue
            found[ep.name] = reg
        found.update(self._extra)
        return dict(sorted(found.items()))

    def names(self) -> list[str]:
        return list(self.registrations())

    def register(self, name: str, obj: Any, distribution: str = "<runtime>") -> None:
        """Register an object directly (tests, notebooks). Entry points are the normal route."""
        self._extra[name] = Registration(
            GROUPS[self.kind], name, repr(obj), distribution, loaded=obj
        )

    def unregister(self, name: str) -> None:
        self._extra.pop(name, None)

    def load_registration(self, reg: Registration) -> Registration:
        """Import one registration, recording the error instead of raising."""
        if reg.loaded is None and reg.error is None and reg.entry_point is not None:
            try:
                reg.loaded = reg.entry_point.load()
            except Exception as exc:  # a broken plugin must never be fatal
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                reg.error = last
        return reg

    def get(self, name: str) -> Any:
        """Load and return the object registered as ``name``; UsageError if unknown or broken."""
        regs = self.registrations()
        if name not in regs:
            known = ", ".join(regs) or "none"
            raise UsageError(f"unknown {self.kind[:-1]} '{name}'; known: {known}")
        reg = self.load_registration(regs[name])
        if reg.error is not None:
            raise UsageError(
                f"{self.kind[:-1]} '{name}' from '{reg.distribution}' failed to load: {reg.error}"
            )
        return reg.loaded


ARCHS = Registry("archs")
DEFENSES = Registry("defenses")
ATTACKS = Registry("attacks")
DATASETS = Registry("datasets")
REGISTRIES: dict[str, Registry] = {
    "archs": ARCHS,
    "defenses": DEFENSES,
    "attacks": ATTACKS,
    "datasets": DATASETS,
}


def all_registrations(load: bool = True) -> list[Registration]:
    """Every registration of every group, loaded (errors recorded) when ``load`` is true."""
    out: list[Registration] = []
    for registry in REGISTRIES.values():
        for reg in registry.registrations().values():
            out.append(registry.load_registration(reg) if load else reg)
    return out

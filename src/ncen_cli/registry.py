"""Entry-point registries for architectures, defenses, attacks and datasets.

Built-ins register through the same entry-point groups (in ncen's own ``pyproject.toml``) as
third-party plugins, so a separately installed package adds a defense by declaring, e.g.::

    [project.entry-points."ncen.defenses"]
    trs = "my_package.trs:DEFENSE"

Loading is lazy: listing names reads only package metadata; only the object asked for is imported.
Each group's entry points are scanned once and cached, with what was loaded (the cache is dropped
when a name is registered or unregistered, or when ``NCEN_PLUGINS`` or ``sys.path`` changes).
A plugin that fails to import (whatever it raises, SystemExit and KeyboardInterrupt included),
whose object is not of its group's type (:data:`CONTRACTS`), or whose object's ``name`` differs
from its entry-point name is reported (``ncen plugins``) and never fatal. Two registrations of
one name clash: a built-in always wins over a plugin (the plugin is listed as shadowed); two
plugins of one name are both listed, and using the name is an error that names both (pick one
with ``NCEN_PLUGINS``).
Set ``NCEN_PLUGINS`` to a comma-separated list of distribution names to restrict which third-party
distributions load (ncen's built-ins always load); set it to an empty string to load built-ins only.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ncen_cli.errors import UsageError
from ncen_cli.interrupts import noticing_sigint

API_VERSION = 3
"""The plugin API version: it covers the four contracts of :data:`CONTRACTS` (see
docs/plugins.md for what changed between versions). Re-exported by ``ncen_cli.defenses.base``."""

GROUPS: dict[str, str] = {
    "archs": "ncen.archs",
    "defenses": "ncen.defenses",
    "attacks": "ncen.attacks",
    "datasets": "ncen.datasets",
}
BUILTIN_DISTRIBUTION = "ncen"
# group -> "module:Class" every loaded object must be an instance of
CONTRACTS: dict[str, str] = {
    "archs": "ncen_cli.archs.base:Architecture",
    "defenses": "ncen_cli.defenses.base:Defense",
    "attacks": "ncen_cli.attacks.base:Attack",
    "datasets": "ncen_cli.data.base:DatasetSpec",
}
log = logging.getLogger("ncen.registry")


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
    clashes: list[str] = field(default_factory=list)  # "value (distribution)" of the same name
    shadowed: bool = False  # a built-in of the same name wins over this plugin

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION


@dataclass
class Registry:
    """Lazy registry of one kind (``kind`` is a key of :data:`GROUPS`)."""

    kind: str
    _extra: dict[str, Registration] = field(default_factory=dict)
    _scanned: tuple[tuple[Any, ...], list[Registration]] | None = field(default=None, repr=False)

    def _allowed(self, distribution: str) -> bool:
        allowed = os.environ.get("NCEN_PLUGINS")
        if distribution == BUILTIN_DISTRIBUTION or allowed is None:
            return True
        return distribution in {d.strip() for d in allowed.split(",") if d.strip()}

    def registrations(self) -> dict[str, Registration]:
        """All names registered in this group (nothing imported yet), sorted by name. A plugin
        shadowed by a built-in of the same name is left out (see :meth:`clashing`)."""
        found: dict[str, Registration] = {}
        for reg in self._all_entry_points():
            if reg.shadowed:
                continue
            found.setdefault(reg.name, reg)
        found.update(self._extra)
        return dict(sorted(found.items()))

    def _all_entry_points(self) -> list[Registration]:
        """Every allowed entry point of this group, with clashes of one name recorded; scanned
        once per ``NCEN_PLUGINS`` value and ``sys.path`` (the same Registration objects, so
        loads are kept)."""
        key = (os.environ.get("NCEN_PLUGINS"), tuple(sys.path))
        if self._scanned is None or self._scanned[0] != key:
            self._scanned = (key, self._scan())
        return self._scanned[1]

    def _scan(self) -> list[Registration]:
        regs: list[Registration] = []
        for ep in entry_points(group=GROUPS[self.kind]):
            dist = ep.dist.name if ep.dist is not None else "?"
            if self._allowed(dist):
                regs.append(Registration(GROUPS[self.kind], ep.name, ep.value, dist, ep))
        by_name: dict[str, list[Registration]] = {}
        for reg in regs:
            by_name.setdefault(reg.name, []).append(reg)
        for same in by_name.values():
            if len(same) < 2:
                continue
            has_builtin = any(r.builtin for r in same)
            for reg in same:
                reg.clashes = [f"{o.value} ({o.distribution})" for o in same if o is not reg]
                reg.shadowed = has_builtin and not reg.builtin
        # the built-in first, so that it is the one kept
        return sorted(regs, key=lambda r: (r.name, not r.builtin))

    def clashing(self) -> list[Registration]:
        """Every registration whose name another registration of this group also uses."""
        return [r for r in self._all_entry_points() if r.clashes]

    def names(self) -> list[str]:
        return list(self.registrations())

    def register(self, name: str, obj: Any, distribution: str = "<runtime>") -> None:
        """Register an object directly (notebooks; tests use :func:`registered`). Entry points
        are the normal route. UsageError if ``obj.name`` is not ``name``."""
        problem = _name_mismatch(name, obj)
        if problem is not None:
            raise UsageError(problem)
        self._extra[name] = Registration(
            GROUPS[self.kind], name, repr(obj), distribution, loaded=obj
        )
        self._scanned = None

    def unregister(self, name: str) -> None:
        self._extra.pop(name, None)
        self._scanned = None

    def load_registration(self, reg: Registration) -> Registration:
        """Import one registration and check it against the group's contract, recording the
        error instead of raising. A plugin's import may raise anything: SystemExit and
        KeyboardInterrupt are recorded as its failure too, unless a real SIGINT arrived."""
        if reg.loaded is None and reg.error is None and reg.entry_point is not None:
            with noticing_sigint() as sigint:
                try:
                    loaded = reg.entry_point.load()
                except BaseException as exc:  # noqa: BLE001 - a broken plugin must never be fatal
                    if sigint:  # the user's Ctrl-C during the import, not the plugin's doing
                        raise
                    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                    reg.error = last or type(exc).__name__
                    return reg
            contract = _contract(self.kind)
            if not isinstance(loaded, contract):
                reg.error = (
                    f"{reg.value} is a {type(loaded).__name__}, not a "
                    f"{contract.__name__} (the {GROUPS[self.kind]} contract)"
                )
            else:
                reg.error = _name_mismatch(reg.name, loaded, reg.value)
                reg.loaded = loaded if reg.error is None else None
        return reg

    def get(self, name: str) -> Any:
        """Load and return the object registered as ``name``; UsageError if unknown, broken or
        registered by two plugins."""
        regs = self.registrations()
        if name not in regs:
            known = ", ".join(regs) or "none"
            raise UsageError(f"unknown {self.kind[:-1]} '{name}'; known: {known}")
        reg = regs[name]
        if reg.clashes and not reg.builtin and name not in self._extra:
            raise UsageError(
                f"{self.kind[:-1]} '{name}' is registered by {reg.value} ({reg.distribution}) and "
                f"by {', '.join(reg.clashes)}; keep one with NCEN_PLUGINS=<distribution>"
            )
        if reg.clashes and reg.builtin:
            log.warning(
                "%s '%s': the built-in is used; also registered by %s",
                self.kind[:-1],
                name,
                ", ".join(reg.clashes),
            )
        reg = self.load_registration(reg)
        if reg.error is not None:
            raise UsageError(
                f"{self.kind[:-1]} '{name}' from '{reg.distribution}' failed to load: {reg.error}"
            )
        return reg.loaded


def _name_mismatch(name: str, obj: Any, where: str = "") -> str | None:
    """A one-line problem when ``obj.name`` is not the name it is registered under, else None."""
    own = getattr(obj, "name", name)
    if own == name:
        return None
    return (
        f"{where or repr(obj)[:60]} is named '{own}' but registered as '{name}'; the "
        "entry-point name and the object's name must agree"
    )


def _contract(kind: str) -> type:
    module, _, cls = CONTRACTS[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


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
    """Every registration of every group, loaded (errors recorded) when ``load`` is true; a plugin
    that a built-in of the same name shadows is included (``shadowed``, never loaded)."""
    out: list[Registration] = []
    for registry in REGISTRIES.values():
        regs = list(registry.registrations().values())
        kept = {(r.name, r.value, r.distribution) for r in regs}
        regs += [r for r in registry.clashing() if (r.name, r.value, r.distribution) not in kept]
        for reg in sorted(regs, key=lambda r: (r.name, not r.builtin)):
            out.append(registry.load_registration(reg) if load and not reg.shadowed else reg)
    return out


@contextmanager
def registered(kind: str, obj: Any, name: str | None = None) -> Iterator[Any]:
    """Register ``obj`` in group ``kind`` (a key of :data:`REGISTRIES`) as ``name`` (default
    ``obj.name``) for the duration of the block, then restore what was registered under that
    name before (tests, notebooks)::

        with registered("attacks", my_attack):
            evaluate(ensemble, x, y, [AttackRun(my_attack.name, settings)])
    """
    registry = REGISTRIES[kind]
    name = name if name is not None else obj.name
    previous = registry._extra.get(name)
    registry.register(name, obj)
    try:
        yield obj
    finally:
        registry.unregister(name)
        if previous is not None:
            registry._extra[name] = previous

"""ncen-extra: ensemble defenses (TRS, ADP, DVERGE) and an ensemble attack (mc-pgd) for ncen.

Registered through ncen's entry-point groups (see this package's ``pyproject.toml``); ncen never
imports this package directly. Written against ncen plugin API version 3 (mc-pgd implements only
its single run on ncen's attack runner; DVERGE crafts its members' training inputs, which version 1
could not express): importing it under another version raises, which ``ncen plugins`` then reports
as a failed plugin.
"""

from __future__ import annotations

from ncen_cli.registry import API_VERSION

__version__ = "0.3.0"
PLUGIN_API_VERSION = 3

if API_VERSION != PLUGIN_API_VERSION:
    raise ImportError(
        f"ncen-extra {__version__} targets ncen plugin API {PLUGIN_API_VERSION}, but the installed "
        f"ncen provides API {API_VERSION}; upgrade ncen-extra"
    )

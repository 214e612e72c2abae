"""Member architectures. Each entry point in ``ncen.archs`` is an :class:`Architecture`."""

from ncen_cli.archs.base import ACTIVATIONS, Architecture, build_member

__all__ = ["ACTIVATIONS", "Architecture", "build_member"]

"""ncen: train and honestly evaluate Negative Correlation Ensembles (NCEn).

The command-line tool ``ncen`` is a thin layer over this Python API::

    from ncen_cli import load_ensemble
    ensemble = load_ensemble("run.safetensors", device="cpu")   # eval mode
    logits = ensemble(images)                                   # (B, num_classes)
"""

__all__ = ["Ensemble", "NcenError", "UsageError", "load_ensemble", "save_ensemble", "__version__"]
_LAZY = {
    "load_ensemble": "ncen_cli.checkpoint",
    "save_ensemble": "ncen_cli.checkpoint",
    "Ensemble": "ncen_cli.ensemble",
    "NcenError": "ncen_cli.errors",
    "UsageError": "ncen_cli.errors",
}


def __getattr__(name: str):
    """Import torch-backed names on first use: ``import ncen_cli`` (and ``ncen --help``) stays
    fast and a Ctrl-C while the command line starts is handled by :mod:`ncen_cli.launcher`."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ncen")
        except PackageNotFoundError:  # running from a source tree without installation
            return "0.0.0+unknown"
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ncen_cli' has no attribute {name!r}")

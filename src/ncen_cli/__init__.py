"""ncen: train and honestly evaluate Negative Correlation Ensembles (NCEn).

The command-line tool ``ncen`` is a thin layer over this Python API::

    from ncen_cli import load_ensemble
    ensemble = load_ensemble("run.safetensors", device="cpu")   # eval mode
    logits = ensemble(images)                                   # (B, num_classes)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ncen")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from ncen_cli.checkpoint import load_ensemble, save_ensemble  # noqa: E402
from ncen_cli.ensemble import Ensemble  # noqa: E402
from ncen_cli.errors import NcenError, UsageError  # noqa: E402

__all__ = ["Ensemble", "NcenError", "UsageError", "load_ensemble", "save_ensemble", "__version__"]

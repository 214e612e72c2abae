"""``ncen plugins`` and ``ncen env``: what is registered and where things live."""

from __future__ import annotations

import os
import platform
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ncen_cli import paths
from ncen_cli.cli.common import command, out_console, print_json
from ncen_cli.registry import all_registrations


def _summary(obj: object) -> str:
    return str(getattr(obj, "summary", "") or "")


def _hyperparameters(obj: object) -> dict[str, dict] | None:
    """A defense's hyperparameters: name -> default, per-dataset defaults, help (else None)."""
    found = getattr(obj, "hyperparameters", None)
    if found is None:
        return None
    return {
        name: {"default": hp.default, "per_dataset": dict(hp.per_dataset), "help": hp.help}
        for name, hp in found.items()
    }


def _hyperparameter_line(hyper: dict[str, dict] | None) -> str:
    """``eps=0.1 (cifar10: 0.0314), steps=10`` for the table."""
    parts = []
    for name, hp in (hyper or {}).items():
        extra = ", ".join(
            f"{d}: {v:.3g}" for d, v in hp["per_dataset"].items() if v != hp["default"]
        )
        parts.append(f"{name}={hp['default']:g}" + (f" ({extra})" if extra else ""))
    return "\n[dim]" + ", ".join(parts) + "[/]" if parts else ""


@command("plugins")
def plugins_command(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered architectures, defenses, attacks and datasets, and whether each loaded."""
    rows: list[dict[str, Any]] = []
    for reg in all_registrations(load=True):
        rows.append(
            {
                "group": reg.group,
                "name": reg.name,
                "distribution": reg.distribution,
                "builtin": reg.builtin,
                "entry_point": reg.value,
                "loaded": reg.error is None and not reg.shadowed,
                "error": reg.error,
                "shadowed": reg.shadowed,
                "clashes": reg.clashes,
                "summary": _summary(reg.loaded),
                "hyperparameters": _hyperparameters(reg.loaded),
            }
        )
    if json_output:
        print_json({"plugins": rows})
        return
    table = Table(title="ncen registrations")
    for col in ("group", "name", "from", "status", "summary"):
        table.add_column(col)
    for row in rows:
        error = escape(str(row["error"]))
        status = "[green]loaded[/]" if row["loaded"] else f"[red]failed: {error}[/]"
        if row["shadowed"]:
            status = "[yellow]shadowed by the built-in[/]"
        elif row["clashes"]:
            status += f" [yellow](name clash: also {', '.join(row['clashes'])})[/]"
        summary = row["summary"] + _hyperparameter_line(row["hyperparameters"])
        table.add_row(row["group"], row["name"], row["distribution"], status, summary)
    out_console().print(table)


@command("env")
def env_command(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Versions, devices, resolved data/run folders and plugins."""
    import torch

    from ncen_cli import __version__
    from ncen_cli.device import available_devices

    info = {
        "ncen": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        **{name: package_version(name) for name in VERSIONED},
        "cuda_available": torch.cuda.is_available(),
        "devices": available_devices(),
        "data_dir": os.environ.get("NCEN_DATA_DIR"),
        "cache_dir": str(paths.cache_dir()),
        "runs_dir": str(paths.runs_dir()),
        "plugins": sorted({f"{r.distribution}" for r in all_registrations(load=False)}),
    }
    if json_output:
        print_json(info)
        return
    table = Table(title="ncen environment", show_header=False)
    for key, value in info.items():
        if key == "devices":
            value = "\n".join(device_line(d) for d in value)
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "none"
        elif value is None:
            value = "not set" if key == "data_dir" else "not installed"
        table.add_row(key, escape(str(value)))
    out_console().print(table)


# distributions whose versions `ncen env` reports (besides python and torch)
VERSIONED = ("torchvision", "typer", "rich", "safetensors", "torchattacks", "numpy", "matplotlib")


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def device_line(device: dict[str, object]) -> str:
    """``cpu: 2 threads, native bf16`` / ``cuda:0: NVIDIA H100, 79.1 GiB``."""
    details = []
    for key, value in device.items():
        if key == "device":
            continue
        if key == "threads":
            details.append(f"{value} threads")
        elif key == "native_bf16":
            details.append("native bf16" if value else "no native bf16")
        elif key == "memory_gib" and isinstance(value, float):
            details.append(f"{value:.1f} GiB")
        else:
            details.append(str(value))
    return f"{device['device']}: {', '.join(details)}" if details else str(device["device"])

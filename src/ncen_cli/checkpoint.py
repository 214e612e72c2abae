"""Ensemble checkpoints: one ``.safetensors`` file, never pickle.

Tensors are named ``members.<i>.<parameter or buffer>``. The string metadata holds
one key, ``ncen = <JSON>``, with at least ``format = "ncen-ensemble"``, ``schema_version``,
``members``
(architecture names), ``activation``, ``combine``, ``dataset``, ``family``, ``input_shape``,
``num_classes``, ``defense``, ``hyperparameters``, ``config`` (the full training config),
``epochs_done``, ``metrics``, ``ncen_version``, ``torch_version``. See docs/checkpoint-format.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ncen_cli.atomic import atomic_write
from ncen_cli.ensemble import Ensemble, build_ensemble
from ncen_cli.errors import CheckpointError, UsageError

FORMAT = "ncen-ensemble"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "members", "input_shape", "num_classes")


def ensemble_tensors(ensemble: Ensemble) -> dict[str, torch.Tensor]:
    """Every member parameter and buffer, contiguous on the CPU, keyed ``members.<i>.<name>``."""
    return {
        f"members.{name}": tensor.detach().to("cpu").contiguous()
        for name, tensor in ensemble.members.state_dict(prefix="").items()
    }


def save_ensemble(
    ensemble: Ensemble, path: str | Path, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``ensemble`` atomically to ``path`` (.safetensors). ``metadata`` is merged over
    ``ensemble.metadata``; ``schema_version`` and versions are filled in."""
    from ncen_cli import __version__

    meta = {**ensemble.metadata, **(metadata or {})}
    meta.setdefault("members", [type(m).__name__ for m in ensemble.members])
    meta.update(
        schema_version=SCHEMA_VERSION,
        combine=ensemble.combine,
        ncen_version=__version__,
        torch_version=torch.__version__,
    )
    tensors = ensemble_tensors(ensemble)
    meta["format"] = FORMAT
    # one metadata key: safetensors does not keep the order of several, and checkpoints of
    # identical runs must be bit-identical
    header = {"ncen": json.dumps(meta, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ncen metadata, validated (no tensors read). Raises CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a folder; give the .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    not_ours = CheckpointError(f"{path} is a safetensors file but not an ncen ensemble checkpoint")
    if "ncen" not in header:
        raise not_ours
    try:
        meta = json.loads(header["ncen"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its ncen metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise not_ours
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    if int(meta["schema_version"]) > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer ncen (schema {meta['schema_version']}, this ncen reads "
            f"<= {SCHEMA_VERSION}); upgrade ncen"
        )
    return meta


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Load an ensemble checkpoint, validated against its metadata, in eval mode on ``device``.

    The returned :class:`Ensemble` has ``.members`` (an nn.ModuleList) and ``.metadata``.
    Raises UsageError (missing path) or CheckpointError (corrupt, truncated, newer schema,
    member/shape mismatch). Nothing is unpickled.
    """
    path = Path(path)
    meta = read_metadata(path)
    try:
        ensemble = build_ensemble(
            list(meta["members"]),
            tuple(meta["input_shape"]),
            int(meta["num_classes"]),
            activation=meta.get("activation", "relu"),
            combine=meta.get("combine", "mean-logits"),
        )
    except UsageError as exc:
        raise CheckpointError(f"{path}: cannot rebuild its members: {exc}") from None
    expected = ensemble.members.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            names = {k.removeprefix("members.") for k in f.keys()}
            missing = sorted(set(expected) - names)
            extra = sorted(names - set(expected))
            if missing or extra:
                raise CheckpointError(
                    f"{path}: tensors do not match its members {meta['members']} "
                    f"(missing {missing[:3]}, unexpected {extra[:3]})"
                )
            state = {}
            for name, ref in expected.items():
                tensor = f.get_tensor(f"members.{name}")
                if tensor.shape != ref.shape:
                    raise CheckpointError(
                        f"{path}: tensor members.{name} has shape {tuple(tensor.shape)}, "
                        f"its metadata implies {tuple(ref.shape)}"
                    )
                state[name] = tensor
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    ensemble.members.load_state_dict(state)
    ensemble.metadata = meta
    return ensemble.to(device).eval()

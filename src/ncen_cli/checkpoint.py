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
import math
import os
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ncen_cli.atomic import atomic_write
from ncen_cli.ensemble import MAX_MEMBERS, Ensemble, build_ensemble
from ncen_cli.errors import CheckpointError, UsageError

FORMAT = "ncen-ensemble"
SCHEMA_VERSION = 1
REQUIRED_KEYS = ("schema_version", "members", "input_shape", "num_classes")
MAX_CLASSES = 100_000  # a 10^12 here would ask for a 256 TB output layer
MAX_IMAGE_SIDE = 4096
MAX_JSON_DEPTH = 32


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


def require_regular_file(path: Path, what: str = "checkpoint") -> None:
    """UsageError unless ``path`` is an existing regular file (a FIFO would block a read forever,
    a device would never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{what} {path} is a folder; give the .safetensors file")
    if not stat.S_ISREG(mode):
        raise UsageError(f"{what} {path} is not a regular file (a pipe, socket or device)")


def parse_json(text: str, source: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that turns bad JSON and nesting deeper than ``max_depth`` into one
    CheckpointError naming ``source``."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise CheckpointError(f"{source} is not valid JSON (or nested too deeply)") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise CheckpointError(f"{source} is nested deeper than {max_depth} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _str_list(value: Any, low: int, high: int) -> bool:
    return (
        isinstance(value, list)
        and low <= len(value) <= high
        and all(isinstance(v, str) and 0 < len(v) <= 200 for v in value)
    )


# key -> (required, test, what it must be)
METADATA_SCHEMA: dict[str, tuple[bool, Any, str]] = {
    "schema_version": (True, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "members": (
        True,
        lambda v: _str_list(v, 2, MAX_MEMBERS),
        f"a list of 2 to {MAX_MEMBERS} architecture names",
    ),
    "input_shape": (
        True,
        lambda v: (
            isinstance(v, list)
            and len(v) == 3
            and all(_is_int(d) for d in v)
            and 1 <= v[0] <= 16
            and all(1 <= d <= MAX_IMAGE_SIDE for d in v[1:])
        ),
        f"[C, H, W] with 1 <= C <= 16 and sides <= {MAX_IMAGE_SIDE}",
    ),
    "num_classes": (
        True,
        lambda v: _is_int(v) and 2 <= v <= MAX_CLASSES,
        f"an integer in [2, {MAX_CLASSES}]",
    ),
    "activation": (False, lambda v: isinstance(v, str), "a name"),
    "combine": (False, lambda v: isinstance(v, str), "a name"),
    "dataset": (False, lambda v: isinstance(v, str), "a name"),
    "family": (False, lambda v: isinstance(v, str), "a name"),
    "defense": (False, lambda v: isinstance(v, str), "a name"),
    "classes": (False, lambda v: _str_list(v, 2, MAX_CLASSES), "a list of class names"),
    "hyperparameters": (
        False,
        lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
        "names -> finite numbers",
    ),
    "config": (False, lambda v: isinstance(v, dict), "an object"),
    "metrics": (False, lambda v: isinstance(v, dict), "an object"),
    "history": (False, lambda v: isinstance(v, list), "a list"),
    "epochs_done": (False, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "epochs_planned": (False, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "complete": (False, lambda v: isinstance(v, bool), "true or false"),
    "world_size": (False, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


def validate_metadata(meta: Any, source: str | Path) -> dict[str, Any]:
    """Check a checkpoint's ncen metadata against :data:`METADATA_SCHEMA` (types, ranges, caps);
    returns it. Raises CheckpointError naming the first bad key."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{source} is a safetensors file but not an ncen ensemble checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{source}: metadata lacks {', '.join(missing)}")
    version = meta["schema_version"]
    if _is_int(version) and version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{source} was written by a newer ncen (schema {version}, this ncen reads "
            f"<= {SCHEMA_VERSION}); upgrade ncen"
        )
    for key, (_required, test, wanted) in METADATA_SCHEMA.items():
        if key in meta and not test(meta[key]):
            raise CheckpointError(
                f"{source}: metadata '{key}' must be {wanted}, got {_short(meta[key])}"
            )
    if "classes" in meta and len(meta["classes"]) != meta["num_classes"]:
        raise CheckpointError(
            f"{source}: metadata has {len(meta['classes'])} class names for "
            f"num_classes {meta['num_classes']}"
        )
    return meta


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's ncen metadata, validated (no tensors read). Raises CheckpointError."""
    path = Path(path)
    require_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if "ncen" not in header:
        raise CheckpointError(f"{path} is a safetensors file but not an ncen ensemble checkpoint")
    return validate_metadata(parse_json(header["ncen"], f"{path}: its ncen metadata"), path)


def check_tensor_names(path: Path, names: set[str], k: int) -> None:
    """Before any member is built: every tensor is ``members.<i>.<name>`` with ``i < k``, and every
    member has tensors. Raises CheckpointError."""
    seen: set[int] = set()
    for name in names:
        index, _, rest = name.removeprefix("members.").partition(".")
        if not name.startswith("members.") or not index.isdigit() or not rest or int(index) >= k:
            raise CheckpointError(f"{path}: unexpected tensor {name[:60]!r} for {k} members")
        seen.add(int(index))
    if len(seen) != k:
        raise CheckpointError(f"{path}: members {sorted(set(range(k)) - seen)[:3]} have no tensors")


def load_ensemble(path: str | Path, device: str | torch.device = "cpu") -> Ensemble:
    """Load an ensemble checkpoint, validated against its metadata, in eval mode on ``device``.

    The returned :class:`Ensemble` has ``.members`` (an nn.ModuleList) and ``.metadata``.
    Raises UsageError (missing path, not a regular file) or CheckpointError (corrupt, truncated,
    newer schema, metadata of the wrong type or out of range, tensors whose names, shapes or dtypes
    do not match the members, non-finite weights). Nothing is unpickled.
    """
    path = Path(path)
    meta = read_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            check_tensor_names(path, set(f.keys()), len(meta["members"]))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    try:
        ensemble = build_ensemble(
            list(meta["members"]),
            tuple(meta["input_shape"]),
            int(meta["num_classes"]),
            activation=meta.get("activation", "relu"),
            combine=meta.get("combine", "mean-logits"),
        )
    except (UsageError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild its members: {exc}") from None
    state = _read_tensors(path, meta, ensemble.members.state_dict())
    ensemble.members.load_state_dict(state)
    bad = first_non_finite(ensemble)
    if bad is not None:
        raise CheckpointError(f"{path}: tensor members.{bad} holds NaN or infinite values")
    ensemble.metadata = meta
    return ensemble.to(device).eval()


def _read_tensors(
    path: Path, meta: dict[str, Any], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The member tensors of ``path``, checked against ``expected`` (names, shapes, dtypes)."""
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
                if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
                    raise CheckpointError(
                        f"{path}: tensor members.{name} is {tensor.dtype} {tuple(tensor.shape)}, "
                        f"its metadata implies {ref.dtype} {tuple(ref.shape)}"
                    )
                state[name] = tensor
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    return state


def first_non_finite(module: torch.nn.Module) -> str | None:
    """Name of the first parameter or buffer (BatchNorm statistics) of ``module`` holding a NaN
    or an infinity, or None when all are finite. One device synchronisation when all are."""
    named = [*module.named_parameters(), *module.named_buffers()]
    tensors = [(n, t) for n, t in named if t.is_floating_point()]
    if not tensors:
        return None
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(flags.all()):
        return None
    return next(name for (name, _), ok in zip(tensors, flags.tolist(), strict=True) if not ok)

"""The device manager: one place that picks the device, precision, threads and seeds.

Nothing else in ncen calls ``.cuda()``; modules and tensors are moved with ``runtime.device``.
Under ``torchrun`` (``LOCAL_RANK`` set) ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ncen_cli.errors import UsageError

PRECISIONS = ("fp32", "tf32", "bf16")


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a torch.device, checking it exists."""
    spec = (spec or "auto").strip().lower()
    local_rank = os.environ.get("LOCAL_RANK")
    if spec == "auto":
        if torch.cuda.is_available():
            spec = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("--device mps: no Apple GPU is available here; use --device cpu")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec}: CUDA is not available here; use --device cpu or auto"
            )
        if spec == "cuda":
            index = int(local_rank) if local_rank is not None else torch.cuda.current_device()
        else:
            try:
                index = int(spec.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--device {spec}: write cuda:N with N a GPU index") from None
        if not 0 <= index < torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: no such GPU (this machine has {torch.cuda.device_count()})"
            )
        return torch.device("cuda", index)
    raise UsageError(f"unknown --device '{spec}'; use auto, cpu, cuda, cuda:N or mps")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 convolutions natively (oneDNN with AVX512-BF16 or AMX);
    without it, CPU autocast to bf16 is emulated and slower than float32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:  # pragma: no cover - builds without oneDNN
        return False


MAX_SEED = 2**32 - 1  # numpy's limit; per-epoch generators derive larger seeds from it


def check_seed(seed: int, option: str = "--seed") -> None:
    """UsageError unless ``seed`` is an integer in ``[0, MAX_SEED]``."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{option} must be in [0, {MAX_SEED}], got {seed}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if installed) and torch (all devices). UsageError for a seed outside
    ``[0, MAX_SEED]``."""
    check_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    torch.manual_seed(seed)


@dataclass
class Runtime:
    """Where and how tensors are computed.

    Attributes:
        device: the torch device.
        precision: ``fp32`` (default), ``tf32`` (TF32 matmuls/convs on CUDA) or ``bf16`` (autocast
            for the training step's forward passes, on CUDA or on a CPU with native bfloat16
            (AVX512-BF16 / AMX); CE, input gradients, the regularizer, parameters and evaluation
            stay in float32).
        threads: CPU threads torch may use (None: torch's default).
        deterministic: ask torch for deterministic algorithms (slower on CUDA).
        seed: the run's seed.
    """

    device: torch.device
    precision: str = "fp32"
    threads: int | None = None
    deterministic: bool = False
    seed: int = 0

    @classmethod
    def create(
        cls,
        device: str = "auto",
        precision: str = "fp32",
        threads: int | None = None,
        deterministic: bool = False,
        seed: int = 0,
    ) -> Runtime:
        """Resolve the device and check the settings; nothing is applied until
        :meth:`applied`."""
        if precision not in PRECISIONS:
            raise UsageError(f"unknown --precision '{precision}'; choose {', '.join(PRECISIONS)}")
        if threads is not None and threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        runtime = cls(resolve_device(device), precision, threads, deterministic, seed)
        if precision == "bf16" and runtime.device.type == "cpu" and not cpu_has_native_bf16():
            raise UsageError(
                "--precision bf16 on the CPU needs native bfloat16 (AVX512-BF16 or AMX), which "
                "this CPU lacks (bf16 would be slower than fp32 here); use --precision fp32"
            )
        return runtime

    @contextmanager
    def applied(self) -> Iterator[Runtime]:
        """Within this block torch computes as the runtime says: its CPU threads, TF32 and cuDNN
        autotuning on CUDA, deterministic algorithms; python, numpy and torch are seeded with
        ``seed`` on entry. On exit torch's previous settings are restored (the random number
        generators are not: seeding them is the point)."""
        saved = _torch_settings()
        try:
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            if self.device.type == "cuda":
                allow_tf32 = self.precision in ("tf32", "bf16")
                torch.backends.cuda.matmul.allow_tf32 = allow_tf32
                torch.backends.cudnn.allow_tf32 = allow_tf32
                torch.backends.cudnn.benchmark = not self.deterministic
            if self.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True, warn_only=True)
            seed_everything(self.seed)
            yield self
        finally:
            _restore_torch_settings(saved)

    def autocast(self) -> AbstractContextManager:
        """Autocast context for the training step (bf16 on CUDA and CPU; otherwise a no-op)."""
        if self.precision == "bf16" and self.device.type in ("cuda", "cpu"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def describe(self) -> dict[str, object]:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "threads": torch.get_num_threads(),
            "deterministic": self.deterministic,
            "seed": self.seed,
        }


def _torch_settings() -> dict[str, int | bool]:
    """The process-wide torch settings :meth:`Runtime.applied` may change."""
    return {
        "threads": torch.get_num_threads(),
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    }


def _restore_torch_settings(saved: dict[str, int | bool]) -> None:
    if torch.get_num_threads() != saved["threads"]:
        torch.set_num_threads(int(saved["threads"]))
    torch.backends.cuda.matmul.allow_tf32 = bool(saved["matmul_tf32"])
    torch.backends.cudnn.allow_tf32 = bool(saved["cudnn_tf32"])
    torch.backends.cudnn.benchmark = bool(saved["cudnn_benchmark"])
    torch.use_deterministic_algorithms(
        bool(saved["deterministic"]), warn_only=bool(saved["deterministic_warn_only"])
    )


def available_devices() -> list[dict[str, object]]:
    """Devices torch can see, for ``ncen env``."""
    devices: list[dict[str, object]] = [
        {"device": "cpu", "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16()}
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "device": f"cuda:{i}",
                    "name": props.name,
                    "memory_gib": props.total_memory / 2**30,
                }
            )
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append({"device": "mps"})
    return devices

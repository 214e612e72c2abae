"""The option vocabulary shared by every ``ncen`` command (docs/usage.md, "Option vocabulary").

One concept, one spelling: the declarations below are used by every command that takes the
option, so the name, the list semantics and the help agree. Spellings of earlier releases are
rewritten to the current ones before Click parses the command line (:func:`rewrite_deprecated`),
with a one-line warning; they are accepted for one release. No torch import here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec, TypedDict, TypeVar, get_type_hints

import typer

P = ParamSpec("P")
R = TypeVar("R")

# command -> {old spelling: current spelling}; kept for one release (0.2), then removed
DEPRECATED_SPELLINGS: dict[str, dict[str, str]] = {
    "attack": {"--limit": "--test-limit"},
    "transfer": {"--attack": "--attacks", "--limit": "--test-limit", "--png": "--figure"},
    "inspect": {"--limit": "--test-limit"},
    "sweep": {"--eval-limit": "--attack-limit", "--png": "--figure"},
}


def deprecation_warning(old: str, new: str, command: str) -> str:
    return (
        f"warning: ncen {command} {old} is deprecated and will be removed in the next "
        f"release; use {new}"
    )


def rewrite_deprecated(command: str, args: list[str]) -> list[str]:
    """``args`` with the deprecated option spellings of ``command`` replaced by the current ones
    (``--old`` and ``--old=value``; nothing after ``--``); one warning line per spelling used."""
    spellings = DEPRECATED_SPELLINGS.get(command, {})
    out: list[str] = []
    warned: set[str] = set()
    for i, arg in enumerate(args):
        if arg == "--":
            out.extend(args[i:])
            break
        name, sep, value = arg.partition("=")
        if name in spellings:
            if name not in warned:
                sys.stderr.write(deprecation_warning(name, spellings[name], command) + "\n")
                warned.add(name)
            arg = spellings[name] + sep + value
        out.append(arg)
    return out


# The checkpoint that attack, transfer, inspect and config read
Checkpoint = Annotated[
    Path, typer.Argument(metavar="CHECKPOINT", help="An ensemble checkpoint (.safetensors).")
]

# Data: what every command that reads images takes
Dataset = Annotated[
    str, typer.Option(help="fashionmnist, cifar10, digits, npz, synthetic, or a plugin's.")
]
CheckpointDataset = Annotated[
    str | None,
    typer.Option("--dataset", help="Default: the dataset recorded in the checkpoint."),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        envvar="NCEN_DATA_DIR", help="Read the dataset from this folder (never downloads into it)."
    ),
]
CheckpointDataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="NCEN_DATA_DIR",
        help="Read the dataset from this folder (default: the one recorded in the checkpoint).",
    ),
]
Download = Annotated[bool, typer.Option(help="Download a missing dataset into the cache.")]
TestLimit = Annotated[
    int | None, typer.Option("--test-limit", help="Seeded subset of N test images.")
]

# Training (train, and sweep, which trains one ensemble per grid cell)
Members = Annotated[
    str,
    typer.Option(help="resnet20,resnet26,resnet32 (comma list), 3xresnet20 or ensemble1..4[-kK]."),
]
NcenForm = Annotated[str, typer.Option(help="paper (eqs. 9-10) or official (authors' code).")]
Param = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="Any defense hyperparameter as NAME=VALUE (repeatable)."),
]
Activation = Annotated[str, typer.Option(help="relu or leakyrelu (0.1, as the authors' code).")]
Combine = Annotated[str, typer.Option(help="mean-prob (the paper's) or mean-logits.")]
Epochs = Annotated[int | None, typer.Option(help="Default: 40 FashionMNIST-like, 60 CIFAR-10.")]
Augment = Annotated[bool, typer.Option(help="Random crop (+ flip for CIFAR-10).")]
Noise = Annotated[bool, typer.Option(help="Train on D + D_noise (paper).")]
NoiseEps = Annotated[
    float | None, typer.Option(help="D_noise epsilon (sigma = eps/2); default 0.3 / 0.09.")
]
TrainLimit = Annotated[int | None, typer.Option(help="Seeded subset of N training images.")]
Precision = Annotated[
    str,
    typer.Option(help="fp32, tf32 (CUDA) or bf16 (CUDA, or a CPU with native bf16: `ncen env`)."),
]
MemberThreads = Annotated[
    int | None,
    typer.Option(help="Concurrent members on CPU threads (default: k if multi-core, 1 on CUDA)."),
]
Deterministic = Annotated[bool, typer.Option(help="Deterministic algorithms.")]
DoubleBackprop = Annotated[
    str,
    typer.Option(help="exact (double backprop) or jvp (forward mode); finite-diff: deprecated."),
]
FdScale = Annotated[float, typer.Option(help="Deprecated and ignored (finite-diff is retired).")]

# The defaults of ncen_cli.train_step (test_startup holds them equal; importing it loads torch)
DEFAULT_DOUBLE_BACKPROP = "exact"
DEFAULT_FD_SCALE = 3e-2

# Where and how torch computes
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Threads = Annotated[int | None, typer.Option(help="CPU threads for torch.")]

# Attacks (attack, transfer, sweep): comma lists everywhere
Attacks = Annotated[
    str | None,
    typer.Option(
        "--attacks",
        help="Comma list: fgsm, mifgsm, pgd, bim, apgd-ce, apgd-dlr, square (or plugins).",
    ),
]
Eps = Annotated[
    str | None, typer.Option("--eps", help="Comma list of L-inf radii in (0, 1], e.g. 0.05,0.3.")
]
Steps = Annotated[
    int | None, typer.Option(help="Iterations (Square: queries; default: the attack's).")
]
StepSize = Annotated[
    float | None, typer.Option(help="Step size, alpha (default: the attack's for --eps).")
]
Restarts = Annotated[
    int | None,
    typer.Option(help="Random restarts, counted worst-case per example (strong protocol: 2)."),
]
AttackOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--attack-option",
        "-o",
        metavar="NAME=VALUE",
        help="An attack's own option (repeatable), e.g. "
        "-o p_init=0.5 (square), -o select=margin (mc-pgd), -o early_stop=false.",
    ),
]

# Outputs and reporting
ResultsFile = Annotated[
    Path | None,
    typer.Option("--out", help="Also write the results to FILE (.json; attack: or .csv)."),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
Json = Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")]
Figure = Annotated[
    Path | None,
    typer.Option(
        "--figure",
        help="Also save a figure; the suffix picks the format (.png, .pdf, "
        ".svg; needs matplotlib).",
    ),
]
Dpi = Annotated[int, typer.Option("--dpi", help="Resolution of a .png --figure.")]
Quiet = Annotated[
    bool,
    typer.Option(
        "--quiet", "-q", help="No progress and no log lines (results and errors still print)."
    ),
]
Verbose = Annotated[
    bool, typer.Option("--verbose", "-v", help="Debug log lines, with their source file:line.")
]
NoProgress = Annotated[
    bool, typer.Option("--no-progress", help="No progress bar or progress lines (logs stay).")
]


# --- option groups: options that several commands take together, declared once -----------------


class OptionGroup:
    """Base of a frozen dataclass whose fields are options that several commands take together,
    each annotated with its declaration above. A command takes the group as one keyword-only
    parameter annotated with the class; :func:`grouped` shows Typer the fields in its place and
    calls the command with an instance built from their values. ``ctx.params`` and ``--config``
    files see the fields by their own names."""


def grouped(command: Callable[P, R]) -> Callable[P, R]:
    """``command`` with each :class:`OptionGroup` parameter replaced, in the signature that Typer
    reads, by the group's fields (keyword-only, with their defaults); the wrapper gathers their
    values into the group's instance."""
    hints = get_type_hints(command, include_extras=True)
    parameters: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for parameter in inspect.signature(command).parameters.values():
        kind = hints.get(parameter.name, parameter.annotation)
        if isinstance(kind, type) and issubclass(kind, OptionGroup):
            fields = _group_parameters(kind)
            groups[parameter.name] = (kind, [f.name for f in fields])
            parameters += fields
        else:
            parameters.append(parameter.replace(annotation=kind))

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        for name, (kind, names) in groups.items():
            kwargs[name] = kind(**{n: kwargs.pop(n) for n in names})
        return command(*args, **kwargs)

    wrapper.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


def _group_parameters(kind: type) -> list[inspect.Parameter]:
    """The fields of group ``kind`` as keyword-only parameters with their Typer declarations."""
    hints = get_type_hints(kind, include_extras=True)
    return [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
        )
        for f in dataclasses.fields(kind)
    ]


@dataclasses.dataclass(frozen=True)
class Output(OptionGroup):
    """--overwrite, --json and the reporting switches of every long command (the switches:
    ``Reporter.for_output``)."""

    overwrite: Overwrite = False
    json_output: Json = False
    quiet: Quiet = False
    verbose: Verbose = False
    no_progress: NoProgress = False


@dataclasses.dataclass(frozen=True)
class CheckpointData(OptionGroup):
    """Where a checkpoint's test data comes from and where it runs (attack, transfer, inspect)."""

    dataset: CheckpointDataset = None
    data_dir: CheckpointDataDir = None
    download: Download = True
    device: Device = "auto"
    threads: Threads = None


@dataclasses.dataclass(frozen=True)
class AttackChoice(OptionGroup):
    """Which attacks, at which radii, with which settings (attack, transfer); None: the
    protocol's or the attack's own. Parsed and checked by ``common.select_attacks``."""

    attacks: Attacks = None
    eps: Eps = None
    steps: Steps = None
    step_size: StepSize = None
    restarts: Restarts = None
    attack_option: AttackOptions = None


class SettingOverrides(TypedDict):
    """Attack settings that replace the defaults (None: keep them): keyword arguments of
    ``runs_for`` and ``transfer.run_settings``."""

    steps: int | None
    step_size: float | None
    restarts: int | None


@dataclasses.dataclass(frozen=True)
class Training(OptionGroup):
    """How an ensemble is trained, apart from its members and defense (train, and sweep, which
    trains one ensemble per grid cell): the keyword arguments of ``cli.train.build_config``."""

    # the data
    dataset: Dataset = "fashionmnist"
    data_dir: DataDir = None
    download: Download = True
    train_limit: TrainLimit = None
    test_limit: TestLimit = None
    # the model and the defense's variant
    ncen_form: NcenForm = "paper"
    param: Param = None
    activation: Activation = "relu"
    combine: Combine = "mean-prob"
    # the schedule and the training inputs (D + D_noise, augmentation)
    epochs: Epochs = None
    batch_size: int = 64
    lr: float = 1e-3
    augment: Augment = True
    noise: Noise = True
    noise_eps: NoiseEps = None
    seed: int = 0
    # where and how it computes
    device: Device = "auto"
    precision: Precision = "fp32"
    threads: Threads = None
    member_threads: MemberThreads = None
    deterministic: Deterministic = False
    double_backprop: DoubleBackprop = DEFAULT_DOUBLE_BACKPROP
    fd_scale: FdScale = DEFAULT_FD_SCALE

"""The option vocabulary shared by every ``ncen`` command (docs/usage.md, "Option vocabulary").

One concept, one spelling: the declarations below are used by every command that takes the
option, so the name, the list semantics and the help agree. Spellings of earlier releases are
rewritten to the current ones before Click parses the command line (:func:`rewrite_deprecated`),
with a one-line warning; they are accepted for one release. No torch import here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

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
    typer.Option(
        help="Comma list (resnet20,resnet26,resnet32), 3xresnet20, "
        "or a paper shorthand ensemble1..ensemble4[-kK]."
    ),
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
    typer.Option(
        help="fp32; tf32 (CUDA); bf16: forward passes of the training step in bfloat16 (CUDA, "
        "or a CPU with native bf16: `ncen env` tells). Evaluation stays fp32."
    ),
]
MemberThreads = Annotated[
    int | None,
    typer.Option(
        help="Members trained concurrently on CPU threads (default: one per member on a "
        "multi-core CPU, 1 on CUDA)."
    ),
]
Deterministic = Annotated[bool, typer.Option(help="Deterministic algorithms.")]
DoubleBackprop = Annotated[
    str,
    typer.Option(
        help="How the regularizer's gradient is differentiated, both exact: exact (double "
        "backprop, default) or jvp (forward mode). finite-diff is deprecated (runs exact)."
    ),
]
FdScale = Annotated[float, typer.Option(help="Deprecated and ignored (finite-diff is retired).")]

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

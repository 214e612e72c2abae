"""``ncen attack``: the paper's white-box evaluation, a stronger protocol, or the authors' released
evaluation (to measure its artefacts), of a checkpoint."""

from __future__ import annotations

import csv
import io
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import JustifyMethod
from rich.table import Table

from ncen_cli.atomic import atomic_write_json, atomic_write_text
from ncen_cli.cli import common
from ncen_cli.cli import options as opt
from ncen_cli.cli.reporting import Reporter
from ncen_cli.errors import UsageError

if TYPE_CHECKING:  # torch-backed: imported when the command runs (usage errors stay instant)
    from ncen_cli.authors_protocol import AuthorsQuirks
    from ncen_cli.evaluation import AttackRun, EvaluationReport

WORST_CASE = "worst-case"  # ncen_cli.evaluation.WORST_CASE (test_cli_vocabulary holds them equal)
PROTOCOLS = ("paper", "strong", "authors")


def build_runs(
    family: str,
    protocol: str | None,
    selection: common.AttackSelection,
    objective: str | None,
    *,
    combine: str = "mean-logits",
    quirks: AuthorsQuirks | None = None,
) -> list[AttackRun]:
    """The runs asked for: a protocol (paper by default when no attack settings are given),
    optionally restricted by ``--attacks``, re-centred on ``--eps`` and overridden by
    ``--steps/--step-size/--restarts``; or, with ``--attacks``/``--eps`` and no protocol, those
    attacks with their defaults (:func:`ncen_cli.evaluation.runs_for`). ``selection`` and the
    protocol options were checked before the checkpoint was read
    (:func:`ncen_cli.cli.common.select_attacks`, :func:`protocol_options`)."""
    from ncen_cli.evaluation import runs_for

    return runs_for(
        family,
        run_protocol(protocol, selection),
        attacks=selection.names,
        eps=selection.eps,
        objective=objective,
        combine=combine,
        quirks=quirks,
        **selection.overrides,
    )


def run_protocol(protocol: str | None, selection: common.AttackSelection) -> str:
    """The protocol the runs follow: --protocol; without it "custom" when --attacks or --eps
    names the runs, else "paper"."""
    if protocol is not None:
        return protocol
    return "custom" if selection.names is not None or selection.eps is not None else "paper"


def protocol_options(
    protocol: str | None, quirks: str | None, objective: str | None, batch_size: int | None
) -> tuple[AuthorsQuirks | None, int]:
    """--protocol, --quirks (authors only) and --objective checked before torch is imported, so
    that a usage error answers at once; returns the quirks and the batch size (default 500;
    authors: 64)."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise UsageError(f"--protocol must be {', '.join(PROTOCOLS)}, got '{protocol}'")
    if protocol == "authors" and objective is not None:
        raise UsageError(
            "--objective does not apply to --protocol authors (its objective is "
            "advertorch's CE on the authors' ensemble output)"
        )
    common.require_positive(batch_size, "--batch-size")
    if quirks is not None and protocol != "authors":
        raise UsageError("--quirks applies only to --protocol authors")
    from ncen_cli.authors_protocol import AUTHORS_BATCH_SIZE, AuthorsQuirks

    authors_quirks = AuthorsQuirks.parse(quirks) if protocol == "authors" else None
    if batch_size is None:
        batch_size = AUTHORS_BATCH_SIZE if protocol == "authors" else 500
    return authors_quirks, batch_size


def settings_text(params: dict[str, Any], attack: str = "") -> str:
    if attack == WORST_CASE:
        return "per example, worst of: " + ", ".join(params.get("over", []))
    step = params.get("step_size")
    parts = [
        f"steps={params['steps']}",
        f"step={'auto' if step is None else f'{step:g}'}",
        f"restarts={params['restarts']}",
        f"rand={'y' if params['random_start'] else 'n'}",
        f"obj={params['objective']}",
    ]
    if attack == "mifgsm":
        parts.append(f"decay={params['decay']:g}")
    parts += [
        f"{k}={v}"
        for k, v in params.items()
        if k not in ("steps", "step_size", "restarts", "random_start", "objective", "decay", "seed")
        and not k.startswith("authors.")
    ]
    return " ".join(parts)


def report_table(report: EvaluationReport, title: str) -> Table:
    table = Table(title=title)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("attack", "left"),
        ("eps", "right"),
        ("accuracy", "right"),
        ("95% interval", "right"),
        ("correct/n", "right"),
        ("settings", "left"),
        ("s", "right"),
    )
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=column != "settings")
    clean = report.to_json()
    table.add_row(
        "clean (ACE)",
        "",
        f"{report.clean_accuracy:.4f}",
        f"[{clean['clean_ci_low']:.3f}, {clean['clean_ci_high']:.3f}]",
        f"{report.clean_correct}/{report.n}",
        "",
        "",
        end_section=True,
    )
    worst = [r for r in report.results if r.attack == WORST_CASE]
    for r in report.results:
        table.add_row(
            r.attack,
            f"{r.eps:g}",
            f"{r.accuracy:.4f}",
            f"[{r.ci_low:.3f}, {r.ci_high:.3f}]",
            f"{r.correct}/{r.n}",
            settings_text(r.params, r.attack),
            f"{r.seconds:.1f}",
            style="bold" if r.attack == WORST_CASE else None,
            end_section=bool(worst) and r is worst[-1],
        )
    return table


def checks_table(report: EvaluationReport) -> Table:
    table = Table(title="self-checks")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    for c in report.checks:
        status = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "n/a"}[c.passed]
        table.add_row(c.name, status, c.detail)
    return table


def csv_text(report: EvaluationReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = sorted({k for r in report.results for k in r.params})
    writer.writerow(
        ["attack", "eps", "accuracy", "correct", "n", "ci_low", "ci_high", "seconds", *keys]
    )
    writer.writerow(
        [
            "clean",
            0,
            report.clean_accuracy,
            report.clean_correct,
            report.n,
            report.to_json()["clean_ci_low"],
            report.to_json()["clean_ci_high"],
            "",
            *[""] * len(keys),
        ]
    )
    for r in report.results:
        writer.writerow(
            [
                r.attack,
                r.eps,
                r.accuracy,
                r.correct,
                r.n,
                r.ci_low,
                r.ci_high,
                round(r.seconds, 3),
                *[r.params.get(k, "") for k in keys],
            ]
        )
    return buffer.getvalue()


@common.command("attack")
def attack_command(
    checkpoint: opt.Checkpoint,
    protocol: Annotated[
        str | None,
        typer.Option(
            help="paper (Table II; the default when no attack "
            "settings are given), strong (FGSM, PGD with "
            "restarts, APGD-CE on every objective + "
            "APGD-DLR, and their per-example worst case) "
            "or authors (the authors' released "
            "evaluation: not honest; see --quirks)."
        ),
    ] = None,
    quirks: Annotated[
        str | None,
        typer.Option(
            help="--protocol authors: the quirks kept on: all "
            "(default), none, or a comma list of "
            "member-softmax, output-softmax, batchnorm-train, "
            "conditional, advertorch-iterations."
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="mean-ce (the paper: mean of the members' CE; the default), logits (CE of "
            "combined logits) or prob (NLL of the mean probability). The strong protocol runs "
            "every objective unless one is given."
        ),
    ] = None,
    test_limit: opt.TestLimit = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Images per attack batch (default 500; authors: 64, which matters with BatchNorm "
            "in train mode)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the subset and every random start.")] = 0,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when a self-check fails.")
    ] = False,
    check_large_eps: Annotated[
        bool,
        typer.Option(
            "--check-large-eps", help="Also check that PGD at eps 0.5 drives accuracy to about 0."
        ),
    ] = False,
    out: opt.ResultsFile = None,
    *,
    choice: opt.AttackChoice,
    data: opt.CheckpointData,
    output: opt.Output,
) -> None:
    """Attack an ensemble checkpoint and report accuracy under each attack, with self-checks."""
    common.require_positive(test_limit, "--test-limit")
    selection = common.select_attacks(choice)
    common.check_suffix(out, ".json", ".csv")
    authors_quirks, batch_size = protocol_options(protocol, quirks, objective, batch_size)
    from ncen_cli import distributed
    from ncen_cli.checkpoint import load_ensemble
    from ncen_cli.device import Runtime
    from ncen_cli.evaluation import evaluate

    common.claim_output(out, output.overwrite)
    meta, arrays = common.checkpoint_test_data(checkpoint, data, test_limit, seed)
    family = meta.get("family")
    runs_family = family if family in ("fashionmnist", "cifar10") else None
    dist = distributed.initialize(data.device)  # under torchrun: each rank attacks its share
    runtime = Runtime.create(device=data.device, seed=seed, threads=data.threads)
    runs = build_runs(
        runs_family or arrays.family,
        protocol,
        selection,
        objective,
        combine=meta.get("combine", "mean-logits"),
        quirks=authors_quirks,
    )
    from dataclasses import replace

    from ncen_cli.attacks.base import with_attack_options

    optioned = with_attack_options([(r.attack, r.settings) for r in runs], selection.attack_options)
    runs = [replace(r, settings=s) for r, s in zip(runs, optioned, strict=True)]
    ensemble = load_ensemble(checkpoint, device=runtime.device)

    started = time.perf_counter()
    with (
        runtime.applied(),
        Reporter.for_output(output, main=dist.is_main) as reporter,
    ):
        console = reporter.console
        tasks: dict[str, Any] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = reporter.start(label, total=total)
            reporter.update(tasks[label], done, total)
            if done >= total:
                reporter.stop(tasks.pop(label))

        report = evaluate(
            ensemble,
            arrays.test_x,
            arrays.test_y,
            runs,
            batch_size=batch_size,
            device=runtime.device,
            seed=seed,
            check_large_eps=check_large_eps,
            progress=progress,
            worst_case=protocol == "strong",
            quirks=authors_quirks,
            dist=dist,
        )
    seconds = time.perf_counter() - started
    if not dist.is_main:  # the counts are already summed over ranks; rank 0 reports
        return

    payload = {
        **report.to_json(),
        "checkpoint": str(checkpoint),
        "dataset": arrays.name,
        "family": runs_family or arrays.family,
        "protocol": run_protocol(protocol, selection),
        "device": str(runtime.device),
        "batch_size": batch_size,
        "seconds": seconds,
    }
    if authors_quirks is not None:
        payload["quirks"] = authors_quirks.params()
    if out is not None:
        if out.suffix.lower() == ".json":
            atomic_write_json(out, payload)
        else:
            atomic_write_text(out, csv_text(report))
    if output.json_output:
        common.print_json(payload)
    else:
        console_out = common.out_console()
        console_out.print(
            report_table(
                report,
                f"{checkpoint.name}: {arrays.name}, n={report.n}, protocol "
                f"{payload['protocol']}, {seconds:.0f} s on {runtime.device}",
            )
        )
        console_out.print(checks_table(report))
    failed = report.failed_checks
    if failed:
        names = ", ".join(c.name for c in failed)
        if strict:
            raise common.fail(f"{len(failed)} self-check(s) failed: {names}", 1)
        console.print(f"[yellow]warning:[/] self-check(s) failed: {names} (see the table)")

"""The pure half of ``benchmarks/reproduce.py``: result files in, report out (no torch, no models).

A results folder holds one small JSON per finished stage, ``<method>/<stage>.json`` (see
``reproduce.py`` for the schema each stage writes). From whatever is there this module builds
docs/reproduction.json (:func:`build_summary`) and docs/reproduction.md (:func:`render_markdown`):
per-method tables, paired differences of each NCEn form against each baseline on the same test
images with 95 % intervals (Newcombe's method 10 for paired proportions), the list of missing
stages and a verdict that says only what those intervals support. A method may also have a
``blackbox`` check (a gradient-free attack on the strong stage's images): the report holds it
against the strong stage's worst case, image by image, and names the methods without one.

Per-example correctness travels as a compact mask: ``{"n": N, "bits": base64(packbits(mask))}``,
first test image in the most significant bit of the first byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path
from typing import Any

Z95 = 1.959964
STAGES = ("train", "paper", "authors", "strong", "transfer", "inspect")
# supplementary checks: run on request (``--stages blackbox``), never listed as missing
CHECKS = ("blackbox",)
ALL_STAGES = (*STAGES, *CHECKS)  # every stage a results folder may hold, in run order
PROTOCOLS = ("paper", "authors", "strong")
WORST = "worst-case"  # the strong stage's per-example worst-case rows (ncen_cli's WORST_CASE)
HISTORY_FIELDS = ("epoch", "lr", "ce", "terms", "test_accuracy")  # a train stage's, no timings
DIGEST_FIELDS = ("epoch", "ce", "terms", "test_accuracy")  # also in a checkpoint's history
PAPER_OBJECTIVE = "mean-ce"  # the paper's attack objective: the mean of the members' CE
BASELINES = ("baseline", "gal", "gpmr", "trs", "adp", "adv-train")
NAMES = {
    "fgsm": "FGSM",
    "mifgsm": "MI-FGSM",
    "pgd": "PGD",
    "bim": "BIM",
    "apgd-ce": "APGD-CE",
    "apgd-dlr": "APGD-DLR",
    "square": "Square",
    "worst-case": "worst case",
}


# --- compact masks -----------------------------------------------------------------------------


def pack_mask(mask: list[bool]) -> dict[str, Any]:
    """A bool sequence -> ``{"n", "bits"}`` (base64 of the bits, MSB first, zero-padded)."""
    data = bytearray((len(mask) + 7) // 8)
    for i, value in enumerate(mask):
        if value:
            data[i // 8] |= 0x80 >> (i % 8)
    return {"n": len(mask), "bits": base64.b64encode(bytes(data)).decode("ascii")}


def unpack_mask(packed: dict[str, Any]) -> list[bool]:
    """Inverse of :func:`pack_mask`; ValueError when the bits are shorter than ``n``."""
    data = base64.b64decode(packed["bits"])
    n = int(packed["n"])
    if len(data) * 8 < n:
        raise ValueError(f"mask of {n} examples has only {len(data) * 8} bits")
    return [bool(data[i // 8] & (0x80 >> (i % 8))) for i in range(n)]


# --- intervals ---------------------------------------------------------------------------------


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``correct / n`` ((0, 1) when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def unpaired_difference(
    correct_a: int, n_a: int, correct_b: int, n_b: int, z: float = Z95
) -> tuple[float, float, float]:
    """accuracy(a) - accuracy(b) of two proportions treated as independent, with Newcombe's
    (1998) method 10 interval (the Wilson intervals combined). On the same images it is wider
    than the paired interval whenever the outcomes are positively correlated: conservative.
    Returns (difference, low, high)."""
    p1, p2 = correct_a / n_a, correct_b / n_b
    l1, u1 = wilson(correct_a, n_a, z)
    l2, u2 = wilson(correct_b, n_b, z)
    d = p1 - p2
    return (
        d,
        max(-1.0, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)),
        min(1.0, d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)),
    )


def paired_counts(a: list[bool], b: list[bool]) -> tuple[int, int, int, int]:
    """(both, a only, b only, neither) correct, over examples paired by position."""
    if len(a) != len(b):
        raise ValueError(f"paired masks differ in length: {len(a)} vs {len(b)}")
    both = sum(1 for x, y in zip(a, b, strict=True) if x and y)
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    return both, a_only, b_only, len(a) - both - a_only - b_only


def paired_difference(
    both: int, a_only: int, b_only: int, neither: int, z: float = Z95
) -> tuple[float, float, float]:
    """accuracy(a) - accuracy(b) on the same examples and its interval, Newcombe (1998) method 10:
    the Wilson intervals of both proportions combined with the continuity-corrected correlation
    of the paired outcomes. Returns (difference, low, high); n = 0 gives (0, -1, 1)."""
    n = both + a_only + b_only + neither
    if n == 0:
        return 0.0, -1.0, 1.0
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson(both + a_only, n, z)
    l2, u2 = wilson(both + b_only, n, z)
    denominator = math.sqrt(
        (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    )
    cross = both * neither - a_only * b_only
    if denominator == 0:
        phi = 0.0
    elif cross > 0:
        phi = max(cross - n / 2, 0.0) / denominator
    else:
        phi = cross / denominator
    d = p1 - p2
    delta = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    eps = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return d, max(-1.0, d - delta), min(1.0, d + eps)


# --- reading a results folder ------------------------------------------------------------------

BUDGET_KEYS = (
    "members",
    "train_limit",
    "epochs",
    "lr_step_epochs",
    "seed",
    "protocol_limit",
    "strong_limit",
    "transfer_limit",
    "inspect_limit",
    "strong_restarts",
)


def read_results(folder: Path, expected: dict | None = None) -> dict[str, dict[str, dict]]:
    """``{method: {stage: payload}}`` for every ``<method>/<stage>.json`` under ``folder``
    (unknown stage names, unreadable files and, given ``expected``, files recorded under another
    budget (:data:`BUDGET_KEYS`) are skipped; a missing folder is empty)."""
    out: dict[str, dict[str, dict]] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*/*.json")):
        if path.stem not in ALL_STAGES:
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        recorded = payload.get("budget", {}) if isinstance(payload, dict) else {}
        if expected is not None and any(recorded.get(k) != expected.get(k) for k in BUDGET_KEYS):
            continue
        out.setdefault(path.parent.name, {})[path.stem] = payload
    return out


def missing_stages(
    results: dict, methods: list[str], stages: tuple[str, ...] = STAGES
) -> list[str]:
    """``"METHOD STAGE"`` for every expected stage without a result file, in run order."""
    return [f"{m} {s}" for m in methods for s in stages if s not in results.get(m, {})]


def row_key(row: dict) -> tuple[str, float, str]:
    """(attack, eps, objective) of a result row."""
    return (
        row["attack"],
        round(float(row["eps"]), 4),
        str(row.get("params", {}).get("objective", "")),
    )


def headline_rows(stage: dict, protocol: str) -> list[dict]:
    """The rows a protocol is judged by: every row of paper and authors; of strong, the
    per-example worst case per eps (the rows that have ``attack == "worst-case"``)."""
    rows = stage.get("results", [])
    if protocol == "strong":
        return [r for r in rows if r["attack"] == WORST]
    return rows


# --- summary (docs/reproduction.json) ----------------------------------------------------------


def protocol_entries(stage: dict, protocol: str) -> list[dict]:
    """The rows a protocol is judged by (:func:`headline_rows`) as report entries."""
    return accuracy_entries(headline_rows(stage, protocol))


def accuracy_entries(rows: list[dict]) -> list[dict]:
    """Result rows as report entries: attack, eps, objective, accuracy, ci, n."""
    return [
        {
            "attack": r["attack"],
            "eps": r["eps"],
            "objective": r.get("params", {}).get("objective"),
            "accuracy": r["accuracy"],
            "ci": [r["ci_low"], r["ci_high"]],
            "n": r["n"],
        }
        for r in rows
    ]


def paired_figures(row: dict, other: dict | None) -> dict | None:
    """``row`` minus ``other`` paired on the same images, from their per-example masks: the
    difference, Newcombe's 95 % interval, both accuracies, n and the discordant counts (row
    only correct, other only correct); None without ``other``, when a mask is missing or when
    the lengths differ."""
    if other is None or "mask" not in row or "mask" not in other:
        return None
    a, b = unpack_mask(row["mask"]), unpack_mask(other["mask"])
    if len(a) != len(b):
        return None
    counts = paired_counts(a, b)
    d, low, high = paired_difference(*counts)
    return {
        "difference": d,
        "ci": [low, high],
        "accuracies": [sum(a) / len(a), sum(b) / len(b)] if a else [None, None],
        "n": len(a),
        "discordant": [counts[1], counts[2]],
    }


def paired_rows(results: dict, method: str, baseline: str, protocol: str) -> list[dict]:
    """Paired differences method - baseline per headline row both have, from their masks."""
    a_stage = results.get(method, {}).get(protocol)
    b_stage = results.get(baseline, {}).get(protocol)
    if not a_stage or not b_stage:
        return []
    b_rows = {row_key(r): r for r in headline_rows(b_stage, protocol)}
    out = []
    for row in headline_rows(a_stage, protocol):
        figures = paired_figures(row, b_rows.get(row_key(row)))
        if figures is not None:
            out.append(
                {
                    "method": method,
                    "baseline": baseline,
                    "protocol": protocol,
                    "attack": row["attack"],
                    "eps": row["eps"],
                    "objective": row.get("params", {}).get("objective"),
                    "precisions": [stage_precision(a_stage), stage_precision(b_stage)],
                    **figures,
                }
            )
    return out


def protocol_gap_rows(results: dict, method: str) -> list[dict]:
    """Per (attack, eps): the authors' protocol minus the paper protocol for one method, paired
    on the same images (the authors' masks are unconditional: clean-correct and still correct)."""
    stages = results.get(method, {})
    if "authors" not in stages or "paper" not in stages:
        return []
    paper = {(r["attack"], round(float(r["eps"]), 4)): r for r in stages["paper"]["results"]}
    out = []
    for row in stages["authors"]["results"]:
        figures = paired_figures(row, paper.get((row["attack"], round(float(row["eps"]), 4))))
        if figures is not None:
            out.append({"method": method, "attack": row["attack"], "eps": row["eps"], **figures})
    return out


def objective_gap_rows(results: dict, method: str) -> list[dict]:
    """Per attack and eps of a method's strong stage: the paper's objective (the members' mean
    CE) minus each other objective of the same attack, paired on the same images. A positive
    difference: attacking the mean CE overstates the accuracy that the other objective leaves."""
    by_setting: dict[tuple[str, float], dict[str, dict]] = {}  # (attack, eps) -> objective -> row
    for r in results.get(method, {}).get("strong", {}).get("results", []):
        if r["attack"] != WORST:
            attack, eps, objective = row_key(r)
            by_setting.setdefault((attack, eps), {})[objective] = r
    out = []
    for runs in by_setting.values():
        row = runs.get(PAPER_OBJECTIVE)
        for objective, other in runs.items():
            figures = paired_figures(row, other) if row is not None else None
            if objective != PAPER_OBJECTIVE and figures is not None:
                out.append(
                    {
                        "method": method,
                        "attack": other["attack"],
                        "eps": other["eps"],
                        "objectives": [PAPER_OBJECTIVE, objective],
                        **figures,
                    }
                )
    return out


def is_ncen(method: str) -> bool:
    return method == "ncen" or method.startswith("ncen@") or method.startswith("ncen-")


def call(row: dict) -> str:
    """better / worse / inconclusive from a paired row's interval."""
    low, high = row["ci"]
    return "better" if low > 0 else "worse" if high < 0 else "inconclusive"


def build_summary(
    results: dict, methods: list[str], budget: dict, same_training: dict[str, str] | None = None
) -> dict:
    """The machine-readable report (the shape issue 20 asks for), verdict included.

    ``same_training`` maps a method name to another that names the same training (the same
    defense with the same resolved hyperparameters: ``ncen@0.02`` -> ``ncen`` on FashionMNIST).
    Such a name gets that method's figures and a ``same_training_as`` field, and is counted
    once: no missing stages, paired rows or table columns of its own."""
    same_training = same_training or {}
    own = list(dict.fromkeys(same_training.get(m, m) for m in methods))
    listed = list(dict.fromkeys(x for m in methods for x in (same_training.get(m, m), m)))
    summary: dict[str, Any] = {"budget": budget, "methods": {}, "paired": [], "missing": []}
    for m in listed:
        stages = results.get(same_training.get(m, m), {})
        entry: dict[str, Any] = {
            "clean_accuracy": stages.get("train", {}).get("clean_accuracy"),
            "clean_images": stages.get("train", {}).get("test_images"),
            "train_seconds": stages.get("train", {}).get("seconds"),
            "protocols": {p: protocol_entries(stages[p], p) for p in PROTOCOLS if p in stages},
            "strong_attacks": accuracy_entries(  # the attacks the worst case is taken over
                [r for r in stages.get("strong", {}).get("results", []) if r["attack"] != WORST]
            ),
            "inspect": inspect_figures(stages.get("inspect")),
            "blackbox": blackbox_rows(stages),
            "transfer": {
                a: t["summary"] for a, t in stages.get("transfer", {}).get("attacks", {}).items()
            },
        }
        if m in same_training:
            entry["same_training_as"] = same_training[m]
        summary["methods"][m] = entry
    for m in (m for m in own if is_ncen(m)):
        for base in (b for b in own if b in BASELINES):
            for p in PROTOCOLS:
                summary["paired"] += paired_rows(results, m, base, p)
    summary["dose_response"] = dose_response_rows(results, listed, same_training)
    summary["authors_minus_paper"] = [r for m in own for r in protocol_gap_rows(results, m)]
    summary["objective_gaps"] = [r for m in own for r in objective_gap_rows(results, m)]
    summary["missing"] = missing_stages(results, own)
    summary["checkpoints"] = {m: checkpoint_groups(results.get(m, {})) for m in own}
    summary["checkpoint_notes"] = checkpoint_notes(results, summary["checkpoints"])
    summary["reproduced_notes"] = reproduced_notes(results, own)
    summary["verdict_points"] = verdict(summary, own)
    summary["verdict"] = " ".join(summary["verdict_points"])
    return summary


def blackbox_rows(stages: dict) -> list[dict]:
    """One method's black-box check held against its strong stage, a dict per ε of the check:
    ``square_accuracy`` (the gradient-free attack alone), ``white_box_worst_case`` (the strong
    stage's per-example worst case on the same images), ``fooled_only_by_square`` (images that
    survive every white-box attack but not the black-box one: a sign of gradient masking),
    ``worst_case_over_both`` with its Wilson ``ci``, ``n`` and the attack's ``params``. The
    strong-stage figures are None where it has no mask at that ε (no strong stage yet, or
    another number of images). Empty without a blackbox stage."""
    check = stages.get("blackbox")
    if not check:
        return []
    worst = {
        round(float(r["eps"]), 4): r
        for r in stages.get("strong", {}).get("results", [])
        if r["attack"] == WORST and "mask" in r
    }
    out = []
    for r in check.get("results", []):
        entry: dict[str, Any] = {
            "attack": r["attack"],
            "eps": r["eps"],
            "params": r.get("params", {}),
            "square_accuracy": r["accuracy"],
            "n": r["n"],
            "white_box_worst_case": None,
            "fooled_only_by_square": None,
            "worst_case_over_both": None,
            "ci": None,
        }
        white_row = worst.get(round(float(r["eps"]), 4))
        if white_row is not None and "mask" in r:
            white, black = unpack_mask(white_row["mask"]), unpack_mask(r["mask"])
            if len(white) == len(black):
                both, white_only, _, _ = paired_counts(white, black)
                entry.update(
                    white_box_worst_case=sum(white) / len(white),
                    fooled_only_by_square=white_only,
                    worst_case_over_both=both / len(white),
                    ci=list(wilson(both, len(white))),
                )
        out.append(entry)
    return out


def dose_lambda(method: str) -> float | None:
    """λ of a dose-response name (``ncen@0.1`` -> 0.1), else None."""
    return float(method.split("@", 1)[1]) if method.startswith("ncen@") else None


def dose_response_rows(results: dict, methods: list[str], same_training: dict[str, str]) -> list:
    """Strong protocol, each ``ncen@λ`` minus each smaller λ's (larger λ first, then the smaller
    ones in order: λ 0.1 − 0.02, 0.5 − 0.02, 0.5 − 0.1), paired on the same images, per ε of the
    per-example worst case; ``same_training`` names where a λ's results are."""
    doses = sorted((lam, m) for m in methods if (lam := dose_lambda(m)) is not None)
    out = []
    for i, (_, m) in enumerate(doses):
        for _, low in doses[:i]:
            for row in paired_rows(
                results, same_training.get(m, m), same_training.get(low, low), "strong"
            ):
                out.append({**row, "method": m, "baseline": low})
    return out


def display_name(method: str, entry: dict) -> str:
    """A method's name in a table: ``ncen@0.02 (= ncen)`` for another method's training."""
    same = entry.get("same_training_as")
    return f"{method} (= {same})" if same else method


def distinct_methods(summary: dict) -> dict[str, dict]:
    """The summary's method entries without the names of another method's training."""
    return {m: e for m, e in summary["methods"].items() if "same_training_as" not in e}


def same_training_notes(summary: dict) -> list[str]:
    """One sentence per method name that is another method's training."""
    return [
        f"{m} is the same training as {e['same_training_as']} (the same defense with the same "
        f"resolved hyperparameters): its figures are {e['same_training_as']}'s, counted once."
        for m, e in summary["methods"].items()
        if "same_training_as" in e
    ]


def inspect_figures(stage: dict | None) -> dict:
    """The few inspect figures the verdict uses (mean pairwise gradient cosine, norm dispersion,
    disagreement, member and ensemble accuracy, NCEn terms); empty without the stage."""
    if not stage:
        return {}
    d = stage["diagnostics"]
    pairs = d.get("pairs", [])
    mean_of = (lambda key: sum(p[key] for p in pairs) / len(pairs)) if pairs else (lambda k: None)
    return {
        "n": d.get("n"),
        "mean_gradient_cosine": mean_of("grad_cosine_mean"),
        "norm_dispersion": d.get("norm_dispersion"),
        "mean_disagreement": mean_of("disagreement"),
        "ensemble_accuracy": d.get("ensemble_accuracy"),
        "terms": d.get("terms", {}),
    }


def history_digest(history: list[dict]) -> str:
    """16 hex digits of SHA-256 over a training's per-epoch record (epoch, mean CE, the defense's
    terms, test accuracy: the figures that a checkpoint's history and a train stage's share, no
    timings). Two trainings with the same digest took the same path to the last bit of every
    epoch's mean loss: a retraining that reproduced the run, not merely one with the same
    settings."""
    rows = [{k: r.get(k) for k in DIGEST_FIELDS} for r in history]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_groups(stages: dict) -> dict[str, list[str]]:
    """A method's stage names grouped by the checkpoint they ran on: its recorded SHA-256 prefix
    or, for a stage recorded without one (before records existed), the train stage's (those ran
    in the train stage's work folder); ``"train"`` stands for an unrecorded train checkpoint. A
    stage whose checkpoint's history digest equals that of the train stage's recorded history
    ran on a retraining that reproduced the train stage's run: it joins the train stage's
    group."""
    train = stages.get("train", {}).get("checkpoint", {}).get("sha256", "train")
    reproduced = reproduced_stages(stages)
    groups: dict[str, list[str]] = {}
    for name in ALL_STAGES:
        if name in stages:
            record = stages[name].get("checkpoint", {})
            key = train if name in reproduced else record.get("sha256", train)
            groups.setdefault(key, []).append(name)
    return groups


def reproduced_stages(stages: dict) -> list[str]:
    """The stages of a method that ran on a checkpoint other than the train stage's file (or on
    one when the train stage recorded none) whose history digest equals that of the train
    stage's recorded history: a retraining that reproduced the train stage's run."""
    train_stage = stages.get("train", {})
    if not train_stage.get("history"):
        return []
    digest = history_digest(train_stage["history"])
    train_sha = train_stage.get("checkpoint", {}).get("sha256")
    return [
        name
        for name in ALL_STAGES
        if name != "train"
        and name in stages
        and stages[name].get("checkpoint", {}).get("history") == digest
        and stages[name]["checkpoint"].get("sha256") != train_sha
    ]


def reproduced_notes(results: dict, methods: list[str]) -> list[str]:
    """A line per method with :func:`reproduced_stages`: which stages, on which file."""
    lines = []
    for m in methods:
        stages = results.get(m, {})
        names = reproduced_stages(stages)
        if names:
            record = stages[names[0]]["checkpoint"]
            lines.append(
                f"- {m}: {', '.join(names)} ran on a retraining (checkpoint {record['sha256']}, "
                f"{record.get('precision')}, {stages[names[0]].get('machine', '?')}) whose every "
                "epoch's record (mean CE, the defense's terms, test accuracy) equals the "
                "train stage's to the last bit: the same run reproduced, counted as one "
                "training."
            )
    return lines


def stage_precision(stage: dict) -> str | None:
    """The training precision of the checkpoint a stage ran on: its checkpoint record's, or the
    budget's for a stage recorded before records existed."""
    return stage.get("checkpoint", {}).get("precision", stage.get("budget", {}).get("precision"))


def precision_mismatches(paired: list[dict]) -> list[str]:
    """One sentence per (method, baseline, protocol) whose two checkpoints were trained in
    different precisions (e.g. one stage run on an fp32 retraining): the paired difference then
    also contains the precision's effect."""
    precisions = {(r["method"], r["baseline"], r["protocol"]): r["precisions"] for r in paired}
    lines = []
    for (m, b, p), (pm, pb) in precisions.items():
        if pm != pb:
            lines.append(
                f"{p} protocol, {m} − {b}: the two checkpoints were trained in different "
                f"precisions ({m} {pm}, {b} {pb}), so the difference also contains that of "
                "the precision."
            )
    return lines


def checkpoint_notes(results: dict, groups_by_method: dict[str, dict[str, list[str]]]) -> list[str]:
    """A line per method whose stages ran on more than one training of it (a checkpoint trained
    again, same seed and budget, on another machine or precision): which stages, on what.
    ``groups_by_method``: :func:`checkpoint_groups` of each method."""
    lines = []
    for m, groups in groups_by_method.items():
        stages = results.get(m, {})
        if len(groups) < 2:
            continue
        parts = []
        for key, names in groups.items():
            first = stages[names[0]]
            which = "the train stage's checkpoint" if key == "train" else f"checkpoint {key}"
            precision = stage_precision(first)
            scored = [stages[n] for n in names if stages[n].get("clean_accuracy") is not None]
            clean = (
                f", clean {scored[0]['clean_accuracy']:.3f} on "
                f"{scored[0].get('n', scored[0].get('test_images'))} images"
                if scored
                else ""
            )
            parts.append(
                f"{', '.join(names)} on {which} ({precision}, {first.get('machine', '?')}{clean})"
            )
        lines.append(f"- {m}: " + "; ".join(parts) + ".")
    return lines


# --- verdict -----------------------------------------------------------------------------------


def verdict(summary: dict, methods: list[str]) -> list[str]:
    """Only what the intervals support, per protocol and baseline; incomplete runs say so. One
    string per point (docs/reproduction.md lists them; the JSON's ``verdict`` joins them)."""
    parts = []
    if summary["missing"]:
        parts.append(
            f"The comparison is incomplete: {len(summary['missing'])} stage(s) missing "
            f"({compact_missing(summary['missing'])}); every statement below covers "
            "only the stages that exist."
        )
    if summary.get("checkpoint_notes"):
        parts.append(
            "Some methods' stages ran on a checkpoint trained again on another machine (see "
            "'Checkpoints trained more than once'): paired differences within a stage compare "
            "the same images; a method's figures across stages may not."
        )
    paired = summary["paired"]
    if not paired:
        parts.append(
            "No paired difference can be computed yet (an NCEn form and a baseline "
            "need the same protocol stage), so nothing is concluded."
        )
        return parts
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for row in paired:
        by_protocol = groups.setdefault((row["method"], row["baseline"]), {})
        by_protocol.setdefault(row["protocol"], []).append(row)
    parts.append(
        "Each method is one training (seed 0): the intervals cover the choice of test images, "
        "not the variation between trainings, so each difference below compares two particular "
        "ensembles; whether it holds for other seeds is not measured."
    )
    strong = [r for r in paired if r["protocol"] == "strong"]
    gains = [r for r in paired if r["protocol"] != "strong" and call(r) == "better"]
    if strong:
        kept = [r for r in strong if call(r) == "better"]
        parts.append(
            "Under the strong protocol (per-example worst case) "
            + (
                "an NCEn gain survives in: "
                + "; ".join(strong_pair(r) for r in kept)
                + " (NCEn's and the baseline's accuracy under the per-example worst case: "
                "a gain may still leave little robustness)."
                if kept
                else "no NCEn form is better than any baseline at any ε"
                + (" although some were under the weaker protocols." if gains else ".")
            )
        )
    lost = [r for r in strong if call(r) == "worse"]
    if lost:
        parts.append(
            "Under the strong protocol an NCEn form is worse than a baseline in: "
            + "; ".join(strong_pair(r) for r in lost)
            + "."
        )
    strong_pairs = {(r["method"], r["baseline"]) for r in strong}
    untested = sorted({(r["method"], r["baseline"]) for r in gains} - strong_pairs)
    if untested:
        parts.append(
            "Not yet tested by the strong protocol: "
            + ", ".join(f"{m} vs {b}" for m, b in untested)
            + ". The paper protocol ascends only the members' mean CE; whether a gain under it "
            "survives attacks on the ensemble's output (CE of the combined logits, NLL of the "
            "mean probability, APGD, per-example worst case) is what the strong stage measures, "
            "so no robustness claim follows from these gains alone."
        )
    for (m, b), by_protocol in groups.items():
        parts.append(
            f"{m} − {b}, settings better / worse / inconclusive by the 95 % paired interval: "
            + "; ".join(tally(p, rows) for p, rows in by_protocol.items())
            + "."
        )
    parts += clean_cost(summary) + blackbox_verdict(summary)
    parts += precision_mismatches(paired)
    parts += settling_budget(paired)
    parts += objective_overstatement(summary)
    parts += authors_vs_paper(summary, methods) + diversity_vs_lambda(summary)
    parts += robustness_vs_lambda(summary)
    return parts + same_training_notes(summary)


def clean_cost(summary: dict) -> list[str]:
    """What each NCEn form's clean accuracy (the train stage's, on the full test set) is against
    each baseline's: the difference with an interval that treats the two as independent (the
    train stage records no per-image correctness, so it cannot be paired; the interval is
    therefore wider than a paired one). One point, a clause per NCEn form."""
    entries = distinct_methods(summary)
    scored = {
        m: (round(e["clean_accuracy"] * e["clean_images"]), e["clean_images"])
        for m, e in entries.items()
        if e.get("clean_accuracy") is not None and e.get("clean_images")
    }
    forms = [m for m in scored if is_ncen(m)]
    bases = [m for m in scored if m in BASELINES]
    if not forms or not bases:
        return []

    def against(m: str, b: str) -> str:
        d, lo, hi = unpaired_difference(*scored[m], *scored[b])
        word = "higher" if lo > 0 else "lower" if hi < 0 else "inconclusive"
        return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] against {b} ({word})"

    clauses = [
        f"{m} {entries[m]['clean_accuracy']:.3f}: " + ", ".join(against(m, b) for b in bases)
        for m in forms
    ]
    sizes = sorted({n for _, n in scored.values()})
    return [
        "The price in clean accuracy (the train stage's, on "
        + "/".join(f"{n:,}" for n in sizes)
        + " test images; the baselines: "
        + ", ".join(f"{b} {entries[b]['clean_accuracy']:.3f}" for b in bases)
        + "; 95 % intervals that treat the two as independent, wider than paired ones, since "
        "per-image clean correctness is not recorded): " + "; ".join(clauses) + "."
    ]


def blackbox_verdict(summary: dict) -> list[str]:
    """Whether the strong stage's white-box figures survive a gradient-free attack, per method
    with a blackbox check; the methods with a strong stage but no check are named."""
    entries = distinct_methods(summary)
    checked = {m: e["blackbox"] for m, e in entries.items() if e.get("blackbox")}
    unchecked = [m for m, e in entries.items() if "strong" in e["protocols"] and m not in checked]
    if not checked and not unchecked:
        return []
    how = (
        "The strong protocol is white-box only. Gradient-masking check (Square: score-based "
        "black box, margin loss on the ensemble's logits, on the strong stage's images): "
    )
    if not checked:
        return [how + "not run for any method (`--stages blackbox` runs it)."]
    compared = [
        f"{m} ε={r['eps']:g}: Square leaves {r['square_accuracy']:.3f}, the white-box worst case "
        f"{r['white_box_worst_case']:.3f}, and Square fools {r['fooled_only_by_square']} of the "
        f"{round(r['white_box_worst_case'] * r['n'])} images that survive every white-box attack"
        for m, rows in checked.items()
        for r in rows
        if r["fooled_only_by_square"] is not None
    ]
    masked = [
        f"{m} ε={r['eps']:g} ({r['worst_case_over_both']:.3f} over both, against "
        f"{r['white_box_worst_case']:.3f} white-box)"
        for m, rows in checked.items()
        for r in rows
        if r["fooled_only_by_square"]
    ]
    queries = sorted({r["params"].get("steps") for rows in checked.values() for r in rows} - {None})
    text = how + (f"{', '.join(map(str, queries))} queries; " if queries else "")
    text += "; ".join(compared) if compared else "no strong stage to hold it against"
    if compared:
        text += (
            ". Square found images that every white-box attack missed, so the strong figures "
            "overstate robustness there; the worst case over both: " + "; ".join(masked)
            if masked
            else ". No image survived the white-box attacks only to fall to Square: no sign of "
            "gradient masking at this query budget"
        )
    text += "."
    if unchecked:
        text += (
            f" Not checked: {', '.join(unchecked)} (`--stages blackbox` runs it; a method whose "
            "checkpoint is gone is trained again first)."
        )
    return [text]


def tally(protocol: str, rows: list[dict]) -> str:
    """ "paper 6 / 1 / 1 of 8": one protocol's paired rows counted by their call."""
    calls = [call(r) for r in rows]
    counts = " / ".join(str(calls.count(c)) for c in ("better", "worse", "inconclusive"))
    return f"{protocol} {counts} of {len(rows)}"


def strong_pair(row: dict) -> str:
    """A paired row as the verdict names it: who against whom, ε, difference, both accuracies."""
    return (
        f"{row['method']} vs {row['baseline']} ε={row['eps']:g} ({row['difference']:+.3f}: "
        f"{row['accuracies'][0]:.3f} against {row['accuracies'][1]:.3f})"
    )


def compact_missing(missing: list[str]) -> str:
    """ "baseline: all stages; ncen: strong, inspect" from "METHOD STAGE" items."""
    by_method: dict[str, list[str]] = {}
    for item in missing:
        method, stage = item.rsplit(" ", 1)
        by_method.setdefault(method, []).append(stage)
    return "; ".join(
        f"{m}: {'all stages' if len(s) == len(STAGES) else ', '.join(s)}"
        for m, s in by_method.items()
    )


def mean_accuracy(entries: list[dict]) -> float | None:
    return sum(e["accuracy"] for e in entries) / len(entries) if entries else None


def authors_vs_paper(summary: dict, methods: list[str]) -> list[str]:
    """Per method: what the authors' protocol adds over the paper protocol: its reported
    (conditional) mean accuracy minus the paper protocol's, and in how many settings the paired
    unconditional difference is above / below 0 by its interval."""
    out = []
    for m in methods:
        protocols = summary["methods"][m]["protocols"]
        a = mean_accuracy(protocols.get("authors", []))
        p = mean_accuracy(protocols.get("paper", []))
        if a is None or p is None:
            continue
        rows = [r for r in summary.get("authors_minus_paper", []) if r["method"] == m]
        calls = [call(r) for r in rows]
        out.append(
            f"{m}: the authors' protocol reports {a - p:+.3f} mean accuracy over the "
            f"paper protocol (conditional on clean-correct images); paired on the same "
            f"images it is higher in {calls.count('better')}, lower in "
            f"{calls.count('worse')} and inconclusive in {calls.count('inconclusive')} of "
            f"{len(rows)} settings."
        )
    return out


def settling_budget(paired: list[dict], test_set: int = 10000) -> list[str]:
    """For the inconclusive rows: how many test images would make the interval exclude 0 if
    the observed difference held (n * (half width / |difference|)^2)."""
    needs = []
    for r in paired:
        if call(r) != "inconclusive":
            continue
        half = (r["ci"][1] - r["ci"][0]) / 2
        needs.append(math.inf if r["difference"] == 0 else r["n"] * (half / r["difference"]) ** 2)
    if not needs:
        return []
    within = sorted(n for n in needs if n <= test_set)
    return [
        f"Of the {len(needs)} inconclusive comparisons, {len(within)} would be settled by at "
        f"most {test_set:,} test images if their observed difference held"
        + (f" (largest need: {math.ceil(within[-1]):,} images)" if within else "")
        + (
            f"; the other {len(needs) - len(within)} differ too little for one test set: "
            "they need more seeds (independently trained ensembles), or are no difference."
            if len(within) < len(needs)
            else "."
        )
    ]


def objective_overstatement(summary: dict) -> list[str]:
    """Per method with a strong stage: the settings where attacking the paper's objective (the
    members' mean CE) leaves significantly more accuracy than another objective of the same
    attack (paired interval above 0)."""
    lines = []
    for m in summary["methods"]:
        rows = [r for r in summary.get("objective_gaps", []) if r["method"] == m]
        over = [r for r in rows if call(r) == "better"]
        if not rows:
            continue
        if not over:
            lines.append(
                f"{m}: no other objective of the strong stage leaves significantly less than the "
                f"paper's ({PAPER_OBJECTIVE}) at any setting."
            )
            continue
        lines.append(
            f"{m}: attacking the paper's objective ({PAPER_OBJECTIVE}) overstates the accuracy "
            "left in "
            + "; ".join(
                f"{NAMES.get(r['attack'], r['attack'])} ε={r['eps']:g} by {r['difference']:+.3f} "
                f"({r['accuracies'][0]:.3f} against {r['accuracies'][1]:.3f} under "
                f"{r['objectives'][1]})"
                for r in over
            )
            + "."
        )
    return lines


def robustness_vs_lambda(summary: dict) -> list[str]:
    """The strong protocol's per-example worst case of each larger λ against each smaller λ,
    paired; settings where both leave nothing are left out."""
    if not summary.get("dose_response"):
        return []
    rows = [r for r in summary["dose_response"] if any(r["accuracies"])]
    if not rows:
        return [
            "Dose-response, strong protocol: every λ leaves 0 accuracy at every ε, so λ "
            "changes nothing measurable there."
        ]
    return [
        "Dose-response, strong protocol (per-example worst case, paired on the same images): "
        + "; ".join(
            f"λ={dose_lambda(r['method']):g} − λ={dose_lambda(r['baseline']):g} at "
            f"ε={r['eps']:g}: {r['difference']:+.3f} [{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] "
            f"({r['accuracies'][0]:.3f} against {r['accuracies'][1]:.3f}), {call(r)}"
            for r in rows
        )
        + "; settings where both leave 0 are not listed."
    ]


def diversity_vs_lambda(summary: dict) -> list[str]:
    """Both gradient-diversity figures of inspect (mean pairwise cosine, norm dispersion) for the
    dose-response runs in order of λ, each with its change from the smallest λ. No trend word:
    inspect records no per-image values, so there is no interval, and with one seed the
    variation between trainings is unknown."""
    points = sorted(
        (
            (lam, entry["inspect"])
            for m, entry in summary["methods"].items()
            if (lam := dose_lambda(m)) is not None
            and entry["inspect"].get("mean_gradient_cosine") is not None
        ),
        key=lambda point: point[0],
    )
    if len(points) < 2:
        return []
    base = summary["methods"].get("baseline", {}).get("inspect", {})

    def series(key: str, label: str, spec: str) -> str:
        values = [(lam, figures.get(key)) for lam, figures in points]
        if any(v is None for _, v in values):
            return ""
        (low, first), rest = values[0], values[1:]
        text = ", ".join(f"λ={lam:g}: {v:{spec}}" for lam, v in values)
        change = ", ".join(f"{v - first:+.3f} at λ={lam:g}" for lam, v in rest)
        ref = f"; baseline {base[key]:{spec}}" if base.get(key) is not None else ""
        return f"{label} {text} (change from λ={low:g}: {change}{ref})"

    parts = [
        series(
            "mean_gradient_cosine", "mean pairwise gradient cosine (lower is more diverse)", "+.3f"
        ),
        series("norm_dispersion", "norm dispersion", ".3f"),
    ]
    return [
        "Gradient diversity with λ (inspect, one training per λ, no interval: whether a change "
        "exceeds the variation between trainings is not measured): "
        + "; ".join(p for p in parts if p)
        + "."
    ]


# --- markdown (docs/reproduction.md) -----------------------------------------------------------


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def setting(entry: dict) -> str:
    name = NAMES.get(entry["attack"], entry["attack"])
    objective = entry.get("objective")
    return f"{name} ({objective})" if objective and entry["attack"] != WORST else name


def protocol_table(summary: dict, protocol: str) -> list[str]:
    """Each method's headline accuracy per setting of one protocol, a column per method."""
    entries = {
        m: e["protocols"][protocol]
        for m, e in distinct_methods(summary).items()
        if protocol in e["protocols"]
    }
    return accuracy_table(entries, f"(no {protocol} stage yet)")


def accuracy_table(entries_by_method: dict[str, list[dict]], empty: str) -> list[str]:
    """Report entries as a table: a row per (setting, eps), a column per method."""
    methods = list(entries_by_method)
    if not methods:
        return [empty]
    keys: list[tuple] = []
    cells: dict[tuple, dict[str, str]] = {}
    for m in methods:
        for e in entries_by_method[m]:
            key = (setting(e), round(e["eps"], 4))
            if key not in cells:
                keys.append(key)
                cells[key] = {}
            half = (e["ci"][1] - e["ci"][0]) / 2
            cells[key][m] = f"{e['accuracy']:.3f} ±{half:.3f} (n={e['n']})"
    lines = ["| attack | ε | " + " | ".join(methods) + " |", "|" + " --- |" * (2 + len(methods))]
    for key in keys:
        lines.append(
            f"| {key[0]} | {key[1]:g} | "
            + " | ".join(cells[key].get(m, "–") for m in methods)
            + " |"
        )
    return lines


def paired_cells(row: dict) -> str:
    """A paired row's table cells: difference | 95 % interval | both accuracies | n."""
    return (
        f"{row['difference']:+.3f} | [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}] | "
        f"{row['accuracies'][0]:.3f} / {row['accuracies'][1]:.3f} | {row['n']}"
    )


def objective_gap_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no strong stage yet)"]
    return [
        "| method | attack | ε | objectives | difference | 95 % interval | accuracies | n |",
        "|" + " --- |" * 8,
    ] + [
        f"| {r['method']} | {NAMES.get(r['attack'], r['attack'])} | {r['eps']:g} | "
        f"{r['objectives'][0]} − {r['objectives'][1]} | {paired_cells(r)} |"
        for r in rows
    ]


def paired_table(summary: dict) -> list[str]:
    if not summary["paired"]:
        return [
            "(no paired difference yet: it needs an NCEn form and a baseline with the same "
            "protocol stage)"
        ]
    lines = [
        "| protocol | NCEn form | baseline | attack | ε | difference | 95 % interval | n | call |",
        "|" + " --- |" * 9,
    ]
    for r in summary["paired"]:
        lines.append(
            f"| {r['protocol']} | {r['method']} | {r['baseline']} | {setting(r)} | "
            f"{r['eps']:g} | {r['difference']:+.3f} | [{r['ci'][0]:+.3f}, "
            f"{r['ci'][1]:+.3f}] | {r['n']} | {call(r)} |"
        )
    return lines


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def overview_table(summary: dict) -> list[str]:
    lines = [
        "| method | clean accuracy (10,000 test images) | training time | mean gradient "
        "cosine | norm dispersion | PGD transfer gap |",
        "|" + " --- |" * 6,
    ]
    for m, e in summary["methods"].items():
        seconds = e.get("train_seconds")
        gap = e["transfer"].get("pgd", {}).get("gap")
        lines.append(
            f"| {display_name(m, e)} | {fmt(e['clean_accuracy'])} | "
            f"{duration(seconds)} | "
            f"{fmt(e['inspect'].get('mean_gradient_cosine'), '+.3f')} | "
            f"{fmt(e['inspect'].get('norm_dispersion'))} | {fmt(gap, '+.3f')} |"
        )
    return lines


def transfer_table(summary: dict) -> list[str]:
    lines = [
        "| method | attack | mean diagonal (white-box) | mean off-diagonal (transfer) | gap | "
        "ensemble column |",
        "|" + " --- |" * 6,
    ]
    for m, e in distinct_methods(summary).items():
        for attack, s in e["transfer"].items():
            lines.append(
                f"| {m} | {NAMES.get(attack, attack)} | {fmt(s.get('mean_diagonal'))} | "
                f"{fmt(s.get('mean_off_diagonal'))} | {fmt(s.get('gap'), '+.3f')} | "
                f"{fmt(s.get('ensemble_mean'))} |"
            )
    return lines if len(lines) > 2 else ["(no transfer stage yet)"]


def dose_table(summary: dict) -> list[str]:
    """A row per ``ncen@λ`` in order of λ: clean accuracy, the inspect figures and the strong
    protocol's per-example worst case per ε; then each larger λ against each smaller one, paired."""
    doses = sorted(
        (lam, m, e) for m, e in summary["methods"].items() if (lam := dose_lambda(m)) is not None
    )
    if not doses:
        return ["(no dose-response method in this report)"]
    eps = sorted({w["eps"] for _, _, e in doses for w in e["protocols"].get("strong", [])})
    header = ["λ", "method", "clean accuracy", "mean gradient cosine", "norm dispersion"]
    header += [f"strong worst case ε={x:g}" for x in eps]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for lam, m, e in doses:
        worst = {w["eps"]: w["accuracy"] for w in e["protocols"].get("strong", [])}
        cells = [
            f"{lam:g}",
            display_name(m, e),
            fmt(e["clean_accuracy"]),
            fmt(e["inspect"].get("mean_gradient_cosine"), "+.3f"),
            fmt(e["inspect"].get("norm_dispersion")),
            *(fmt(worst.get(x)) for x in eps),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rows = summary.get("dose_response", [])
    if rows:
        lines += [
            "",
            "Each larger λ minus each smaller one, strong protocol, paired on the same images:",
            "",
            "| λ | against λ | ε | difference | 95 % interval | accuracies | n | call |",
            "|" + " --- |" * 8,
        ] + [
            f"| {dose_lambda(r['method']):g} | {dose_lambda(r['baseline']):g} | {r['eps']:g} | "
            f"{paired_cells(r)} | {call(r)} |"
            for r in rows
        ]
    return lines


def blackbox_table(summary: dict) -> list[str]:
    """A row per method and ε of its black-box check (:func:`blackbox_rows`)."""
    lines = [
        "| method | attack | queries | ε | black box alone | white-box worst case | survive "
        "every white-box attack, fooled by the black box | worst case over both (95 % "
        "interval) | n |",
        "|" + " --- |" * 9,
    ]
    for m, e in distinct_methods(summary).items():
        for r in e.get("blackbox", []):
            over = r["worst_case_over_both"]
            both = "–" if over is None else f"{over:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
            fooled = r["fooled_only_by_square"]
            lines.append(
                f"| {m} | {NAMES.get(r['attack'], r['attack'])} | "
                f"{r['params'].get('steps', '–')} | {r['eps']:g} | {r['square_accuracy']:.3f} | "
                f"{fmt(r['white_box_worst_case'])} | {'–' if fooled is None else fooled} | "
                f"{both} | {r['n']} |"
            )
    return lines if len(lines) > 2 else ["(no blackbox check yet: `--stages blackbox` runs it)"]


def missing_table(missing: list[str]) -> list[str]:
    by_method: dict[str, list[str]] = {}
    for item in missing:
        method, stage = item.rsplit(" ", 1)
        by_method.setdefault(method, []).append(stage)
    return ["| method | stages without a result file |", "| --- | --- |"] + [
        f"| {m} | {', '.join(stages)} |" for m, stages in by_method.items()
    ]


def render_markdown(summary: dict, preamble: list[str]) -> str:
    """docs/reproduction.md from a summary; ``preamble`` is the budget and commands section."""
    missing = summary["missing"]
    text = [
        "# Reproduction: BL, GAL, GPMR and NCEn on real FashionMNIST",
        "",
        "Generated by `python benchmarks/reproduce.py --report-only` from the result files under",
        f"`{summary['budget'].get('results', 'the results folder')}` (one small JSON per finished "
        "stage); do not edit by hand.",
        "",
        *preamble,
        "",
        "## Verdict",
        "",
        *(f"- {point}" for point in summary["verdict_points"]),
        "",
        "## Methods",
        "",
        *overview_table(summary),
        "",
    ]
    if summary.get("checkpoint_notes") or summary.get("reproduced_notes"):
        text += [
            "## Checkpoints trained more than once",
            "",
            "A method's stages normally run on one checkpoint. Where a later session had to train "
            "it again (same seed and budget, another machine or precision), its stages ran on "
            "different trainings: comparisons between methods within one stage stay paired on "
            "the same images, but one method's figures across these stages compare different "
            "trainings. A retraining whose per-epoch record equals the train stage's bit for "
            "bit reproduced that run, and counts as the same training.",
            "",
            *summary.get("checkpoint_notes", []),
            *summary.get("reproduced_notes", []),
            "",
        ]
    for protocol, title in (
        ("paper", "Paper protocol (Table II settings, mean-CE objective)"),
        (
            "authors",
            "The authors' protocol (their released evaluation: "
            "conditional accuracy, BatchNorm in train mode)",
        ),
        ("strong", "Strong protocol: per-example worst case per ε"),
    ):
        text += [f"## {title}", "", *protocol_table(summary, protocol), ""]
    text += [
        "## Strong protocol: every attack and objective",
        "",
        "The runs the per-example worst case is taken over (mean-ce: the members' mean CE, the "
        "paper's objective; prob: NLL of the ensemble's mean probability; dlr: APGD's "
        "difference-of-logits ratio).",
        "",
        *accuracy_table(
            {
                m: e["strong_attacks"]
                for m, e in distinct_methods(summary).items()
                if e["strong_attacks"]
            },
            "(no strong stage yet)",
        ),
        "",
        "## Gradient-masking check: a black-box attack against the white-box worst case",
        "",
        "Square (score-based random search; margin loss on the ensemble's logits; it never "
        "sees a gradient) on the strong stage's images, held image by image against the strong "
        "stage's per-example worst case. An image that survives every white-box attack but not "
        "Square points to gradient masking; the worst case over both is then the honest figure. "
        "A supplementary stage (`--stages blackbox`), not listed as missing where it did not run.",
        "",
        *blackbox_table(summary),
        "",
        "## The attack objective (strong stage: the paper's objective − each other, paired)",
        "",
        "A positive difference: attacking the members' mean CE leaves more accuracy than "
        "attacking the other objective, on the same images (Newcombe's 95 % interval).",
        "",
        *objective_gap_table(summary.get("objective_gaps", [])),
        "",
    ]
    text += [
        "## Dose-response (ncen, λ_cos = λ_norm = λ)",
        "",
        "Whether gradient diversity (inspect: a lower mean pairwise cosine is more diverse) and "
        "strong-protocol accuracy move with λ; one training per λ.",
        "",
        *dose_table(summary),
        "",
    ]
    gap = summary.get("authors_minus_paper", [])
    text += [
        "## What the authors' protocol adds (authors − paper, paired, same images)",
        "",
        "Unconditional correctness under both (an image counts if it is classified "
        "correctly clean and after the attack), Newcombe's 95 % interval.",
        "",
    ]
    text += (
        ["| method | attack | ε | difference | 95 % interval | n |", "|" + " --- |" * 6]
        + [
            f"| {r['method']} | {setting(r)} | {r['eps']:g} | {r['difference']:+.3f} | "
            f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | {r['n']} |"
            for r in gap
        ]
        if gap
        else ["(needs a method's paper and authors stages)"]
    ) + [""]
    text += [
        "## Transferability between members (Ensemble1, ε = 0.05)",
        "",
        "Accuracy of member j on examples crafted on member i; the gap is the mean "
        "off-diagonal minus the mean diagonal (a larger gap: examples crafted on one member "
        "transfer less to the others).",
        "",
        *transfer_table(summary),
        "",
    ]
    text += [
        "## Paired differences (NCEn form − baseline, same test images)",
        "",
        "Newcombe's interval (method 10) for the difference of paired proportions, 95 %. "
        "*better* / *worse*: the interval excludes 0; *inconclusive*: it does not. The authors' "
        "protocol is paired on unconditional correctness (correct on the clean image and after "
        "the attack, over all n images), since its own accuracy is conditional on a per-method "
        "subset.",
        "",
        *paired_table(summary),
        "",
        "## Missing stages",
        "",
        *(missing_table(missing) if missing else ["None: every stage has a result file."]),
        "",
    ]
    return "\n".join(text)

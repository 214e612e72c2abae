"""The plugin contracts' callable types (Protocols and Callable aliases) let mypy check plugin
code: callables that follow docs/plugins.md pass, and each kind of mistake in one is reported
against its type."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[1]  # the repository (its pyproject.toml: [tool.mypy])
IMPORTS = """\
    from pathlib import Path

    import torch

    from ncen_cli.archs.base import Architecture
    from ncen_cli.attacks.base import Attack, AttackSettings, AttackTarget, RunInput
    from ncen_cli.data.base import DatasetSpec, ImageArrays
    from ncen_cli.defenses.base import CraftContext, Defense, DefenseInputs
    from ncen_cli.ensemble import Ensemble
"""

# every callable written as docs/plugins.md describes (names, keyword hyperparameters, lambdas)
GOOD = """\
    def terms(inputs: DefenseInputs, *, lam: float) -> dict[str, torch.Tensor]:
        return {"t": lam * inputs.logits.square().mean()}


    def crafter(
        ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, context: CraftContext, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y


    def run(job: RunInput) -> torch.Tensor:
        return job.x


    def load(folder: Path | None, download: bool) -> ImageArrays:
        raise NotImplementedError


    D1 = Defense("a", "s", {}, terms, member_inputs=crafter, check=lambda values: None)
    D2 = Defense("b", "s", {}, lambda inputs, **values: {})
    A = Attack("c", "s", run, lambda eps: {"steps": 10})
    S = DatasetSpec("d", "s", load)
    R = Architecture("e", "s", lambda shape, n, activation: torch.nn.Identity())
"""

# one mistake per contract: (line of the call, the type mypy must name); the attack's is a run
# written with the five positional arguments of the single run before RunInput
BAD = """\
    def terms_of_grads(grads: torch.Tensor, *, lam: float) -> dict[str, torch.Tensor]:
        return {}


    def terms_as_tensor(inputs: DefenseInputs, *, lam: float) -> torch.Tensor:
        return inputs.logits.sum()


    def crafter(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x


    def run(
        target: AttackTarget,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: AttackSettings,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return x


    def load(data_dir: str, download: bool) -> ImageArrays:
        raise NotImplementedError


    def build(input_shape: tuple[int, int, int], num_classes: int) -> torch.nn.Module:
        return torch.nn.Identity()


    def check_nothing() -> None:
        pass


    D1 = Defense("a", "s", {}, terms_of_grads)  # LossTerms
    D2 = Defense("b", "s", {}, terms_as_tensor)  # LossTerms
    D3 = Defense("c", "s", {}, lambda inputs: {}, member_inputs=crafter)  # MemberInputs
    D4 = Defense("d", "s", {}, lambda i: {}, check=check_nothing)  # Callable[[dict[str, float]]
    A = Attack("e", "s", run, lambda eps: {})  # Callable[[RunInput], Tensor]
    S = DatasetSpec("f", "s", load)  # DatasetLoader
    R = Architecture("g", "s", build)  # ArchitectureBuilder
"""


def _source(body: str) -> str:
    return textwrap.dedent(IMPORTS) + "\n\n" + textwrap.dedent(body)


def _mypy(tmp_path: Path) -> str:
    for name, body in (("good_plugin", GOOD), ("bad_plugin", BAD)):
        (tmp_path / f"{name}.py").write_text(_source(body), encoding="utf-8")
    stdout, stderr, _ = mypy_api.run(
        [
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--hide-error-context",
            "--no-pretty",
            str(tmp_path / "good_plugin.py"),
            str(tmp_path / "bad_plugin.py"),
        ]
    )
    return stdout + stderr


@pytest.mark.slow
def test_mypy_checks_plugin_callables_against_their_types(tmp_path: Path) -> None:
    output = _mypy(tmp_path)
    assert "good_plugin.py" not in output, output
    bad_lines = _source(BAD).splitlines()
    expected = {
        i + 1: line.rsplit("# ", 1)[1] for i, line in enumerate(bad_lines) if "  # " in line
    }
    reported: dict[int, list[str]] = {}
    for line in output.splitlines():
        found = re.match(r".*bad_plugin\.py:(\d+): error: (.*)", line)
        if found:
            reported.setdefault(int(found[1]), []).append(found[2])
    assert set(reported) == set(expected), output
    for number, protocol in expected.items():
        assert [f'expected "{protocol}' in message for message in reported[number]] == [True], (
            number,
            reported[number],
        )

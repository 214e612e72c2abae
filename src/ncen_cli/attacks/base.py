"""The attack contract (plugin API version 3) and the ensemble attack objectives.

An attack is an :class:`Attack` that implements one *single run*: ``run(job) -> x_adv``, where
``job`` is a :class:`RunInput` (the target, the images ``job.x``, the labels ``job.y``, the
settings and the random generator). The framework's runner (:meth:`Attack.perturb`) does
everything around it, once for every attack, and builds one ``RunInput`` per run:

1. validates the settings (:meth:`AttackSettings.check`, the attack's objective and options);
2. converts the images to float32 in [0, 1] (:func:`as_float`);
3. freezes the target's parameters (``requires_grad`` off, restored after) and enables gradients,
   so a white-box run differentiates the input only, also when called under ``torch.no_grad``;
4. repeats the run ``settings.restarts`` times, counted worst-case per example
   (:func:`worst_case_restarts`: an example counts as robust only if it survives every restart);
5. guards the result: ``NcenError`` unless every image lies in the L-infinity ball of radius
   ``settings.eps`` around ``x`` and in [0, 1].

``target`` is anything with ``member_logits`` and ``combine_logits`` (an
:class:`~ncen_cli.ensemble.Ensemble`, or one member wrapped in :class:`MemberTarget`); it is in eval
mode, and attacks must not change its parameters or mode.

Example::

    from ncen_cli.attacks.pgd import PGD
    settings = PGD.settings_for(0.1, restarts=2)
    x_adv = PGD.perturb(ensemble, x, y, settings, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ncen_cli.errors import NcenError, UsageError

OBJECTIVES = ("mean-ce", "logits", "prob")
"""The ensemble objectives a white-box attack can ascend (``--objective``). An attack with its own
fixed loss declares that loss's name as :attr:`Attack.own_loss` instead (APGD-DLR's ``dlr``,
Square's ``margin``); that name is what its settings and reports carry as the objective."""

BALL_TOLERANCE = 1e-5  # float32 slack of the eps-ball guard


class AttackTarget(Protocol):
    """What an attack may call. Shapes: x (B, C, H, W) in [0, 1]."""

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (k, B, num_classes): every member run exactly once."""
        ...

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(k, B, num_classes) -> (B, num_classes) combined logits used for the prediction."""
        ...


class MemberTarget(nn.Module):
    """One member as a 1-member target (for transfer attacks crafted on a single member)."""

    def __init__(self, member: nn.Module) -> None:
        super().__init__()
        self.member = member

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(x).unsqueeze(0)

    def combine_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member(x)


def objective_loss(
    target: AttackTarget, x: torch.Tensor, y: torch.Tensor, objective: str = "mean-ce"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample loss an attack ascends, and the combined logits (for predictions).

    Objectives:
        ``mean-ce``: (1/k) sum_i CE(f_i(x), y) (the paper's attack objective; default).
        ``logits``: CE of the combined logits.
        ``prob``: NLL of the mean of the members' softmax probabilities.
    Returns:
        loss (B,), combined logits (B, num_classes). Each member runs once.
    """
    logits = target.member_logits(x)  # (k, B, C)
    combined = target.combine_logits(logits)
    if objective == "mean-ce":
        k = logits.shape[0]
        loss = (
            F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, -1).mean(0)
        )
    elif objective == "logits":
        loss = F.cross_entropy(combined, y, reduction="none")
    elif objective == "prob":
        log_mean_prob = torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - torch.log(
            torch.tensor(float(logits.shape[0]), device=logits.device)
        )
        loss = F.nll_loss(log_mean_prob, y, reduction="none")
    else:
        raise ValueError(f"unknown objective '{objective}'; choose one of {OBJECTIVES}")
    return loss, combined


@dataclass(frozen=True)
class AttackSettings:
    """Every setting of one attack run (all reported with its result).

    Attributes:
        eps: L-infinity radius, in (0, 1].
        steps: iterations (1: a single-step attack such as FGSM).
        step_size: per-step size (alpha); None: the attack's default for ``eps``.
        restarts: independent random starts, counted worst-case per example (>= 1).
        random_start: start from a uniform point in the ball.
        decay: momentum decay (MI-FGSM).
        objective: one of :data:`OBJECTIVES`, or the attack's :attr:`Attack.own_loss`.
        extra: values of the attack's declared :attr:`Attack.options` (e.g. Square's ``p_init``);
            only the values set here are reported.
    """

    eps: float
    steps: int = 1
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = False
    decay: float = 1.0
    objective: str = "mean-ce"
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, attack: str = "") -> None:
        """UsageError (one line, naming ``attack`` when given) for settings no attack can run
        with: eps outside (0, 1], steps or restarts below 1, a step size that is not > 0."""
        where = f" ({attack})" if attack else ""
        if not 0 < self.eps <= 1:
            raise UsageError(f"eps must be in (0, 1] for images in [0, 1], got {self.eps}{where}")
        if self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}{where}")
        if self.restarts < 1:
            raise UsageError(f"--restarts must be >= 1, got {self.restarts}{where}")
        if self.step_size is not None and not self.step_size > 0:
            raise UsageError(f"--step-size must be > 0, got {self.step_size}{where}")


@dataclass(frozen=True)
class AttackOption:
    """A typed attack-specific setting, stored in ``AttackSettings.extra[name]`` and settable from
    the command line with ``-o name=value``.

    Attributes:
        default: the value used when the settings do not give one (not reported then).
        help: one line for ``ncen plugins`` and docs.
        type: ``float``, ``int``, ``bool`` or ``str``.
        choices: allowed values (for ``str`` options), or None.
        minimum / maximum: inclusive bounds for numeric options, or None.
    """

    default: Any
    help: str
    type: type = float
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def parse(self, name: str, text: str) -> Any:
        """The value of ``-o name=text``; UsageError (one line) if it does not parse."""
        try:
            if self.type is bool:
                lowered = text.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(text)
                value: Any = lowered in ("1", "true", "yes")
            else:
                value = self.type(text.strip())
        except ValueError:
            raise UsageError(f"-o {name}={text}: not a {self.type.__name__}") from None
        self.check(name, value)
        return value

    def check(self, name: str, value: Any) -> None:
        """UsageError unless ``value`` is an allowed value of this option."""
        if self.type is not bool and isinstance(value, bool) or not _is_a(value, self.type):
            raise UsageError(f"attack option {name}={value!r}: not a {self.type.__name__}")
        if self.choices is not None and value not in self.choices:
            raise UsageError(
                f"attack option {name}={value!r}; choose one of {', '.join(self.choices)}"
            )
        if self.minimum is not None and not value >= self.minimum:
            raise UsageError(f"attack option {name} must be >= {self.minimum:g}, got {value}")
        if self.maximum is not None and not value <= self.maximum:
            raise UsageError(f"attack option {name} must be <= {self.maximum:g}, got {value}")


def _is_a(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity (tensors have no bool ==)
class RunInput:
    """Everything one single run of an attack works on (the argument of :data:`SingleRun`).

    The runner (:meth:`Attack.perturb`) builds one per run: for the first run on the whole batch,
    for each later restart on the examples still classified correctly. The run is called with
    gradients enabled and the target's parameters frozen (``requires_grad`` off), so it
    differentiates the input only; it must not change the target's parameters or mode.

    Attributes:
        target: the model under attack (``member_logits``, ``combine_logits``), in eval mode.
        x: float32 clean images (B, C, H, W) in [0, 1].
        y: their labels (B,), class indices.
        settings: the validated settings of this attack run (eps, steps, step size, options).
        generator: the only source of randomness of the run (None: torch's global generator);
            possibly on the target's device.

    The run returns x_adv (B, C, H, W), float32, within ``settings.eps`` of ``x`` in L-infinity
    and in [0, 1] (the runner refuses anything else).
    """

    target: AttackTarget
    x: torch.Tensor
    y: torch.Tensor
    settings: AttackSettings
    generator: torch.Generator | None


SingleRun = Callable[[RunInput], torch.Tensor]
"""An attack's single run (:attr:`Attack.run`): ``run(job: RunInput) -> x_adv``, x_adv (B, C, H, W)
float32 within ``job.settings.eps`` of ``job.x`` and in [0, 1] (see :class:`RunInput`)."""


AttackDefaults = Callable[[float], dict[str, Any]]
"""``defaults(eps) -> dict`` of :class:`AttackSettings` fields (:attr:`Attack.defaults`)."""


@dataclass(frozen=True, init=False, eq=False)  # eq=False: hashable (options is a dict)
class Attack:
    """A registered attack: its single run plus what the framework needs to drive it.

    Attributes:
        name: registry name (``--attacks NAME``); equal to its entry-point name.
        summary: one line for ``ncen plugins``.
        run: the single run (:data:`SingleRun`); the runner (:meth:`perturb`) does validation,
            float conversion, frozen parameters, worst-case restarts and the eps-ball guard.
        defaults: ``defaults(eps) -> dict`` of AttackSettings fields used when the user gives none
            (without ``objective``: see :meth:`settings_for`).
        white_box: whether it uses gradients (False for score-based black-box attacks).
        options: attack-specific settings by name (``AttackSettings.extra``; ``-o name=value``).
        own_loss: None when the attack ascends ``settings.objective`` (one of
            :data:`OBJECTIVES`); else the name of its own fixed loss (``--objective`` does not
            apply, and its settings carry this name as their objective).
    """

    name: str
    summary: str
    run: SingleRun
    defaults: AttackDefaults
    white_box: bool = True
    options: Mapping[str, AttackOption] = field(default_factory=dict)
    own_loss: str | None = None

    def __init__(
        self,
        name: str,
        summary: str,
        run: SingleRun | None = None,
        defaults: AttackDefaults | None = None,
        white_box: bool = True,
        options: Mapping[str, AttackOption] | None = None,
        own_loss: str | None = None,
        *,
        perturb: Any = None,
    ) -> None:
        if perturb is not None or run is None or defaults is None:
            raise TypeError(
                f"attack '{name}' is written for ncen plugin API 2 (Attack(perturb=...)); API 3 "
                "takes run=, the single run, and defaults= (see docs/plugins.md)"
            )
        values = {
            "name": name,
            "summary": summary,
            "run": run,
            "defaults": defaults,
            "white_box": white_box,
            "options": dict(options or {}),
            "own_loss": own_loss,
        }
        for key, value in values.items():
            object.__setattr__(self, key, value)

    @property
    def uses_objective(self) -> bool:
        """Whether ``settings.objective`` (one of :data:`OBJECTIVES`) chooses what it ascends."""
        return self.own_loss is None

    def option(self, settings: AttackSettings, name: str) -> Any:
        """The value of declared option ``name``: ``settings.extra[name]`` or its default."""
        return settings.extra.get(name, self.options[name].default)

    def settings_for(
        self, eps: float, objective: str = "mean-ce", **overrides: Any
    ) -> AttackSettings:
        """The attack's default settings at ``eps`` on ``objective`` (its :attr:`own_loss`
        instead, if it has one), with ``overrides`` applied (None values ignored)."""
        values: dict[str, Any] = {**self.defaults(eps)}
        values["objective"] = self.own_loss or objective
        values.update({k: v for k, v in overrides.items() if v is not None})
        return AttackSettings(eps=eps, **values)

    def with_options(self, settings: AttackSettings, texts: Mapping[str, str]) -> AttackSettings:
        """``settings`` with the declared options among ``texts`` (name -> ``-o`` value text)
        parsed into ``extra``; names this attack does not declare are left out."""
        parsed = {n: self.options[n].parse(n, t) for n, t in texts.items() if n in self.options}
        return replace(settings, extra={**settings.extra, **parsed}) if parsed else settings

    def check(self, settings: AttackSettings) -> None:
        """UsageError (one line) for settings this attack cannot run with."""
        settings.check(self.name)
        if self.uses_objective and settings.objective not in OBJECTIVES:
            raise UsageError(
                f"unknown objective '{settings.objective}' for {self.name}; "
                f"choose {', '.join(OBJECTIVES)}"
            )
        for name, option in self.options.items():
            if name in settings.extra:
                option.check(name, settings.extra[name])

    def perturb(
        self,
        target: AttackTarget,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: AttackSettings,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Adversarial images for x (B, C, H, W) (uint8, or float in [0, 1]) and labels y (B,):
        float32 (B, C, H, W) within ``settings.eps`` (L-infinity) of x and in [0, 1]. Runs
        :attr:`run` ``settings.restarts`` times on a :class:`RunInput` each, counted worst-case per
        example, with frozen parameters (see the module docstring)."""
        self.check(settings)
        x = as_float(x)

        def run_once(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            job = RunInput(target=target, x=xs, y=ys, settings=settings, generator=generator)
            return self.run(job)

        with frozen_parameters(target), torch.enable_grad():
            x_adv = worst_case_restarts(target, x, y, settings.restarts, run_once)
        _guard(self.name, x_adv, x, settings.eps)
        return x_adv


def as_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (0-255) -> float32 in [0, 1]; float images -> a detached float32 copy.
    (N, C, H, W) -> (N, C, H, W). The one uint8-to-float conversion of the attack side."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.detach().to(torch.float32).clone()


def _guard(name: str, x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    """NcenError unless x_adv (B, C, H, W) lies within ``eps`` of x and in [0, 1]."""
    if x_adv.shape != x.shape:
        raise NcenError(
            f"attack {name} returned shape {tuple(x_adv.shape)} for images of shape "
            f"{tuple(x.shape)}"
        )
    if not len(x):
        return
    linf = (x_adv.detach() - x).abs().amax().item()
    if not (linf <= eps + BALL_TOLERANCE and x_adv.min() >= 0 and x_adv.max() <= 1):
        raise NcenError(f"attack {name} left the eps ball or [0, 1] (|delta| = {linf:.4g})")


@contextmanager
def frozen_parameters(target: object) -> Iterator[None]:
    """Mark the target's parameters ``requires_grad=False`` for the duration (restored after), so
    backward passes compute input gradients only."""
    params = []
    if isinstance(target, nn.Module):
        params = [p for p in target.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@torch.no_grad()
def predict(target: AttackTarget, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes (B,) of the combined logits."""
    return target.combine_logits(target.member_logits(x)).argmax(-1)


def worst_case_restarts(
    target: AttackTarget,
    x: torch.Tensor,
    y: torch.Tensor,
    restarts: int,
    run_once: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run an attack ``restarts`` times, counted worst-case per example.

    An example counts as robust only if it survives every restart: after each run, the examples
    still classified correctly are attacked again (a fresh random start), and any restart that fools
    the target replaces that example's adversarial image. Examples fooled earlier keep the image
    that fooled them.

    Args:
        x: (B, C, H, W) clean images; y: (B,) labels.
        run_once: ``run_once(x_subset, y_subset) -> x_adv_subset`` (one run, its own randomness).
    Returns:
        (B, C, H, W) adversarial images.
    """
    x_adv = run_once(x, y)
    if restarts <= 1:
        return x_adv
    robust = predict(target, x_adv) == y
    for _ in range(restarts - 1):
        idx = robust.nonzero().flatten()
        if idx.numel() == 0:
            break
        candidate = run_once(x[idx], y[idx])
        fooled = predict(target, candidate) != y[idx]
        x_adv[idx[fooled]] = candidate[fooled]
        robust[idx[fooled]] = False
    return x_adv


def run_options(texts: list[str] | None) -> dict[str, str]:
    """``-o name=value`` texts -> {name: value text}; UsageError for a malformed or repeated
    name."""
    out: dict[str, str] = {}
    for text in texts or []:
        name, sep, value = text.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name or not value.strip():
            raise UsageError(f"-o {text}: write -o name=value (e.g. -o p_init=0.5)")
        if name in out:
            raise UsageError(f"-o {name} given twice")
        out[name] = value
    return out


def with_attack_options(
    runs: list[tuple[str, AttackSettings]], texts: list[str] | None
) -> list[AttackSettings]:
    """The settings of ``runs`` ((attack registry name, settings) pairs) with the ``-o
    name=value`` options in ``texts`` set on every run whose attack declares them. UsageError
    (one line) for an option that no attack of ``runs`` declares."""
    from ncen_cli.registry import ATTACKS

    options = run_options(texts)
    if not options:
        return [settings for _, settings in runs]
    out, declared = [], {}
    for name, settings in runs:
        attack: Attack = ATTACKS.get(name)
        declared.update({n: attack.name for n in attack.options})
        out.append(attack.with_options(settings, options))
    unknown = [n for n in options if n not in declared]
    if unknown:
        have = ", ".join(f"{n} ({a})" for n, a in declared.items()) or "none"
        raise UsageError(f"-o {unknown[0]}: no attack of this run has that option; options: {have}")
    return out

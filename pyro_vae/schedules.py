"""Schedules: objects that :func:`pyro_vae.fit` calls after every optimizer step (``on_step(state)``,
its callbacks protocol) to set a training knob from the step count.

Temperature schedules set ``vae.encoder.temperature`` of a relaxed categorical latent (the VAE's built-in
categorical prior reads the same value); KL schedules set ``vae.beta``, which the model and guide apply to
the latent site with ``poutine.scale``. Each schedule's ``value(step)`` is a pure function of the step, so
a resumed run continues where it left off. Use them with plain ``SVI`` too: set the attribute from
``value(step)`` in your own loop.

    >>> tau = ExponentialTemperature(1.0, rate=3e-5, minimum=0.5)   # Jang et al. (2017)
    >>> warmup = KLWarmup(steps=10_000)                              # Sønderby et al. (2016)
    >>> fit(vae, x, callbacks=[tau, warmup])
"""

from __future__ import annotations

import math
from typing import Any

from pyro_vae.errors import ConfigError, message
from pyro_vae.validation import beta as check_beta
from pyro_vae.validation import integer, number

__all__ = ["Schedule", "ConstantTemperature", "ExponentialTemperature", "ConstantBeta", "KLWarmup"]


class Schedule:
    """Base class: ``value(step)`` gives the setting after ``step`` optimizer steps; ``apply(vae, step)``
    writes it; ``on_step(state)`` (called by :func:`~pyro_vae.fit` after each step) applies it for the
    next step; ``on_fit_start(state)`` (called by :func:`~pyro_vae.fit` before the first step, also when
    resuming) applies ``value(state.step)``."""

    def value(self, step: int) -> float:  # pragma: no cover - abstract
        """The setting after ``step`` optimizer steps (a pure function of ``step``)."""
        raise NotImplementedError

    def apply(self, vae: Any, step: int) -> float:  # pragma: no cover - abstract
        """Write ``value(step)`` into ``vae`` and return it."""
        raise NotImplementedError

    def on_fit_start(self, state: Any) -> None:
        """Apply the setting of ``state.step`` before the first step (of a new or a resumed run)."""
        self.apply(state.vae, state.step)

    def on_step(self, state: Any) -> None:
        """Apply the setting of ``state.step`` for the next step."""
        self.apply(state.vae, state.step)


class _TemperatureSchedule(Schedule):
    def apply(self, vae: Any, step: int) -> float:
        encoder = getattr(vae, "encoder", vae)
        if not hasattr(encoder, "temperature"):
            raise ConfigError(message("temperature schedule", "a VAE whose encoder has a temperature "
                                      '(latent="categorical")', f"encoder {type(encoder).__name__}",
                                      'build the VAE with latent="categorical" or drop the schedule'))
        tau = self.value(step)
        encoder.temperature = tau
        return tau


class ConstantTemperature(_TemperatureSchedule):
    """A fixed relaxation temperature."""

    def __init__(self, temperature: float) -> None:
        self.temperature = number("temperature", temperature, 0.0)

    def value(self, step: int) -> float:
        return self.temperature

    def __repr__(self) -> str:
        return f"ConstantTemperature({self.temperature:g})"


class ExponentialTemperature(_TemperatureSchedule):
    """``tau = max(minimum, initial * exp(-rate * step))`` (Jang et al. 2017, Sec. 4), recomputed every
    ``every`` steps (Jang et al. update every 1000 steps; 1 anneals smoothly).

    Args:
        initial: temperature at step 0 (> 0).
        rate: decay rate per step (>= 0), e.g. ``3e-5``.
        minimum: floor (> 0), e.g. ``0.5``.
        every: update period in steps.
    """

    def __init__(self, initial: float = 1.0, rate: float = 3e-5, minimum: float = 0.5, every: int = 1) -> None:
        self.initial = number("initial temperature", initial, 0.0)
        self.rate = number("anneal rate", rate, 0.0, strict=False)
        self.minimum = number("minimum temperature", minimum, 0.0)
        self.every = integer("every", every, 1)
        if self.minimum > self.initial:
            raise ConfigError(message("minimum temperature", f"<= the initial temperature {self.initial:g}",
                                      repr(minimum), "lower --temperature-min or raise --temperature"))

    def value(self, step: int) -> float:
        step = (int(step) // self.every) * self.every
        return max(self.minimum, self.initial * math.exp(-self.rate * step))

    def __repr__(self) -> str:
        return (f"ExponentialTemperature(initial={self.initial:g}, rate={self.rate:g}, minimum={self.minimum:g}, "
                f"every={self.every})")


class _BetaSchedule(Schedule):
    def apply(self, vae: Any, step: int) -> float:
        beta = self.value(step)
        vae.beta = beta
        return beta


class ConstantBeta(_BetaSchedule):
    """A fixed KL weight ``beta > 0`` (beta-VAE, Higgins et al. 2017)."""

    def __init__(self, beta: float) -> None:
        self.beta = check_beta("beta", beta)

    def value(self, step: int) -> float:
        return self.beta

    def __repr__(self) -> str:
        return f"ConstantBeta({self.beta:g})"


class KLWarmup(_BetaSchedule):
    """Linear KL warm-up (Bowman et al. 2016; Sønderby et al. 2016): ``beta`` rises from ``start`` to
    ``end`` over ``steps`` optimizer steps, then stays at ``end``.

    ``poutine.scale`` needs a positive scale, so ``start`` must be > 0 (default ``1 / steps``, the first
    step of a ramp from zero).
    """

    def __init__(self, steps: int, start: float | None = None, end: float = 1.0) -> None:
        self.steps = integer("warm-up steps", steps, 1)
        self.end = check_beta("end beta", end)
        self.start = check_beta("start beta", start if start is not None else self.end / self.steps)

    def value(self, step: int) -> float:
        frac = min(1.0, max(0, int(step)) / self.steps)
        return self.start + (self.end - self.start) * frac

    def __repr__(self) -> str:
        return f"KLWarmup(steps={self.steps}, start={self.start:g}, end={self.end:g})"

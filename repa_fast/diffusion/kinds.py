"""What the model predicts, which variance it uses, and which loss trains it."""
from __future__ import annotations

import enum


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()     # the model predicts x_0
    EPSILON = enum.auto()     # the model predicts ε


class ModelVarType(enum.Enum):
    """FIXED_SMALL is β̃_t (the posterior's), FIXED_LARGE is β_t; LEARNED outputs log σ² itself and
    LEARNED_RANGE outputs v ∈ [-1, 1] interpolating log β̃_t (v = -1) .. log β_t (v = 1)."""
    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()

    @property
    def learned(self) -> bool:
        return self in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


class LossType(enum.Enum):
    MSE = enum.auto()          # MSE on the mean target (+ the bound's term for a learned σ)
    RESCALED_MSE = enum.auto()  # as MSE, the bound's term scaled by T/1000
    KL = enum.auto()           # the variational bound alone
    RESCALED_KL = enum.auto()  # the bound's term times T: an estimate of the whole bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)

"""Request bodies of OpenAI's fine-tuning API (/v1/fine_tuning/jobs), as the official client sends them.

A field OpenAI does not define is a 400 naming it, like every /v1 body; `integrations` (Weights & Biases) is
defined but not offered here, so anything but an empty list is a 400 too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Auto = Literal["auto"]
SUFFIX_PATTERN = r"^[A-Za-z0-9_-]{1,40}$"
UNSUPPORTED = "is not supported by this server yet"  # the /v1 error handler names this unsupported_parameter


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(_Strict):
    n_epochs: Auto | int = Field("auto", description="Passes over the training file; auto: the recipe's length")
    batch_size: Auto | int = Field("auto", description="Rows per step; auto: the recipe's batch size")
    learning_rate_multiplier: Auto | float = Field(
        "auto", description="Times the recipe's learning rate; auto: 1 (the recipe's rate)"
    )

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _positive(cls, value: Auto | int) -> Auto | int:
        if value != "auto" and not 1 <= int(value) <= 1000:
            raise ValueError("must be 'auto' or an integer from 1 to 1000")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value: Auto | float) -> Auto | float:
        if value != "auto" and not 0 < float(value) <= 100:
            raise ValueError("must be 'auto' or a number in (0, 100]")
        return value


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Auto | float = Field("auto", description="How far the policy may move from the reference; auto: recipe's")

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: Auto | float) -> Auto | float:
        if value != "auto" and not 0 < float(value) <= 10:
            raise ValueError("must be 'auto' or a number in (0, 10]")
        return value


class SupervisedMethod(_Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(_Strict):
    type: Literal["supervised", "dpo"] = Field(description="reinforcement fine-tuning is not offered here")
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class FineTuningJobCreate(_Strict):
    model: str = Field(min_length=1, max_length=500, description="The base model: a models-directory name or Hub id")
    training_file: str = Field(min_length=1, max_length=100, description="A file id from POST /v1/files")
    validation_file: str | None = Field(None, max_length=100)
    suffix: str | None = Field(None, pattern=SUFFIX_PATTERN, description="Goes into the fine_tuned_model name")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    hyperparameters: SupervisedHyperparameters | None = Field(None, description="Deprecated by OpenAI: use method")
    method: Method | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list[Any] | None = None

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError(UNSUPPORTED)
        return value

    @property
    def method_type(self) -> Literal["supervised", "dpo"]:
        return self.method.type if self.method else "supervised"

    def chosen_hyperparameters(self) -> SupervisedHyperparameters:
        """The hyperparameters of the chosen method (the deprecated top-level ones when no method is given)."""
        if self.method is not None and self.method.type == "dpo":
            return self.method.dpo.hyperparameters if self.method.dpo else DpoHyperparameters()
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or SupervisedHyperparameters()

"""The sampling parameters: their ranges and defaults, defined once.

Every place that takes them reads this module: the OpenAI request models
(:mod:`llamafleet.common.protocol`), the gRPC servicer (:class:`SamplingParameters` validates
its ``params``), the pod's ``DEFAULT_*`` settings, the LLMService's ``spec.sampling`` (and a
test holds the CRD's schema to the same ranges). A request's values, then the pod's defaults,
then :data:`DEFAULTS` fill the engine's parameters (``serving.Serving.sampling``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# The ranges. None in a model means "not set here: the next layer decides".
MaxTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0)]  # 0 disables
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
MinP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # 0 disables
RepeatPenalty = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]  # 1 disables
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]  # presence, frequency
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]


class SamplingParameters(BaseModel):
    """The sampling parameters a request sets, or a layer of defaults; None: not set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    min_p: MinP | None = None
    repeat_penalty: RepeatPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None

    def over(self, *defaults: SamplingParameters) -> SamplingParameters:
        """These values, each unset one taken from the first layer of ``defaults`` that sets it."""
        merged = self.model_dump()
        for layer in defaults:
            for name, value in layer.model_dump().items():
                if merged[name] is None:
                    merged[name] = value
        return SamplingParameters(**merged)


# The last layer: what a pod uses when neither the request nor its settings say otherwise.
# No seed: an unseeded request samples from fresh randomness.
DEFAULTS = SamplingParameters(max_tokens=1024, temperature=0.7, top_k=40, top_p=0.95, min_p=0.05,
                              repeat_penalty=1.1, presence_penalty=0.0, frequency_penalty=0.0)

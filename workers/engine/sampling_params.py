"""Per-request sampling parameters, mirroring vLLM's `SamplingParams`.

Validated on construction: a bad value fails with the field and the reason.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(1, ge=1, le=128, description="parallel samples per prompt")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, description="-1 or 0 disables")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    max_tokens: int | None = Field(16, ge=1, description="None: up to the model's context length")
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20, description="top logprobs per generated token")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __init__(self, /, **data: object) -> None:
        for key in ("stop", "stop_token_ids"):
            if key in data and data[key] is None:  # OpenAI clients send null for "none"
                data[key] = []
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        super().__init__(**data)

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"top_k must be -1 (disabled), 0 (disabled) or positive, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if any(not s for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

"""moecluster: serve DeepSeek-V3/R1 and Kimi K2 mixture-of-experts models across GPU clusters.

The public offline API mirrors vLLM's: ``from moecluster import LLM, SamplingParams``.
Imports are lazy so that ``import moecluster`` stays cheap (no torch until it is needed).
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

# Run from a source checkout without installing (e.g. a copied tree on a GPU machine): the
# subpackages are the checkout's sibling folders (workers/, router/, ...), as pyproject maps them.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "workers" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]  # noqa: F821

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from moecluster.llm import LLM
    from moecluster.workers.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from moecluster.llm import LLM

        return LLM
    if name == "SamplingParams":
        from moecluster.workers.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'moecluster' has no attribute {name!r}")

"""Quality metrics: WikiText perplexities and TriviaQA, through lm-eval and directly."""

from slmsearch.evals.runner import evaluate
from slmsearch.evals.settings import METRICS, EvalSettings

__all__ = ["METRICS", "EvalSettings", "evaluate"]

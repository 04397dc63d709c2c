"""Perplexity from per-token log-probabilities (an Evaluate module shipped with hf_relattn).

Unlike the Hub's ``perplexity`` metric, this module runs no model: the caller scores the
tokens itself (typically ``log_softmax(logits)`` gathered at the observed next tokens) and
passes the resulting natural-log probabilities, one value per predicted token.
"""

from __future__ import annotations

import math
from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Perplexity of a language model over a corpus, computed from the natural-log probability
that the model assigned to each observed (predicted) token:

    mean_nll   = -(1/N) * sum_i log p(x_i | x_<i)
    perplexity = exp(mean_nll)

All tokens of all batches are pooled (a token-weighted average, which is what the usual
"eval loss -> exp" perplexity of causal LMs is); nothing is averaged per sequence.
"""

_CITATION = """\
@article{jelinek1977perplexity,
  title   = {Perplexity -- a measure of the difficulty of speech recognition tasks},
  author  = {Jelinek, Fred and Mercer, Robert L. and Bahl, Lalit R. and Baker, James K.},
  journal = {The Journal of the Acoustical Society of America},
  volume  = {62},
  number  = {S1},
  pages   = {S63--S63},
  year    = {1977}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    log_probs (`list` of `float`): natural-log probability (base e, not base 2) of every
        observed token, one value per predicted token, flat over all sequences and batches.
        Each value must be <= 0; `-inf` (probability 0) is allowed and gives an infinite
        perplexity. Padding/ignored positions must be left out by the caller.
Returns:
    perplexity (`float`): exp(mean_nll), in [1, inf). Lower is better.
    mean_nll (`float`): mean negative log-likelihood per token in nats (the usual LM loss).
    num_tokens (`int`): number of scored tokens N.
Examples:
    >>> ppl = hf_relattn.metrics.load("perplexity")  # = evaluate.load(".../hf_relattn/metrics/perplexity")
    >>> ppl.compute(log_probs=[math.log(0.25)] * 4)  # uniform over 4 symbols
    {'perplexity': 4.0, 'mean_nll': 1.3862943611198906, 'num_tokens': 4}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    """Perplexity = exp(mean negative log-likelihood) of per-token log-probabilities."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64 storage: float32 model outputs are kept exactly, and sums lose nothing.
            features=datasets.Features({"log_probs": datasets.Value("float64")}),
            reference_urls=["https://en.wikipedia.org/wiki/Perplexity"],
        )

    def _compute(self, log_probs: Any) -> dict[str, Any]:
        """Pool every stored token log-probability into perplexity, mean NLL and count."""
        lp = np.asarray(log_probs, dtype=np.float64).reshape(-1)
        if lp.size == 0:
            raise ValueError("perplexity: no log-probabilities given (log_probs is empty)")
        if np.isnan(lp).any():
            raise ValueError(f"perplexity: log_probs contains NaN at index {int(np.flatnonzero(np.isnan(lp))[0])}")
        if (lp > 0).any():
            i = int(np.flatnonzero(lp > 0)[0])
            raise ValueError(
                f"perplexity: log_probs must be natural-log probabilities (<= 0), got {float(lp[i])!r} at index {i}; "
                "pass log p of the observed tokens (e.g. log_softmax(logits) gathered at the labels), "
                "not logits, probabilities or negative log-likelihoods"
            )
        mean_nll = float(-lp.mean())
        # math.exp raises OverflowError past ~709 nats; perplexity is then +inf.
        perplexity = math.exp(mean_nll) if mean_nll < 709.0 else math.inf
        return {"perplexity": perplexity, "mean_nll": mean_nll, "num_tokens": int(lp.size)}

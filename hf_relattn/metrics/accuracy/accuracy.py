"""Classification accuracy (an Evaluate module shipped with hf_relattn).

Same inputs and result as the Hub's ``accuracy`` metric (sklearn's ``accuracy_score`` for
single-label classification), computed with numpy so that neither the network nor
scikit-learn is needed.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Accuracy is the proportion of correct predictions among all examples:

    accuracy = (TP + TN) / (TP + TN + FP + FN)   (binary)
             = (1/N) * sum_i [prediction_i == reference_i]

With `sample_weight`, each example counts with its weight (a weighted mean).
With `normalize=False`, the count (or weight sum) of correct examples is returned instead.
"""

_CITATION = """\
@article{scikit-learn,
  title   = {Scikit-learn: Machine Learning in {P}ython},
  author  = {Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and
             Grisel, O. and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and
             Vanderplas, J. and Passos, A. and Cournapeau, D. and Brucher, M. and Perrot, M. and
             Duchesnay, E.},
  journal = {Journal of Machine Learning Research},
  volume  = {12},
  pages   = {2825--2830},
  year    = {2011}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels, one per example.
    references (`list` of `int`): ground-truth labels, one per example.
    normalize (`bool`, defaults to `True`): if `True`, return the (weighted) fraction of
        correct examples; if `False`, the number of correct examples (with `sample_weight`:
        the sum of their weights).
    sample_weight (`list` of `float`, optional): one weight per example,
        over everything compute() sees (all add_batch() calls included). Defaults to `None`.
Returns:
    accuracy (`float`): in [0, 1] if `normalize=True` (higher is better); otherwise a count
        or weight sum in [0, N] / [0, sum(sample_weight)].
Examples:
    >>> accuracy = hf_relattn.metrics.load("accuracy")  # = evaluate.load(".../hf_relattn/metrics/accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0], normalize=False)
    {'accuracy': 3.0}
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0],
    ...                  sample_weight=[0.5, 2, 0.7, 0.5, 9, 0.4])
    {'accuracy': 0.8778625954198473}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction (or count) of predictions equal to their references, optionally weighted."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(
        self,
        predictions: Any,
        references: Any,
        normalize: bool = True,
        sample_weight: Any = None,
    ) -> dict[str, float]:
        """Accuracy as sklearn's ``accuracy_score`` computes it for single-label inputs."""
        pred = np.asarray(predictions, dtype=np.int64).reshape(-1)
        ref = np.asarray(references, dtype=np.int64).reshape(-1)
        if ref.size == 0:
            raise ValueError("accuracy: no examples given (predictions and references are empty)")
        if pred.shape != ref.shape:  # evaluate checks this per batch already; keep it explicit
            raise ValueError(f"accuracy: {pred.size} predictions but {ref.size} references")
        correct = (pred == ref).astype(np.float64)

        if sample_weight is None:
            # Unweighted: mean, or plain count of correct examples.
            return {"accuracy": float(correct.mean() if normalize else correct.sum())}

        weight = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if weight.shape != correct.shape:
            raise ValueError(
                f"accuracy: sample_weight has {weight.size} values but there are {correct.size} examples"
            )
        if not np.isfinite(weight).all():
            raise ValueError("accuracy: sample_weight must be finite")
        if not normalize:
            return {"accuracy": float(np.dot(correct, weight))}
        total = weight.sum()
        if total == 0:
            raise ValueError("accuracy: sample_weight sums to zero, the weighted accuracy is undefined")
        return {"accuracy": float(np.dot(correct, weight) / total)}

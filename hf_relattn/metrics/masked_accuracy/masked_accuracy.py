"""Masked-language-model token accuracy (an Evaluate module shipped with hf_relattn).

Token ids are compared only where the reference is a real target: positions whose
reference equals ``ignore_index`` (-100 by default, the label Hugging Face MLM collators
give to unmasked tokens and padding) are skipped.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Masked-LM accuracy: the fraction of scored token positions where the predicted token id
(typically argmax of the MLM logits) equals the reference token id. A position is scored
unless its reference equals `ignore_index`; predictions at skipped positions are not read.

    masked_accuracy = sum_i [ref_i != ignore_index and pred_i == ref_i] / sum_i [ref_i != ignore_index]

Positions from all examples and batches are pooled (micro-average over tokens).
"""

_CITATION = """\
@inproceedings{devlin2019bert,
  title     = {{BERT}: Pre-training of Deep Bidirectional Transformers for Language Understanding},
  author    = {Devlin, Jacob and Chang, Ming-Wei and Lee, Kenton and Toutanova, Kristina},
  booktitle = {Proceedings of NAACL-HLT 2019},
  pages     = {4171--4186},
  year      = {2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or `list` of `list` of `int`): predicted token id per
        position; either flat (one id per position) or one list per sequence.
    references (same layout as `predictions`): reference token id per position, or
        `ignore_index` for positions that are not scored (unmasked tokens, padding).
    ignore_index (`int`, defaults to `-100`): reference value marking unscored positions.
Returns:
    masked_accuracy (`float`): fraction of scored positions predicted correctly, in [0, 1];
        higher is better.
    num_masked (`int`): number of scored positions (references != ignore_index).
Raises:
    ValueError: no positions at all, or every reference equals `ignore_index`.
Examples:
    >>> mlm_acc = hf_relattn.metrics.load("masked_accuracy")  # = evaluate.load(".../hf_relattn/metrics/masked_accuracy")
    >>> mlm_acc.compute(predictions=[[5, 7, 9, 2]], references=[[-100, 7, 4, -100]])
    {'masked_accuracy': 0.5, 'num_masked': 2}
"""


def _flatten(rows: Any) -> np.ndarray:
    """Stored column (flat ints, or one list per sequence) -> 1-D int64 array."""
    rows = list(rows)
    if rows and isinstance(rows[0], (list, tuple, np.ndarray)):
        parts = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.asarray(rows, dtype=np.int64).reshape(-1)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MaskedAccuracy(evaluate.Metric):
    """Token accuracy over positions whose reference is not `ignore_index`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Two accepted layouts; evaluate picks the first one the first example fits.
            features=[
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("int64")),
                        "references": datasets.Sequence(datasets.Value("int64")),
                    }
                ),
            ],
            reference_urls=["https://huggingface.co/docs/transformers/tasks/masked_language_modeling"],
        )

    def _infer_feature_from_batch(self, batch: dict[str, Any]) -> datasets.Features:
        # evaluate picks the layout from the first example (IndexError on an empty first
        # batch); fail clearly instead. Later empty batches are fine: the layout is known.
        if any(col is None or len(col) == 0 for col in batch.values()):
            raise ValueError(
                "masked_accuracy: no positions given (predictions and references are empty); the input "
                "layout (flat or one list per sequence) is taken from the first non-empty batch"
            )
        return super()._infer_feature_from_batch(batch)

    def _compute(self, predictions: Any, references: Any, ignore_index: int = -100) -> dict[str, Any]:
        """Compare predictions and references at every position not marked `ignore_index`."""
        # Per-sequence layout: each prediction row must line up with its reference row.
        for i, (p, r) in enumerate(zip(predictions, references)):
            if isinstance(r, (list, tuple, np.ndarray)) and len(p) != len(r):
                raise ValueError(
                    f"masked_accuracy: example {i} has {len(p)} predicted positions but {len(r)} references"
                )
        pred, ref = _flatten(predictions), _flatten(references)
        if ref.size == 0:
            raise ValueError("masked_accuracy: no positions given (predictions and references are empty)")
        if pred.shape != ref.shape:
            raise ValueError(f"masked_accuracy: {pred.size} predicted positions but {ref.size} references")

        scored = ref != ignore_index
        num_masked = int(scored.sum())
        if num_masked == 0:
            raise ValueError(
                f"masked_accuracy: every reference equals ignore_index={ignore_index}, so there is nothing "
                "to score (are the labels from the MLM data collator, with masked positions kept?)"
            )
        correct = int((pred[scored] == ref[scored]).sum())
        return {"masked_accuracy": correct / num_masked, "num_masked": num_masked}

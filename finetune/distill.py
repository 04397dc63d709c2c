"""Knowledge distillation from the model before conversion (Hinton, Vinyals & Dean 2015,
"Distilling the Knowledge in a Neural Network").

loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * task loss, where p^T is
the softmax of the logits divided by the temperature T. The T^2 factor (Hinton et al.) keeps
the soft term's gradients the same size whatever T is. The KL is the mean over the positions
that carry a prediction: every real token for causal-lm (`attention_mask`), the masked tokens
for masked-lm (`labels != -100`), every example for seq-cls / image-cls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def prediction_mask(task: str, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
    """(B, T) bool of the positions whose distributions are distilled; None for one per example."""
    if logits.dim() == 2:
        return None
    if task == "masked-lm" and "labels" in batch:
        return batch["labels"] != -100
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Mean over the distilled positions of KL(softmax(teacher / T) || softmax(student / T)), float32."""
    if mask is not None:
        student, teacher = student[mask], teacher[mask]
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
    return per_position.mean() if per_position.numel() else student.float().sum() * 0.0


def combined_loss(task_loss: torch.Tensor, kl: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    return alpha * temperature**2 * kl + (1.0 - alpha) * task_loss

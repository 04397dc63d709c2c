"""Relation-aware attention over caller-supplied relation graphs: the relation-aware
self-attention of Shaw, Uszkoreit & Vaswani 2018 (NAACL) with arbitrary edge labels, as used for
schema linking in text-to-SQL (RAT-SQL, Wang et al. 2020; RASAT, Qi et al. 2022) and for graph
structure in AMR-to-text (Zhu et al. 2019).

The caller labels every (query, key) token pair: `model(input_ids, relation_ids=R)` with R a
LongTensor (batch, query length, key length) of ids in [0, num_relations). Label 0 means "no
relation" and has no stored vectors (it contributes nothing, whatever training does), so a
freshly converted model, whose other tables are zero, is exactly the original. With a KV cache,
R covers the new queries and all cached keys; a square (batch, N, N) graph over the whole
sequence (N >= key length) is also accepted and cut to the current step, which is what
`generate(..., relation_ids=R)` passes at every step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import MAX_TABLE_ROWS, RelationTerm, check_int_options, register_variant
from .relational import RelationalVariant

if TYPE_CHECKING:
    from ..patches import FamilyAdapter

INPUT_NAME = "relation_ids"


@register_variant
@dataclass
class Relation(RelationalVariant):
    num_relations: int | None = None

    name = "relation"
    model_inputs = (INPUT_NAME,)
    sequence_start = "keys"  # relation_ids index keys from the first token
    description = (
        "Learned key (and value) vectors per caller-supplied relation id (relation_ids=(B, Q, K)); "
        "id 0 = no relation; per layer, zero-init."
    )
    paper = "Shaw, Uszkoreit & Vaswani 2018 (relation-aware self-attention); Wang et al. 2020, RAT-SQL, ACL"
    limits = (
        "Zero-initialised relation tables: untrained they change nothing; inputs need `relation_ids` (B, "
        "T, T) built by the caller."
    )
    fixed_zero_labels = 1

    def check_options(self) -> None:
        if self.num_relations is None:
            raise ValueError(f"{self.name}: num_relations is required (relation ids 0..num_relations-1; 0 = no relation)")
        check_int_options(self, "num_relations", minimum=2, maximum=MAX_TABLE_ROWS)
        super().check_options()

    def num_labels(self, adapter: FamilyAdapter) -> int:
        return self.num_relations

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        if adapter.inputs_refused:
            from ..patches import ADAPTERS

            valid = ", ".join(sorted(name for name, a in ADAPTERS.items() if not a.inputs_refused))
            raise ValueError(f"{self.name}: not for {adapter.model_type}: {adapter.inputs_refused}; valid families: {valid}")
        super().check_model(model, adapter, layers)

    def __post_init__(self) -> None:
        self._checked: tuple[Any, ...] | None = None
        super().__post_init__()

    def relation_ids(self, inputs: dict[str, Any], q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """The (B, Q, K) ids for this call, validated once per tensor."""
        ids = inputs.get(INPUT_NAME)
        expected = f"(batch, {q_len}, {k_len}) = (batch, query length, key length)"
        if ids is None:
            raise ValueError(
                f"The 'relation' variant needs relation_ids: pass model(..., relation_ids=R) with R a "
                f"LongTensor of shape {expected} and ids in [0, {self.num_relations}) (0 = no relation)."
            )
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"relation_ids must be an integer (long) tensor of shape {expected}, got {kind}")
        if ids.dim() != 3:
            raise ValueError(f"relation_ids must have shape {expected}, got {tuple(ids.shape)}")
        rows, cols = ids.shape[1:]
        if (rows, cols) != (q_len, k_len) and (rows != cols or rows < k_len):
            raise ValueError(
                f"relation_ids must have shape {expected} (or (batch, N, N) with N >= {k_len} covering "
                f"the whole sequence), got {tuple(ids.shape)}"
            )
        # every layer sees the same tensor: check its range once (per tensor object and version)
        checked = self._checked
        version = -1 if ids.is_inference() else ids._version  # inference tensors have no version counter
        if checked is None or checked[0]() is not ids or checked[1] != version or version == -1:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_relations:
                raise ValueError(
                    f"relation_ids must lie in [0, {self.num_relations}) (num_relations={self.num_relations}), "
                    f"got values in [{low}, {high}]"
                )
            self._checked = (weakref.ref(ids), version)
        if (rows, cols) != (q_len, k_len):
            ids = ids[:, k_len - q_len : k_len, :k_len]
        return ids.to(device=device, dtype=torch.long)

    def relation_term(
        self, module: nn.Module, num_heads: int, q_pos: torch.Tensor, k_pos: torch.Tensor, inputs: dict[str, Any], *,
        causal: bool
    ) -> RelationTerm:
        ids = self.relation_ids(inputs, q_pos.shape[0], k_pos.shape[0], q_pos.device)
        key, value = self.tables(module)
        return RelationTerm(self.num_relations, labels=ids, key=key, value=value, source=INPUT_NAME)

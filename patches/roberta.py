"""RoBERTa family adapter: BERT's layout (RobertaSelfAttention: query/key/value)."""

from __future__ import annotations

from . import register_adapter
from .bert import bert_like

ADAPTER = register_adapter(bert_like("roberta"))

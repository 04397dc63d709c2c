"""XLM-RoBERTa family adapter: BERT's layout (XLMRobertaSelfAttention: query/key/value)."""

from __future__ import annotations

from . import register_adapter
from .bert import bert_like

ADAPTER = register_adapter(bert_like("xlm-roberta"))

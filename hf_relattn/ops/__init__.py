"""Numerical building blocks of attention that know no variant: the engine and the variants'
`attend` hooks compose them.

- `masks`: boolean keep-masks as additive ones, key-padding detection;
- `dense`: SDPA with an additive bias in query chunks, and the materialised reference formula;
- `relational`: relation-aware attention (Shaw et al. 2018) in chunks with its own backward;
- `pieces`: dense pieces over disjoint key sets merged by log-sum-exp, the CPU flash kernel, sinks;
- `blocks`: block-sparse attention over the key blocks a pattern keeps;
- `flash`: FlashAttention forward and backward over key windows (bands, sinks) through torch's
  CPU flash kernels, memory O(T);
- `flex`: a static pattern as a FlexAttention block mask (GPU).
"""

"""Independent references used by the tests: plain materialized formulas, written without the library's code.

Nothing here calls hf_relattn. The formulas are computed in float64 from the weights and
from the inputs a forward hook captured; the model helpers only walk a model's modules or
build native transformers models. Test files import them like conftest: `from reference import ...`.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from conftest import state_copy
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


# ------------------------------------------------------------------------------- heads
def split_heads(x, heads):
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x):
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def pool_heads(weight: torch.Tensor, num_heads: int, groups: int, kv_heads: int | None = None, init: str = "mean") -> torch.Tensor:
    """Rows of a K/V projection (weight (Hkv*D, in) or bias (Hkv*D,)) pooled into `groups` heads.

    Group g replaces query heads g*H/G .. (g+1)*H/G - 1; query head i reads source K/V head
    i // (H / Hkv) (Hkv defaults to H). "mean" averages those heads, "first" takes the
    group's first one. Pooled in float64, returned in the weight's dtype.
    """
    kv_heads = kv_heads or num_heads
    head_dim = weight.shape[0] // kv_heads
    per_head = weight.double().reshape(kv_heads, head_dim, *weight.shape[1:])
    size = num_heads // groups
    pooled = []
    for g in range(groups):
        members = [per_head[i // (num_heads // kv_heads)] for i in range(g * size, (g + 1) * size)]
        pooled.append(torch.stack(members).mean(dim=0) if init == "mean" else members[0])
    return torch.cat(pooled, dim=0).to(weight.dtype)


def expand_heads(weight: torch.Tensor, num_heads: int, groups: int) -> torch.Tensor:
    """(G*D, ...) -> (H*D, ...): query head i gets group i // (H/G) (multi-head equivalent)."""
    head_dim = weight.shape[0] // groups
    per_group = weight.reshape(groups, head_dim, *weight.shape[1:])
    return torch.cat([per_group[i // (num_heads // groups)] for i in range(num_heads)], dim=0)


# --------------------------------------------------------------------------- attention
def kept_pairs(q_len, k_len, causal=False, key_mask=None, allowed=None):
    """(B or 1, 1, Q, K) True where query i (the last Q of K positions) may attend key j:
    j <= i if causal, the key not padding (key_mask (B, K)), and `allowed` (B, 1, Q, K)."""
    keep = torch.ones(q_len, k_len, dtype=torch.bool)
    if causal:
        keep = torch.arange(k_len)[None, :] <= torch.arange(k_len - q_len, k_len)[:, None]
    keep = keep[None, None]
    if key_mask is not None:
        keep = keep & key_mask.bool()[:, None, None, :]
    if allowed is not None:
        keep = keep & allowed
    return keep


def materialized_attention(q, k, v, scale, causal=False, key_mask=None, bias=None, allowed=None):
    """softmax(q k^T * scale + bias + mask) v in float64, K/V heads repeated; q (B,H,Q,D), k/v (B,G,K,D).

    causal: query i (the last Q of K positions) sees keys j <= i; key_mask: (B, K) padding
    mask; bias: added to the scores (broadcast to (B, H, Q, K)); allowed: an extra boolean
    (B, 1, Q, K) mask. Masked scores get the float64 minimum (a fully masked row stays
    finite, as in transformers; other rows are the same as with -inf).
    """
    num_heads, groups = q.shape[1], k.shape[1]
    src = torch.tensor([i // (num_heads // groups) for i in range(num_heads)])
    k, v = k[:, src].double(), v[:, src].double()
    q = q.double()
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    keep = kept_pairs(q.shape[2], k.shape[2], causal, key_mask, allowed)
    scores = scores.masked_fill(~keep, torch.finfo(torch.float64).min)
    return torch.softmax(scores, dim=-1) @ v


def linear(x, weight, bias=None):
    """x W^T + b in float64 (bias may be None)."""
    return F.linear(x, weight.double(), None if bias is None else bias.double())


def projections(module):
    """(weight, bias) of the q, k, v and output projections of a LLaMA, BERT or ViT attention
    module; the output one is None for BERT (its self-attention has none)."""
    if hasattr(module, "query"):  # BertSelfAttention
        names = ("query", "key", "value", None)
    else:  # LlamaAttention, ViTAttention
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
    pairs = []
    for name in names:
        lin = None if name is None else getattr(module, name)
        pairs.append(None if lin is None else (lin.weight, lin.bias))
    return tuple(pairs)


def attention_reference(record, heads, q, k, v, o=None, *, causal=False, rotary=False, key_mask=None, bias=None):
    """An attention module's output recomputed in float64 from its `capture` record.

    q, k, v, o: (weight, bias) of the projections (bias may be None; o None: no output
    projection). Head dim = q rows / heads, K/V heads = k rows / head dim. rotary: RoPE
    from the record's `position_embeddings` (LLaMA). causal, key_mask, bias: as for
    `materialized_attention`; scale 1/sqrt(head dim).
    """
    h = hidden_of(record).double()
    query = split_heads(linear(h, *q), heads)
    head_dim = query.shape[-1]
    k_flat, v_flat = linear(h, *k), linear(h, *v)
    key = split_heads(k_flat, k_flat.shape[-1] // head_dim)
    value = split_heads(v_flat, v_flat.shape[-1] // head_dim)
    if rotary:
        cos, sin = record[1]["position_embeddings"]
        query, key = apply_rotary_pos_emb(query, key, cos.double(), sin.double())
    out = merge_heads(materialized_attention(query, key, value, head_dim**-0.5, causal, key_mask, bias))
    return out if o is None else linear(out, *o)


def run_with_attention(model, implementation, **inputs):
    """The same model and weights with attention computed by the registered function
    `implementation` (a test reference); logits for LMs, else the last hidden states."""
    impl = model.config._attn_implementation
    model.config._attn_implementation_internal = implementation  # bypass the adapted class's guard on purpose
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        return out.logits if out.logits.dim() == 3 else out.hidden_states[-1]
    finally:
        model.config._attn_implementation_internal = impl


# ------------------------------------------------------------------------------- hooks
@contextlib.contextmanager
def capture(modules):
    """Record (args, kwargs, output) of each module's forward, by position in `modules`."""
    records: dict[int, tuple] = {}
    handles = []
    for idx, module in enumerate(modules):
        def hook(mod, args, kwargs, output, idx=idx):
            records[idx] = (args, kwargs, output)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def hidden_of(record):
    """The hidden states a captured attention module received."""
    args, kwargs, _ = record
    return args[0] if args else kwargs["hidden_states"]


def output_of(record):
    """The attention output a captured module returned (first element of a tuple)."""
    out = record[2]
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------ models
def attention_modules(model):
    """The attention module of every layer of a GPT-2, OPT, BERT, LLaMA or ViT model."""
    base = model.base_model
    if hasattr(base, "h"):  # GPT-2
        return [block.attn for block in base.h]
    if hasattr(base, "decoder"):  # OPT
        return [layer.self_attn for layer in base.decoder.layers]
    if hasattr(base, "encoder"):  # BERT
        return [layer.attention.self for layer in base.encoder.layer]
    if hasattr(base, "layers") and hasattr(base.layers[0], "self_attn"):  # LLaMA
        return [layer.self_attn for layer in base.layers]
    return [layer.attention for layer in base.layers]  # ViT


def with_random_biases(model, seed=2):
    """The tiny models start with zero biases; random ones make bias handling observable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return model


def pooled_llama_kv(src, groups, init="mean", layers=None):
    """`pool_heads` of src's LLaMA k_proj/v_proj weights, by state-dict key (every layer by default)."""
    cfg = src.config
    out = {}
    for i in range(cfg.num_hidden_layers) if layers is None else layers:
        for proj in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            out[key] = pool_heads(src.state_dict()[key], cfg.num_attention_heads, groups, cfg.num_key_value_heads, init)
    return out


def native_llama_with(src: LlamaForCausalLM, groups: int, kv_weights: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """A plain transformers LLaMA with `groups` K/V heads, loaded with src's weights + `kv_weights`."""
    cfg = copy.deepcopy(src.config)
    cfg.num_key_value_heads = groups
    native = LlamaForCausalLM(cfg).to(src.dtype).eval()
    state = state_copy(src)
    state.update(kv_weights)
    native.load_state_dict(state, strict=True)
    return native


# ---------------------------------------------------------------- relation-aware attention
def clipped_relative_labels(q_len, k_len, max_distance):
    """Shaw et al. 2018, eq. 5: label of (i, j) = clip(j - i, -k, k) + k, queries = the last q_len
    of k_len positions; written with plain loops."""
    labels = torch.empty(q_len, k_len, dtype=torch.long)
    for a in range(q_len):
        i = k_len - q_len + a
        for j in range(k_len):
            labels[a, j] = max(-max_distance, min(max_distance, j - i)) + max_distance
    return labels


def prefix_of(config):
    """Tokens before a vision family's patches, by the models' own embeddings: [CLS]; DeiT adds
    its distillation token; DINOv2 with registers its `num_register_tokens` registers."""
    family = config.model_type.removeprefix("relattn_")
    if family == "deit":
        return 2
    if family == "dinov2_with_registers":
        return 1 + config.num_register_tokens
    return 1


def vit_grid_labels(num_tokens, cols, max_distance, prefix=1):
    """ViT token pairs: tokens 0 .. prefix-1 are special ([CLS]; DeiT adds its distillation
    token), token t >= prefix is patch t-prefix at (row, col) = divmod(t-prefix, cols).
    Patch pairs: (clip(dy) + k) * (2k + 1) + clip(dx) + k; then special->patch, patch->special,
    special->special get (2k+1)^2, +1, +2 (BEiT's three extra labels). Plain loops."""
    k = max_distance
    width = 2 * k + 1
    labels = torch.empty(num_tokens, num_tokens, dtype=torch.long)
    for i in range(num_tokens):
        for j in range(num_tokens):
            if i < prefix and j < prefix:
                labels[i, j] = width * width + 2
            elif i < prefix:
                labels[i, j] = width * width
            elif j < prefix:
                labels[i, j] = width * width + 1
            else:
                (yi, xi), (yj, xj) = divmod(i - prefix, cols), divmod(j - prefix, cols)
                dy, dx = max(-k, min(k, yj - yi)), max(-k, min(k, xj - xi))
                labels[i, j] = (dy + k) * width + dx + k
    return labels


def gathered(table, labels):
    """A (R, d) or per-head (H, R, d) table looked up at every pair: (B, 1 or H, Q, K, d) float64,
    the T x T x d tensor of the paper's eqs. 3-4 (and of transformers v4 BERT's relative_key)."""
    table = table.double()
    if table.dim() == 2:
        return table[labels][:, None]
    return table[:, labels].transpose(0, 1)


def relation_aware_attention(q, k, v, scale, terms=(), causal=False, key_mask=None, allowed=None, bias=None):
    """Shaw, Uszkoreit & Vaswani 2018, eqs. 3-4, materialised in float64:
        e_ij = q_i . (k_j + a^K_{r_ij}) * scale,   z_i = sum_j softmax(e)_ij (v_j + a^V_{r_ij}),
    with the a^K, a^V of every term summed. q (B, H, Q, D); k/v (B, G, K, D) (K/V heads repeated);
    terms: (labels (1 or B, Q, K), a^K or None, a^V or None), tables (R, D) or (H, R, D);
    bias: added to the scaled scores; masks as in `materialized_attention`."""
    num_heads, groups = q.shape[1], k.shape[1]
    src = torch.tensor([i // (num_heads // groups) for i in range(num_heads)])
    q, k, v = q.double(), k[:, src].double(), v[:, src].double()
    shape = (q.shape[0], num_heads, -1, -1, -1)
    scores = q @ k.transpose(-1, -2)
    for labels, a_key, _ in terms:
        if a_key is not None:
            scores = scores + torch.einsum("bhqd,bhqkd->bhqk", q, gathered(a_key, labels).expand(shape))
    scores = scores * scale
    if bias is not None:
        scores = scores + bias.double()
    keep = kept_pairs(q.shape[2], k.shape[2], causal, key_mask, allowed)
    probs = torch.softmax(scores.masked_fill(~keep, torch.finfo(torch.float64).min), dim=-1)
    out = probs @ v
    for labels, _, a_value in terms:
        if a_value is not None:
            out = out + torch.einsum("bhqk,bhqkd->bhqd", probs, gathered(a_value, labels).expand(shape))
    return out

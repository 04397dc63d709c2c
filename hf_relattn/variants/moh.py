"""MoH, Mixture-of-Head attention: Jin, Zhu, Yuan & Yan 2024, "MoH: Multi-Head Attention as
Mixture-of-Head Attention".

Heads are experts. Every token uses the `shared_heads` and its top-k routed heads (k such that
shared + k = `active_heads` of all heads, rounded to the nearest whole head; a fraction of
shared heads is floored, as the official code does); each head's output is multiplied by the
token's weight for that head before the output projection; heads a token does not use get 0.

Two routers, as in the official code:

- `router="learned"` (MoH-ViT / MoH-DiT): from the attention input x,
  routed gates g = softmax(W_r x) over the routed heads, top-k kept and renormalised to sum 1,
  then multiplied by k; shared gates softmax(W_s x) times the number of shared heads (all 1
  when there is one shared head); with both kinds, [a1, a2] = 2 softmax(W_h x) scales shared
  and routed weights. These factors make uniform gates give every used head weight exactly 1,
  which is what a pretrained multi-head model expects. W_r starts N(0, initializer_range)
  (ties would route every token alike) unless every routed head is active (`active_heads=1.0`:
  nothing to choose, W_r starts at zero and the conversion computes the original model);
  W_s and W_h start at zero (weights exactly 1).
- `router="query_norm"` (MoH-LLaMA3 continue-tuning): parameter-free; the routed logits are
  the L2 norms of the routed heads' queries (RoPE rotates, so pre- and post-RoPE norms agree),
  divided by their standard deviation across routed heads, softmax g. The weights are binary
  (1 for shared and selected heads); gradients reach the queries through a straight-through
  estimator (forward value `hard`, gradient of `g`).

Load balance (paper Eq. 7, scaled as the official code: E * sum_i P_i f_i over the E routed
heads, P_i the mean gate, f_i the fraction of tokens selecting head i; padding tokens left out)
is computed per layer in training; the model averages it over layers, multiplies it by
`aux_loss_coef`, adds it to `loss` when labels are given and returns it as the output's
`moh_aux_loss` (see `moh_aux_loss`). The per-layer terms travel with the call (a list in its
keyword arguments), never on the modules, so concurrent calls do not mix.

Shared heads: a count, a fraction of the heads (the official recipe takes the first half), an
explicit list of head indices (every layer) or {layer: [heads]}, or "importance" with
`batches=`: per layer the most important half by `hf_relattn.head_importance` (Michel et al.
2019), recorded in the config as {layer: [heads]}. The default is "importance" when `batches=`
are given (a pretrained model's important heads stay on for every token), else 0.5.

At inference (eval mode, no autograd) a (token, head) pair the router does not select is not
computed: per head the engine gathers the tokens that use it and attends them over all keys.
Keys and values are still projected for every token: a later token may use any head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..call import AttnCall
from ..ops.masks import float_mask
from ..ops.pieces import CPU_FLASH
from .base import (
    ATTACHED,
    Variant,
    add_router,
    attach,
    check_choice,
    check_number,
    layer_input,
    model_input_names,
    register_variant,
)

if TYPE_CHECKING:
    from ..patches import FamilyAdapter

ROUTERS = ("learned", "query_norm")
ROUTED, SHARED, MIX = "relattn_moh_routed", "relattn_moh_shared", "relattn_moh_mix"
AUX = "relattn_moh_aux"  # keyword argument of a training call: the list of its layers' balance terms
OUTPUT = "moh_aux_loss"  # the output key of the weighted term
HOOKED = "_relattn_moh_hooked"
# A converted module's layer index in the adapter's order (the keys of shared_heads={layer: [heads]})
LAYER_INDEX = "_relattn_moh_layer"


def module_heads(module: nn.Module, adapter: FamilyAdapter) -> int:
    """Query heads of one attention module (pruned layers may have fewer than the config)."""
    return adapter.module_num_heads(module)


@register_variant
@dataclass
class MoH(Variant):
    shared_heads: Any = None
    active_heads: float = 0.75
    router: str = "learned"
    aux_loss_coef: float = 0.01
    batches: Any = field(default=None, repr=False)

    name = "moh"
    axis = "gating"
    description = ("Mixture-of-Head: each token uses the shared heads and its top-k routed heads, outputs weighted "
                   "per head (learned router: new parameters, needs training; query_norm: parameter-free).")
    paper = "Jin et al. 2024, MoH: Multi-Head Attention as Mixture-of-Head Attention"
    limits = (
        "Learned routers (router='learned') need training; the query-norm router is parameter-free but "
        "changes outputs."
    )

    def options(self) -> dict[str, Any]:
        options = super().options()
        options.pop("batches")  # only used to resolve shared_heads="importance" at conversion
        return options

    @classmethod
    def fits_on_batches(cls, options: dict[str, Any]) -> bool:
        return options.get("shared_heads") in (None, "importance")

    # ----------------------------------------------------------------- conversion
    def _shared_for(self, layer: int, heads: int) -> list[int]:
        spec = self.shared_heads
        if isinstance(spec, dict):
            spec = spec.get(layer, spec.get(str(layer), []))
        if isinstance(spec, float):
            return list(range(int(heads * spec + 1e-9)))
        if isinstance(spec, int):
            return list(range(spec))
        return sorted(spec)

    def _active_count(self, heads: int) -> int:
        return int(heads * self.active_heads + 0.5)  # the nearest whole number of heads

    def check_options(self) -> None:
        super().check_options()
        check_choice(self, "router", ROUTERS)
        check_number(self, "active_heads", 0, 1, low_open=True)  # the fraction of all heads each token uses
        check_number(self, "aux_loss_coef", 0, 1e6)
        spec = self.shared_heads
        if spec == "importance" and self.batches is None:
            raise ValueError("moh: shared_heads='importance' needs batches= (model inputs with labels) to score the heads")
        if self.batches is not None and spec not in (None, "importance"):
            raise ValueError("moh: batches= is only used with shared_heads='importance'")
        if isinstance(spec, float) and not 0 <= spec <= 1:  # NaN fails too
            raise ValueError(f"moh: a fraction of shared heads must be in [0, 1], got {spec}")
        if isinstance(spec, bool) or not isinstance(spec, (type(None), str, int, float, list, tuple, dict)) or (
                isinstance(spec, str) and spec != "importance"):
            raise ValueError(f"moh: shared_heads must be a count, a fraction, a list of heads, {{layer: [heads]}} or "
                             f"'importance'; got {spec!r}")

    def validate(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        if self.shared_heads is None:  # the default: the most important half when batches can say which
            self.shared_heads = "importance" if self.batches is not None else 0.5
        if self.shared_heads == "importance":
            self.shared_heads = self._most_important(model, adapter, layers)  # runs the model, changes nothing
            self.batches = None
        spec = self.shared_heads
        if isinstance(spec, dict):
            # a saved spec may name more layers (a later conversion took some over): only here an error
            keys = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k for k in spec}
            if not keys <= set(layers):
                raise ValueError(f"moh: shared_heads names layers {sorted(map(str, keys - set(layers)))} that are not converted; layers: {layers}")
        self.check_model(model, adapter, layers)

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        spec = self.shared_heads
        if spec is None or spec == "importance":
            raise ValueError(f"moh: a saved spec must name its shared heads (a count, fraction, list or {{layer: [heads]}}), got {spec!r}")
        modules = adapter.attention_modules(model)
        for idx in layers:
            heads = module_heads(modules[idx], adapter)
            shared = self._shared_for(idx, heads)
            if isinstance(spec, int) and not isinstance(spec, bool) and not 0 <= spec <= heads:
                raise ValueError(f"moh: shared_heads={spec} but layer {idx} has {heads} heads")
            if any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < heads for h in shared) or len(set(shared)) != len(shared):
                raise ValueError(f"moh: shared heads of layer {idx} must be distinct head indices in 0..{heads - 1}, got {shared}")
            needed = len(shared)
            if self._active_count(heads) < max(1, needed):
                raise ValueError(
                    f"moh: active_heads={self.active_heads} gives {self._active_count(heads)} of layer {idx}'s {heads} heads, "
                    f"fewer than its {needed} shared heads (and at least 1 is needed)"
                )

    def _most_important(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> dict[int, list[int]]:
        """Per layer, the half of its heads (floored) that `head_importance` ranks highest."""
        # imported here: heads imports the adapters, which import the variants
        from ..heads import head_importance

        scores = head_importance(model, self.batches)
        modules = adapter.attention_modules(model)
        chosen = {}
        for idx in layers:
            heads = module_heads(modules[idx], adapter)
            ranked = torch.argsort(scores[idx, :heads].nan_to_num(-1.0), descending=True, stable=True)
            chosen[idx] = sorted(ranked[: int(heads * 0.5)].tolist())
        return chosen

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        if isinstance(self.shared_heads, dict):  # JSON keys are strings
            self.shared_heads = {int(k): sorted(int(h) for h in v) for k, v in self.shared_heads.items()}
        if isinstance(self.shared_heads, tuple):
            self.shared_heads = list(self.shared_heads)
        std = getattr(model.config, "initializer_range", 0.02)
        for idx in layers:
            attn = adapter.attention_modules(model)[idx]
            # what {layer: [heads]} names: ViT's modules have no layer_idx, CLIPModel's restart at 0 in each tower
            setattr(attn, LAYER_INDEX, idx)
            heads = module_heads(attn, adapter)
            shared = len(self._shared_for(idx, heads))
            routed = heads - shared
            picks = self._active_count(heads) - shared
            if self.router == "learned":
                # a random routed router breaks ties between heads; with every routed head active
                # there is nothing to choose, and zero logits give each head weight exactly 1
                routed_std = std if picks < routed else 0.0
                for name, size, wanted in ((ROUTED, routed, picks > 0), (SHARED, shared, shared > 1), (MIX, 2, shared > 0 and picks > 0)):
                    if wanted:
                        add_router(attn, adapter, name, size, (routed_std if name == ROUTED else 0.0) if initialize else None)
            attach(attn, self)
        _register_aux_hook(model)

    @classmethod
    def bench_variants(cls, suite: str, length: int) -> list[MoH]:
        if suite != "moh":
            return []
        return [cls(router="query_norm", active_heads=active, shared_heads=shared) for active, shared in ((0.75, 0.5), (0.5, 0.25))]

    def bench_label(self, module: nn.Module) -> str:
        return f"{self.name} {self._active_count(module.num_heads) / module.num_heads:.0%} of heads"

    def computed_pairs(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> float:
        length = q.shape[2]  # the selected (token, head) pairs: the used fraction of the dense pairs
        used = self._active_count(q.shape[1]) / q.shape[1]
        return used * (length * (length + 1) / 2 if module.is_causal else length * length)

    # ----------------------------------------------------------------- run time
    def attend(self, call: AttnCall, rest: Callable[[AttnCall], torch.Tensor]) -> torch.Tensor:
        """The gating axis: the layer's attention (`rest`, the other variants) times each token's
        head weights. At inference, from ROUTED_MIN_TOKENS queries on, with no other variant
        inside attention, only the selected (token, head) pairs are computed
        (`head_routed_attention`): below that the per-head calls cost more than they save, and a
        decoding step's cost is reading the KV cache."""
        weights, used = self.head_weights(call.module, call.query, call.query_valid(), call.inputs)
        plain = all(v.axis == "structure" for v in call.variants if v is not self) and not any(
            call.inputs.get(name) is not None for name in model_input_names())
        if (plain and call.query.shape[2] >= ROUTED_MIN_TOKENS and not call.module.training and not torch.is_grad_enabled()
                and call.impl == "auto"):
            out = head_routed_attention(call, used)
        else:
            out = rest(call)
        return out * weights[..., None]

    def head_weights(self, module: nn.Module, query: torch.Tensor, token_valid: torch.Tensor | None,
                     inputs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (B, Q, H) in the query's dtype, used (B, Q, H) bool) for this call's tokens;
        appends the layer's load-balance loss to the call's collector in training.
        `token_valid` (B, Q): tokens that are not padding (for the loss); `inputs`: the call's
        keyword arguments (the layer input for the learned router, the collector)."""
        batch, heads, q_len, _ = query.shape
        layer = getattr(module, LAYER_INDEX, getattr(module, "layer_idx", None))
        shared_idx = self._shared_for(layer, heads) if isinstance(self.shared_heads, dict) else self._shared_for(-1, heads)
        # head indices as constants (no data-dependent shapes: torch.compile traces them)
        shared_t = torch.tensor(shared_idx, dtype=torch.long, device=query.device)
        routed_idx = torch.tensor([h for h in range(heads) if h not in shared_idx], dtype=torch.long, device=query.device)
        n_shared, n_routed = len(shared_idx), heads - len(shared_idx)
        picks = self._active_count(heads) - n_shared
        weights = query.new_zeros(batch, q_len, heads, dtype=torch.float32)
        used = torch.zeros(batch, q_len, heads, dtype=torch.bool, device=query.device)
        used[..., shared_t] = True
        inputs = inputs or {}
        # the layer input feeds the learned routers; a layer whose shared heads fill the active
        # count (2 heads, active_heads=0.5, shared_heads=1) has none, nor the input hook
        x = layer_input(module, inputs) if self.router == "learned" and (picks > 0 or n_shared > 1) else None
        collector = inputs.get(AUX) if module.training else None
        if picks > 0:
            if self.router == "learned":
                logits = getattr(module, ROUTED)(x).float()
            else:
                norms = query[:, routed_idx].float().norm(dim=-1).transpose(1, 2)  # (B, Q, E)
                spread = norms.std(dim=-1, keepdim=True) if n_routed > 1 else norms.new_ones(())
                logits = norms / spread.clamp(min=torch.finfo(torch.float32).tiny)
            gates = torch.softmax(logits, dim=-1)
            top = gates.topk(picks, dim=-1).indices
            hard = torch.zeros_like(gates).scatter_(-1, top, 1.0)
            if self.router == "learned":
                kept = gates * hard
                routed_w = kept / kept.sum(-1, keepdim=True).clamp(min=torch.finfo(kept.dtype).eps) * picks
            else:
                routed_w = hard + gates - gates.detach()  # straight-through: value 0/1, gradient of the gates
            used[..., routed_idx] = hard.bool()
            if collector is not None:
                collector.append(_balance_loss(gates, hard, token_valid))
        if n_shared:
            if self.router == "learned" and n_shared > 1:
                shared_w = torch.softmax(getattr(module, SHARED)(x).float(), dim=-1) * n_shared
            else:
                shared_w = weights.new_ones(batch, q_len, n_shared)
        if self.router == "learned" and n_shared and picks > 0:
            mix = torch.softmax(getattr(module, MIX)(x).float(), dim=-1) * 2
            shared_w = shared_w * mix[..., :1]
            routed_w = routed_w * mix[..., 1:]
        if n_shared:
            weights = weights.index_copy(-1, shared_t, shared_w)
        if picks > 0:
            weights = weights.index_copy(-1, routed_idx, routed_w)
        return weights.to(query.dtype), used


def _balance_loss(gates: torch.Tensor, hard: torch.Tensor, token_valid: torch.Tensor | None) -> torch.Tensor:
    """E * sum_i P_i f_i over routed heads (paper Eq. 7 with the official scale), over real tokens."""
    gates, hard = gates.flatten(0, 1), hard.flatten(0, 1)
    if token_valid is not None:
        keep = token_valid.flatten()
        gates, hard = gates[keep], hard[keep]
    experts = gates.shape[-1]
    return experts * (gates.mean(0) * hard.mean(0)).sum()


def moh_layers(model: nn.Module) -> list[nn.Module]:
    """Attention modules of `model` that carry MoH."""
    return [m for m in model.modules() if any(v.name == MoH.name for v in getattr(m, ATTACHED, ()))]


def moh_aux_loss(outputs: Any) -> torch.Tensor:
    """The load-balance term a training forward added to its loss, from that forward's outputs:
    aux_loss_coef times the mean over MoH layers of E * sum_i P_i f_i (Jin et al. 2024, Eq. 7).
    It keeps its graph (add it to a loss computed outside the model); zero for a forward that
    was not training."""
    value = outputs.get(OUTPUT) if isinstance(outputs, dict) else None
    return torch.zeros(()) if value is None else value


def _collect(model: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    # a training call carries its own list for the layers' balance terms
    return (args, {**kwargs, AUX: []}) if model.training else None


def _add_aux_loss(model: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
    values = kwargs.get(AUX)
    if not model.training or not values:
        return output
    coef = next(v for v in getattr(moh_layers(model)[0], ATTACHED) if v.name == MoH.name).aux_loss_coef
    aux = coef * torch.stack([v.to(values[0].device) for v in values]).mean()
    if isinstance(output, dict):
        if output.get("loss") is not None:
            output["loss"] = output["loss"] + aux.to(output["loss"].dtype)
        output[OUTPUT] = aux
    elif isinstance(output, tuple) and kwargs.get("labels") is not None and output and torch.is_tensor(output[0]) and output[0].ndim == 0:
        output = (output[0] + aux.to(output[0].dtype),) + output[1:]
    return output


def _register_aux_hook(model: nn.Module) -> None:
    if not getattr(model, HOOKED, False):
        model.register_forward_pre_hook(_collect, with_kwargs=True)
        model.register_forward_hook(_add_aux_loss, with_kwargs=True)
        setattr(model, HOOKED, True)


# Query tokens from which MoH inference computes only the selected (token, head) pairs
# (`hf-relattn bench kernels --suite moh`: below ~256 the per-head calls cost more than they save).
ROUTED_MIN_TOKENS = 256
# Selected query rows per masked SDPA call of the head-routed path (padding, cached prefixes).
ROUTED_QUERY_ROWS = 512
# Positions per window of the head-routed causal path.
ROUTED_WINDOW = 256


def head_routed_attention(call: AttnCall, used: torch.Tensor) -> torch.Tensor:
    """Inference for heads chosen per token (MoH): only the (token, head) pairs in `used`
    (B, Q, H) are computed, each over all keys (causal by original position); the others get
    zeros. Returns (B, Q, H, D).

    Heads every token uses run as one plain SDPA call. Causal without padding, the other heads
    go by windows of ROUTED_WINDOW positions, all heads at once (`_windowed_causal`).
    Otherwise (padding, a cached prefix, encoders): per head, masked calls on runs of its tokens."""
    query, key, value, mask, causal, scale = call.query, call.key, call.value, call.mask, call.causal, call.scale
    batch, heads, q_len, _ = query.shape
    k_len, groups = key.shape[2], heads // key.shape[1]
    offset = k_len - q_len
    out = query.new_zeros(batch, heads, q_len, value.shape[-1])
    flash = CPU_FLASH
    windowed = causal and mask is None and offset == 0 and flash is not None and query.device.type == "cpu"
    for b in range(batch):
        counts = used[b].sum(0)
        full = (counts == q_len).nonzero().squeeze(-1) if mask is None and (offset == 0 or q_len == 1) else counts[:0]
        if full.numel():  # heads every token uses
            hs, kv = _head_run(full), _head_run(full // groups)
            out[b, hs] = F.scaled_dot_product_attention(query[b : b + 1, hs], key[b : b + 1, kv], value[b : b + 1, kv],
                                                        is_causal=causal and q_len > 1, scale=scale)[0]
        partial = ((counts > 0) & (counts < q_len)).nonzero().squeeze(-1) if full.numel() else (counts > 0).nonzero().squeeze(-1)
        if windowed and partial.numel():
            hs, kv = _head_run(partial), _head_run(partial // groups)
            out[b, hs] = _windowed_causal(query[b, hs], used[b][:, hs], key[b, kv], value[b, kv], scale, flash)
            continue
        for h in partial.tolist():
            rows = used[b, :, h].nonzero().squeeze(-1)
            k, v = key[b : b + 1, h // groups : h // groups + 1], value[b : b + 1, h // groups : h // groups + 1]
            parts = []
            for start in range(0, rows.numel(), ROUTED_QUERY_ROWS):
                r = rows[start : start + ROUTED_QUERY_ROWS]
                last = int(r[-1]) + offset + 1 if causal else k_len
                keep = None if mask is None else mask[b : b + 1, :, r if mask.shape[-2] > 1 else slice(None), :last]
                if causal:
                    order = torch.arange(last, device=query.device)[None, :] <= (r + offset)[:, None]
                    keep = order if keep is None else keep & order
                parts.append(F.scaled_dot_product_attention(query[b : b + 1, h : h + 1, r], k[:, :, :last], v[:, :, :last],
                                                            attn_mask=float_mask(keep, query.dtype), scale=scale))
            out[b, h].index_copy_(0, rows, torch.cat(parts, dim=2)[0, 0])
    return out.transpose(1, 2)


def _head_run(index: torch.Tensor) -> torch.Tensor | slice:
    """Head indices as a slice when they are one ascending run (no copy), else as given."""
    first, n = int(index[0]), index.numel()
    return slice(first, first + n) if bool((index == torch.arange(first, first + n, device=index.device)).all()) else index


def _windowed_causal(q: torch.Tensor, used: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, flash: Any) -> torch.Tensor:
    """Causal attention of heads over their own tokens: q, k, v (H, T, D), used (T, H) ->
    (H, T, D), zero where unused. By windows of ROUTED_WINDOW positions: each window's chosen
    queries (padded to the window's largest count over heads) read the keys before the window
    without a mask, in one call for all heads, and the window's own keys with a small causal
    mask, in one call for all windows; the two are merged by log-sum-exp (the CPU flash
    kernel returns it; inference only)."""
    size = ROUTED_WINDOW
    heads, length, dim = q.shape
    count = -(-length // size)
    chosen = F.pad(used.t(), (0, count * size - length)).view(heads, count, size)
    slot = chosen.cumsum(-1) - 1  # rank of a chosen token among its window's, per head
    width = chosen.sum(-1).amax(0)  # (windows,) queries per window after padding
    h_idx, w_idx, t_idx = chosen.nonzero(as_tuple=True)
    s_idx = slot[h_idx, w_idx, t_idx]
    most = int(width.max())
    qw = q.new_zeros(count, heads, most, dim)
    qw[w_idx, h_idx, s_idx] = q[h_idx, w_idx * size + t_idx]
    reach = torch.full((count, heads, most), -1, dtype=torch.long, device=q.device)
    reach[w_idx, h_idx, s_idx] = t_idx
    near = float_mask(torch.arange(size, device=q.device) <= reach[..., None], q.dtype)
    pad = count * size - length
    kw, vw = ((F.pad(t, (0, 0, 0, pad)) if pad else t).view(heads, count, size, dim).transpose(0, 1) for t in (k, v))
    merged, lse = flash(qw, kw, vw, 0.0, False, attn_mask=near, scale=scale)
    for w in range(1, count):
        n = int(width[w])
        if n == 0:
            continue
        o1, l1 = flash(qw[w : w + 1, :, :n], k[None, :, : w * size], v[None, :, : w * size], 0.0, False, scale=scale)
        o2, l2 = merged[w : w + 1, :, :n], lse[w : w + 1, :, :n]
        top = torch.maximum(l1, l2)
        w1, w2 = (l1 - top).exp_()[..., None], (l2 - top).exp_()[..., None]
        merged[w : w + 1, :, :n] = (o1 * w1 + o2 * w2) / (w1 + w2)
    out = q.new_zeros(heads, count * size, v.shape[-1])
    out[h_idx, w_idx * size + t_idx] = merged[w_idx, h_idx, s_idx]
    return out[:, :length]

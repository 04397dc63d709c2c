"""GQA / MQA uptraining: Ainslie et al. 2023, "GQA: Training Generalized Multi-Query
Transformer Models from Multi-Head Checkpoints" (EMNLP 2023); MQA: Shazeer 2019, "Fast
Transformer Decoding: One Write-Head is All You Need"; aligned merging: Jin, Song, Zhou & Qin
2024, "Align Attention Heads Before Merging Them: An Effective Way for Converting MHA to GQA"
(arXiv 2412.20677).

Weight surgery on the key and value projections. Query head i uses K/V head i // (H / G)
(contiguous groups, as transformers' `repeat_kv`). Each new K/V head is initialised from the
heads its group replaces:
- "aligned" (default when `batches=` are given): heads are merged after being aligned by the
  maps the model cannot see (Jin et al. 2024): a key head k -> A k is folded into the queries
  that read it (q -> A^-T q keeps q.k; with rotary embeddings A may only be a scaled rotation
  inside each rotary plane, which commutes with RoPE), a value head v -> B v into those
  queries' output projection columns (W_o -> W_o B^-1). The maps are fitted on calibration
  activations by least squares: the merged head is the common head that explains every
  member best through such maps, in the metric of what reads it (the queries' energy for
  keys, W_o^T W_o for values): per rotary plane the weighted complex principal component of
  the members' planes, else the weighted principal subspace of their concatenated outputs.
  Each original head's map from the merged head (least squares) is then folded in, which
  also restores the scale an average loses. Exact when a group's heads are such maps of one
  another.
- "procrustes" (the paper's alignment, an ablation): orthogonal Procrustes onto the group's
  first head then its mean (rotations only inside rotary planes), average, then the same
  least-squares folds (which restore the merged head's scale).
- "mean" (the GQA paper's choice): mean of the group's original heads;
- "first": the group's first head (the paper's ablation);
- "random": fresh N(0, initializer_range) weights and zero bias (the paper's ablation).
The source may itself be grouped (SmolLM2: 9 query / 3 K/V heads): the original K/V head of
every query head is expanded first, so 3 -> 1 pools the existing groups (weighted by the query
heads reading each) and any G dividing H works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..batches import batch_list, eval_mode, on_device, token_mask
from .base import MAX_TABLE_ROWS, Variant, check_choice, check_int_options, register_variant

if TYPE_CHECKING:
    from ..patches import FamilyAdapter

INITS = ("aligned", "procrustes", "mean", "first", "random")
FITTED = ("aligned", "procrustes")  # inits fitted on calibration batches
ALIGN_ITERATIONS = 4  # generalised Procrustes rounds against the group mean (after one onto the first head)


def regroup_heads(weight: torch.Tensor, num_heads: int, num_kv_heads: int, groups: int, init: str) -> torch.Tensor:
    """K/V projection rows (num_kv_heads * D, ...) -> (groups * D, ...) per `init` ("mean"/"first")."""
    rest = weight.shape[1:]
    per_kv = weight.reshape(num_kv_heads, -1, *rest)
    # K/V head used by each query head in the source model
    per_query = per_kv[torch.arange(num_heads, device=weight.device) // (num_heads // num_kv_heads)]
    grouped = per_query.reshape(groups, num_heads // groups, *per_query.shape[1:])
    out = grouped.float().mean(dim=1) if init == "mean" else grouped[:, 0]
    return out.reshape(-1, *rest).to(weight.dtype)


def kv_grams(model: nn.Module, adapter: FamilyAdapter, layers: list[int], batches: list[Any]) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per layer, the float64 Gram matrices X^T X of the key, value and query projections' outputs
    over the real tokens of `batches` (X: tokens x (K/V heads * D)); the model is only run."""
    modules = adapter.attention_modules(model)
    grams: dict[int, list[torch.Tensor | None]] = {idx: [None, None, None] for idx in layers}
    valid: list[torch.Tensor | None] = [None]

    def record(idx: int, which: int, rows: torch.Tensor | None, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        x = output.detach().double().flatten(0, -2)
        if rows is not None:  # one part of a fused projection
            x = x[:, rows.to(x.device)]
        if valid[0] is not None:
            x = x[valid[0].flatten().to(x.device)]
        gram = (x.T @ x).cpu()
        grams[idx][which] = gram if grams[idx][which] is None else grams[idx][which] + gram

    # sites in (query, key, value) order, recorded as (key, value, query)
    handles = [site.register_forward_hook(partial(record, idx, which, rows))
               for idx in layers
               for which, (site, rows) in zip((2, 0, 1), adapter.projection_sites(modules[idx]))]
    device = next(model.parameters()).device
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                valid[0] = token_mask(batch)
                model(**on_device({k: v for k, v in batch.items() if k != "labels"}, device))
    finally:
        for handle in handles:
            handle.remove()
    return {idx: tuple(g) for idx, g in grams.items()}


def _procrustes(m: torch.Tensor, planes: list[tuple[int, int]] | None) -> torch.Tensor:
    """The orthogonal R maximising tr(R^T m) (so X R is closest to a target Y when m = X^T Y);
    with `planes`, R is restricted to a rotation inside each plane (a, b)."""
    if planes is None:
        u, _, vh = torch.linalg.svd(m)
        return u @ vh
    a, b = (torch.tensor(p) for p in zip(*planes))
    angle = torch.atan2(m[b, a] - m[a, b], m[a, a] + m[b, b])
    rot = torch.zeros_like(m)
    rot[a, a], rot[b, b] = torch.cos(angle), torch.cos(angle)
    rot[a, b], rot[b, a] = -torch.sin(angle), torch.sin(angle)
    return rot


def _align_group(block: dict[tuple[int, int], torch.Tensor], members: list[int], counts: list[int],
                 planes: list[tuple[int, int]] | None) -> dict[int, torch.Tensor]:
    """Orthogonal maps R_j (row convention: head j's aligned outputs are X_j R_j) for the heads
    `members` of one group, weighted by `counts`: generalised Procrustes from the Gram blocks
    X_i^T X_j, first onto the first head, then onto the weighted mean of the aligned heads."""
    total = float(sum(counts))
    first = members[0]
    eye = torch.eye(block[first, first].shape[0], dtype=block[first, first].dtype)
    rot = {j: eye if j == first else _procrustes(block[j, first], planes) for j in members}
    for _ in range(ALIGN_ITERATIONS if len(members) > 1 else 0):
        rot = {i: _procrustes(sum(c * block[i, j] @ rot[j] for j, c in zip(members, counts)) / total, planes) for i in members}
    return rot


def _regression(cov: torch.Tensor, cross: torch.Tensor, planes: list[tuple[int, int]] | None) -> torch.Tensor:
    """N minimising |X_j - X_m N|^2 from cov = X_m^T X_m and cross = X_m^T X_j (ridge 1e-6 of the
    mean energy); with `planes`, N is a scaled rotation inside each plane (it commutes with RoPE)."""
    dim = cov.shape[0]
    ridge = 1e-6 * float(torch.diagonal(cov).mean()) + 1e-30
    if planes is None:
        return torch.linalg.solve(cov + ridge * torch.eye(dim, dtype=cov.dtype), cross)
    out = torch.zeros_like(cov)
    turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=cov.dtype)
    basis = (torch.eye(2, dtype=cov.dtype), turn)
    for a, b in planes:
        c, p = cov[[a, b]][:, [a, b]], cross[[a, b]][:, [a, b]]
        lhs = torch.tensor([[float(torch.trace(e.T @ c @ f)) for f in basis] for e in basis], dtype=cov.dtype)
        rhs = torch.tensor([float(torch.trace(e.T @ p)) for e in basis], dtype=cov.dtype)
        x, y = torch.linalg.solve(lhs + ridge * torch.eye(2, dtype=cov.dtype), rhs).tolist()
        out[[a, a, b, b], [a, b, a, b]] = torch.tensor([x, -y, y, x], dtype=cov.dtype)
    return out


def _principal_merge(block: dict[tuple[int, int], torch.Tensor], members: list[int], dim: int,
                     planes: list[tuple[int, int]] | None, metric: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Maps T_j (row convention) of the merged head X_m = sum_j X_j T_j that best explains every
    member through its own hidden map: minimises sum_j |X_j - X_m N_j|^2 in the metric of the
    heads reading j (queries' covariance for keys, W_o^T W_o for values). Without `planes` N_j
    is any linear map and X_m spans the metric-weighted principal subspace of the members'
    concatenated outputs; with rotary `planes` N_j is a complex scalar per plane (a scaled
    rotation, which commutes with RoPE) and each plane of X_m is the weighted complex principal
    component of that plane across the members."""
    n = len(members)
    gram = torch.cat([torch.cat([block[i, j] for j in members], 1) for i in members], 0)
    if planes is None:
        ridge = 1e-8 * float(torch.diagonal(gram).mean()) + 1e-30
        low = torch.linalg.cholesky(gram + ridge * torch.eye(n * dim, dtype=gram.dtype))
        weight = torch.block_diag(*[metric[j] for j in members])
        _, vecs = torch.linalg.eigh(low.T @ weight @ low)
        maps = torch.linalg.solve_triangular(low.T, vecs[:, -dim:], upper=True)  # X_m = X_cat L^-T V_top
        return {j: maps[x * dim:(x + 1) * dim] for x, j in enumerate(members)}
    maps = {j: torch.zeros(dim, dim, dtype=gram.dtype) for j in members}
    for a, b in planes:
        # plane (a, b) of head x as the complex signal z_x = X[:, a] + i X[:, b]; cov[x, y] = E z_x conj(z_y)
        ia = [x * dim + a for x in range(n)]
        ib = [x * dim + b for x in range(n)]
        real = gram[ia][:, ia] + gram[ib][:, ib]
        imag = gram[ib][:, ia] - gram[ia][:, ib]
        scale = torch.tensor([float(metric[j][a] + metric[j][b]) for j in members], dtype=gram.dtype).clamp(min=1e-30).sqrt()
        cov = torch.complex(real, imag) * (scale[:, None] * scale[None, :])
        _, vecs = torch.linalg.eigh(cov)
        coef = vecs[:, -1].conj() * scale  # z_m = sum_x coef_x z_x
        for x, j in enumerate(members):
            re, im = float(coef[x].real), float(coef[x].imag)
            # z -> c z acts on the row (X_a, X_b) as [[re, im], [-im, re]]
            maps[j][[a, a, b, b], [a, b, a, b]] = torch.tensor([re, im, -im, re], dtype=gram.dtype)
    return maps


def align_and_merge(projections: tuple[nn.Linear, nn.Linear, nn.Linear], out_proj: nn.Linear, grams: tuple[torch.Tensor, ...],
                    heads: int, kv_heads: int, groups: int, dim: int, planes: list[tuple[int, int]] | None,
                    method: str) -> dict[str, torch.Tensor]:
    """New K/V projection weights (and biases) of `groups` merged heads, keyed "key.weight",
    "value.bias", ...; the query projection rows and output projection columns are refitted in place.

    Per group the merged head is X_m = sum_j X_j T_j over the group's original heads j:
    "procrustes" averages the heads after aligning them (T_j = c_j R_j / n, R_j orthogonal,
    c_j the query heads reading j), "aligned" takes the best common head (`_principal_merge`).
    Then every original head is expressed by the merged one with the least-squares map
    X_j ~ X_m N_j (a scaled rotation per plane for rotary keys), folded where the model reads
    head j: queries q -> N_j q (q.k_j ~ (N_j q).k_m), output columns W_o -> W_o N_j^T. This
    also restores each head's scale, which averaging shrinks where heads disagree; it is exact
    when the heads are hidden maps of one another (then X_j = X_m N_j)."""
    q = projections[0]
    per_group = heads // groups
    source = [h // (heads // kv_heads) for h in range(heads)]  # original K/V head of each query head
    query_gram = grams[2].double()
    out_weight = out_proj.weight.double()
    merged: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for which, (name, proj) in enumerate(zip(("key", "value"), projections[1:])):
            weight = proj.weight.double().reshape(kv_heads, dim, -1)
            bias = proj.bias.double().reshape(kv_heads, dim) if proj.bias is not None else None
            gram = grams[which].double()
            block = {(i, j): gram[i * dim:(i + 1) * dim, j * dim:(j + 1) * dim] for i in range(kv_heads) for j in range(kv_heads)}
            geometry = planes if which == 0 else None
            fold_rows: list[tuple[int, torch.Tensor]] = []
            for g in range(groups):
                queries = list(range(g * per_group, (g + 1) * per_group))
                members = sorted({source[h] for h in queries})
                readers = {j: [h for h in queries if source[h] == j] for j in members}
                if method == "procrustes":
                    rot = _align_group(block, members, [len(readers[j]) for j in members], geometry)
                    maps = {j: rot[j] * len(readers[j]) / per_group for j in members}
                else:
                    def cols(h: int) -> slice:
                        return slice(h * dim, (h + 1) * dim)
                    if which == 1:  # values: error seen through the readers' output columns
                        metric = {j: sum(out_weight[:, cols(h)].T @ out_weight[:, cols(h)] for h in readers[j]) for j in members}
                    elif geometry is None:  # keys: error seen through the readers' queries
                        metric = {j: sum(query_gram[cols(h), cols(h)] for h in readers[j]) for j in members}
                    else:  # rotary keys: the readers' query energy per dimension
                        metric = {j: sum(torch.diagonal(query_gram[cols(h), cols(h)]) for h in readers[j]) for j in members}
                    maps = _principal_merge(block, members, dim, geometry, metric)
                merged.setdefault(name + ".weight", []).append(sum(maps[j].T @ weight[j] for j in members))
                if bias is not None:
                    merged.setdefault(name + ".bias", []).append(sum(maps[j].T @ bias[j] for j in members))
                cov = sum(maps[i].T @ block[i, j] @ maps[j] for i in members for j in members)
                fits = {j: _regression(cov, sum(maps[i].T @ block[i, j] for i in members), geometry) for j in members}
                fold_rows += [(h, fits[source[h]]) for h in queries]
            for h, fit in fold_rows:
                rows = slice(h * dim, (h + 1) * dim)
                if which == 0:  # queries: q -> N q
                    q.weight[rows] = (fit @ q.weight[rows].double()).to(q.weight.dtype)
                    if q.bias is not None:
                        q.bias[rows] = (fit @ q.bias[rows].double()).to(q.bias.dtype)
                else:  # output columns: W_o -> W_o N^T
                    out_proj.weight[:, rows] = (out_proj.weight[:, rows].double() @ fit.T).to(out_proj.weight.dtype)
    return {k: torch.cat(v) for k, v in merged.items()}


@register_variant
@dataclass
class GQA(Variant):
    num_key_value_heads: int | None = None
    init: str | None = None
    batches: Any = field(default=None, repr=False)

    name = "gqa"
    heads_from_config = True
    axis = "structure"
    description = ("Grouped-query attention: K/V heads merged into G groups, aligned by Procrustes first when "
                   "calibration batches are given, else mean-pooled (uptraining recipe).")
    paper = ("Ainslie et al. 2023, GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints; "
             "Jin et al. 2024, Align Attention Heads Before Merging Them")

    def options(self) -> dict[str, Any]:
        options = super().options()
        options.pop("batches")  # only used to fit the alignment at conversion
        return options

    @classmethod
    def fits_on_batches(cls, options: dict[str, Any]) -> bool:
        return options.get("init") in (None, *FITTED)
    limits = (
        "K/V heads are pooled from a multi-head checkpoint: quality needs uptraining (Ainslie et al. "
        "2023 use about 5% of the pre-training compute)."
    )

    def check_options(self) -> None:
        super().check_options()
        if self.num_key_value_heads is None:
            raise ValueError(f"{self.name}: num_key_value_heads is required: an integer G, the number of K/V heads")
        check_int_options(self, "num_key_value_heads", maximum=MAX_TABLE_ROWS)
        if self.init is not None:
            check_choice(self, "init", INITS)
            if self.batches is not None and self.init not in FITTED:
                raise ValueError(f"{self.name}: batches= is only used with init='aligned' or 'procrustes' (got init={self.init!r})")

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        if adapter.gqa_refused:
            from ..patches import ADAPTERS

            valid = ", ".join(sorted(name for name, a in ADAPTERS.items() if not a.gqa_refused))
            raise ValueError(f"{self.name}: not for {adapter.model_type}: {adapter.gqa_refused}; valid families: {valid}")
        groups = self.num_key_value_heads
        modules = adapter.attention_modules(model)
        # each layer's own config: CLIPModel's towers have their own head counts
        for heads in sorted({adapter.num_heads(modules[idx].config) for idx in layers if idx < len(modules)}):
            if heads % groups:
                divisors = [g for g in range(1, heads + 1) if heads % g == 0]
                raise ValueError(
                    f"{self.name}: num_key_value_heads={groups} does not divide the {heads} attention heads; "
                    f"valid values: {divisors}"
                )

    def validate(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int]) -> None:
        self.check_model(model, adapter, layers)
        if self.init is None:
            self.init = "aligned" if self.batches is not None else "mean"
        if self.init in FITTED:
            self._grams = kv_grams(model, adapter, layers, batch_list(self.batches, f"{self.name} init='aligned'"))
        self.batches = None

    def native(self, adapter: FamilyAdapter, num_layers: int, layers: list[int]) -> bool:
        """On every layer of a family whose config has num_key_value_heads, the result is native."""
        return adapter.native_gqa and sorted(layers) == list(range(num_layers))

    def apply(self, model: nn.Module, adapter: FamilyAdapter, layers: list[int], initialize: bool) -> None:
        groups = self.num_key_value_heads
        modules = adapter.attention_modules(model)
        grams = getattr(self, "_grams", None) if initialize else None
        self._grams = None
        for idx in layers:
            attn = modules[idx]
            config = attn.config  # the layer's own config (CLIPModel: its tower's sizes)
            heads, head_dim = adapter.num_heads(config), adapter.head_dim(config)
            std = getattr(config, "initializer_range", 0.02)
            kv_heads = adapter.num_kv_heads(attn)
            projections = adapter.projections(attn)  # copies where the family fuses them
            aligned = None
            if self.init in FITTED and initialize:
                if grams is None:
                    raise RuntimeError(f"{self.name}: init={self.init!r} is fitted in validate(); convert() runs it")
                out = adapter.output_projections(model)[idx]
                out_linear = adapter.as_linear(out)
                aligned = align_and_merge(projections, out_linear, grams[idx], heads, kv_heads, groups, head_dim,
                                          adapter.rope_planes(config), self.init)
                if out_linear is not out:
                    adapter.set_output_projection(model, idx, out_linear)
            merged = []
            for role, old in zip(("key", "value"), projections[1:]):
                new = nn.Linear(
                    old.in_features,
                    groups * head_dim,
                    bias=old.bias is not None,
                    device=old.weight.device,
                    dtype=old.weight.dtype,
                )
                if initialize:
                    with torch.no_grad():
                        if aligned is not None:
                            new.weight.copy_(aligned[role + ".weight"])
                            if new.bias is not None:
                                new.bias.copy_(aligned[role + ".bias"])
                        elif self.init == "random":
                            new.weight.normal_(0.0, std)
                            if new.bias is not None:
                                new.bias.zero_()
                        else:  # "mean" / "first"
                            new.weight.copy_(regroup_heads(old.weight, heads, kv_heads, groups, self.init))
                            if new.bias is not None:
                                new.bias.copy_(regroup_heads(old.bias, heads, kv_heads, groups, self.init))
                new.weight.requires_grad_(old.weight.requires_grad)
                if new.bias is not None:
                    new.bias.requires_grad_(old.bias.requires_grad)
                merged.append(new)
            adapter.set_projections(attn, projections[0], *merged)
            adapter.set_num_kv_heads(attn, groups)
        if self.native(adapter, len(modules), layers):
            adapter.set_config_kv_heads(model.config, groups)


@register_variant
@dataclass
class MQA(GQA):
    num_key_value_heads: int | None = 1

    name = "mqa"
    description = "Multi-query attention: one shared K/V head (GQA with G=1), aligned first with calibration batches."
    paper = "Shazeer 2019, Fast Transformer Decoding: One Write-Head is All You Need; Ainslie et al. 2023 (uptraining)"
    limits = (
        "One K/V head pooled from many: quality needs uptraining (Ainslie et al. 2023 use about 5% of "
        "the pre-training compute)."
    )

    def spec_name(self) -> str:
        return GQA.name

    def check_options(self) -> None:
        if self.num_key_value_heads != 1:
            raise ValueError(f"mqa means num_key_value_heads=1 (got {self.num_key_value_heads}); use 'gqa' for G > 1")
        super().check_options()

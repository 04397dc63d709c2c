"""FlashAttention on the CPU for patterns made of key windows, forward and backward (Dao et al.
2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness": online
softmax, the log-sum-exp kept, probabilities recomputed in the backward).

Queries go in blocks of R tokens: (nb, H, R, D) views of each sample's (H, T, D) queries, in
whatever layout the model made them (transformers' (B, T, H, D) memory), no copy. A `Piece`
pairs a run of query blocks with one window of keys per block: block i reads the keys
[start + i * step, + length) of its key source, an `as_strided` view (step R slides a band along
the diagonal, step 0 gives every block the same keys: attention sinks); the source is the keys
themselves, or a small zero-padded copy where windows reach past either end of the sequence.
torch's CPU flash kernel computes a piece (its GQA heads natively, under a mask shared by the
blocks or one per block); pieces over the same queries are merged by their log-sum-exps. The
backward calls the kernel's backward per piece with the merged output and log-sum-exp, which are
what each piece's probabilities are under the whole softmax (FlashAttention's backward over
split keys), and adds the key gradients back through the same windows. Memory: the output, its
log-sum-exp, the gradients (O(T)), and per kernel call what the kernel holds; the backward runs
in chunks of blocks so the windows' key gradients stay under FLASH_CHUNK_ELEMENTS.

Choices made per query row (MoBA's per-token gate: Lu et al. 2025) are a `Picks`, the transpose:
key-block-major, as MoBA's variable-length kernels, each key block (a view of K/V) attended by
the rows that chose it (gathered), the rows' partials merged by log-sum-exp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from ..call import AttnCall

FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# Floats of output (forward) or windowed key gradients (backward) one kernel call may return.
FLASH_CHUNK_ELEMENTS = 1 << 20
# Tokens from which a band pattern runs on these kernels (shorter calls: the block-sparse path).
FLASH_MIN_TOKENS = 512
# Query rows per block: a band's window is before + rows + after keys wide.
FLASH_ROWS = 64
# Window widths in keys are made multiples of this (the kernel's vector loads over key tiles).
ALIGN_KEYS = 16
# A Picks backward takes every head's rows of a key block in one call when real rows fill at
# least this share of the padded (heads x most rows) call.
PICKS_SHARED_FILL = 0.75


@dataclass(frozen=True)
class Piece:
    """Query blocks [first, first + count); the window of block first + n is the keys
    [start + n * step, + length) of the key source: the keys themselves, or (`copy` = (p0, p1))
    the keys at positions p0 .. p1 - 1, zero where outside the sequence. `mask`: additive,
    (1 | count, 1, R, length), or None; `causal`: the kernel's own (row r sees window keys up to
    r); `empty` (1 | count, 1, R): rows that see no key of this piece."""

    first: int
    count: int
    start: int
    step: int
    length: int
    mask: torch.Tensor | None = None
    causal: bool = False
    empty: torch.Tensor | None = None
    copy: tuple[int, int] | None = None
    # (count, P) key blocks of `step` keys each block reads (gathered: copies, chunk by chunk),
    # instead of a window; length = P * step
    index: torch.Tensor | None = None
    # positions between consecutive rows of a query block and keys of a window: 1, or s for
    # residue classes (block r = positions r, r + s, ...; windows step over keys s apart)
    spread: int = 1

    def part(self, a: int, b: int) -> Piece:
        """Blocks [first + a, first + b) of this piece."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return t[a:b] if t is not None and t.shape[0] > 1 else t
        return replace(self, first=self.first + a, count=b - a, start=self.start + a * self.step, mask=cut(self.mask),
                       empty=cut(self.empty), index=cut(self.index))


@dataclass(frozen=True)
class Picks:
    """The transpose of a Piece, for choices made per query row (MoBA's per-token gate): query
    rows [first, first + n) each read whole key blocks of `size` keys (block j: keys
    [j * size, + size)), without a mask. Computed key block by key block, as the paper's
    variable-length kernels do: per query head, one kernel call per key block over the rows that
    chose it (gathered, in position order) against a view of the block; each row then merges its
    k partials at once. Build with `Picks.of`."""

    first: int
    size: int
    rows: tuple[torch.Tensor, ...]  # per head: the (row, block) pairs' rows as positions, sorted by block
    spans: tuple[tuple[tuple[int, int, int], ...], ...]  # per head: (block, start, end) of each block's pairs
    slot: torch.Tensor  # (H, n, k): each row's pairs as indices into its head's pairs (n * k: no block)

    @classmethod
    def of(cls, first: int, blocks: torch.Tensor, size: int) -> Picks:
        """`blocks` (H, n, k): the key blocks row first + r of query head h reads (-1: none)."""
        heads, n, width = blocks.shape
        flat = blocks.flatten(1)
        taken = flat >= 0
        # a stable sort by block keeps each block's rows in position order
        order = torch.sort(torch.where(taken, flat, torch.iinfo(flat.dtype).max), dim=1, stable=True).indices
        slot = torch.empty_like(flat).scatter_(1, order, torch.arange(n * width, device=flat.device).expand(heads, -1))
        slot = slot.masked_fill(~taken, n * width)
        last = int(blocks.max()) + 1
        counts = torch.zeros(heads, max(last, 1), dtype=torch.long, device=flat.device)
        counts.scatter_add_(1, flat.clamp(min=0), taken.long())
        rows, spans = [], []
        for h, per_block in enumerate(counts.tolist()):
            ends = [sum(per_block[: j + 1]) for j in range(len(per_block))]
            spans.append(tuple((j, e - c, e) for j, (c, e) in enumerate(zip(per_block, ends)) if c))
            rows.append(order[h, : ends[-1]] // width + first)
        return cls(first, size, tuple(rows), tuple(spans), slot.view(heads, n, width))

    def by_block(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per key block, every head's rows that chose it: (block, rows (H, L) padded with row
        `first`, valid (H, L)) (the backward's calls)."""
        where: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for h, (span, rows) in enumerate(zip(self.spans, self.rows)):
            for j, s, e in span:
                where.setdefault(j, []).append((h, rows[s:e]))
        heads, device = len(self.rows), self.slot.device
        calls = []
        for j in sorted(where):
            index = torch.full((heads, max(r.shape[0] for _, r in where[j])), self.first, dtype=torch.long, device=device)
            valid = torch.zeros(index.shape, dtype=torch.bool, device=device)
            for h, r in where[j]:
                index[h, : r.shape[0]] = r
                valid[h, : r.shape[0]] = True
            calls.append((j, index, valid))
        return calls


def source(keys: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's key source from one sample's keys (Hk, T, D)."""
    if piece.copy is None:
        return keys
    p0, p1 = piece.copy
    lo, hi = max(p0, 0), min(p1, keys.shape[1])
    return F.pad(keys[:, lo:hi], (0, 0, lo - p0, p1 - hi))


def _view(t: torch.Tensor, piece: Piece, offset: int = 0, width: int | None = None) -> torch.Tensor:
    """(count, Hk, width, D) strided view of t (Hk, S, D): block n's keys start at row
    start + offset + n * step and lie `spread` rows apart."""
    hk, _, dim = t.shape
    s_h, s_t, s_d = t.stride()
    return t.as_strided((piece.count, hk, piece.length if width is None else width, dim),
                        (piece.step * s_t, s_h, piece.spread * s_t, s_d), t.storage_offset() + (piece.start + offset) * s_t)


def _gathered(t: torch.Tensor, piece: Piece) -> tuple[torch.Tensor, torch.Tensor]:
    """t (Hk, S, D) as key blocks of `step` rows (a view), and the index (count * P,) that picks
    the piece's blocks from it."""
    return t[:, : t.shape[1] // piece.step * piece.step].unflatten(1, (-1, piece.step)), piece.index.flatten()


def windows(src: torch.Tensor, piece: Piece) -> torch.Tensor:
    """(count, Hk, length, D) windows of the piece in its key source (Hk, S, D): a view, or for
    gathered key blocks a copy."""
    if piece.index is None:
        return _view(src, piece)
    blocks, index = _gathered(src, piece)
    picked = blocks.index_select(1, index)  # (Hk, count * P, step, D)
    return picked.view(src.shape[0], piece.count, piece.length, src.shape[-1]).transpose(0, 1)


def add_windows(target: torch.Tensor, grads: torch.Tensor, piece: Piece) -> None:
    """Add the windows' gradients (as `windows` gives them) to the key source's (Hk, S, D)."""
    if piece.index is not None:
        blocks, index = _gathered(target, piece)
        blocks.index_add_(1, index, grads.transpose(0, 1).reshape(target.shape[0], -1, piece.step, target.shape[-1]))
    elif piece.step == 0:  # every block read the same keys
        target[:, piece.start : piece.start + piece.length] += grads.sum(0)
    elif piece.spread > 1:  # residue classes: the windows do not overlap
        _view(target, piece).add_(grads)
    else:
        for s in range(0, piece.length, piece.step):  # within one sub-block the windows do not overlap
            width = min(piece.step, piece.length - s)
            _view(target, piece, s, width).add_(grads[:, :, s : s + width])


class PieceAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v over the union of the pieces' keys (see the module doc), with an
    optional sink logit per query head in every denominator; q (B, H, T, D), k/v (B, Hk, T, D),
    T a multiple of `rows` (and of a residue piece's spread); returns (B, H, T, D) (a view of
    (B, T, H, D) memory). `plan`: one sequence of pieces for every sample, or one per sample
    (choices that depend on the data)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Sequence[Any], rows: int,
                scale: float, logit: torch.Tensor | None) -> torch.Tensor:
        batch, heads, length, dim = q.shape
        out = q.new_empty(batch, length, heads, dim).transpose(1, 2)  # the kernel's own output layout
        lse = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
        for b in range(batch):
            seen = [False] * (length // rows)
            for piece in _pieces_of(plan, b):
                if isinstance(piece, Picks):
                    _picks_forward(piece, q[b], k[b], v[b], out[b], lse[b], scale)
                    continue
                qv, ov, lv = (by_rows(t[b], piece, rows) for t in (q, out, lse))
                ksrc, vsrc = source(k[b], piece), source(v[b], piece)
                step = _blocks_per_call(piece, qv.shape[2] * heads * dim, k.shape[1], dim)
                for a in range(0, piece.count, step):
                    part = piece.part(a, min(piece.count, a + step))
                    at = slice(part.first, part.first + part.count)
                    o, o_lse = FORWARD(qv[at], windows(ksrc, part), windows(vsrc, part), 0.0, part.causal,
                                       attn_mask=part.mask, scale=scale)
                    if part.empty is not None:
                        o_lse = o_lse.masked_fill(part.empty, float("-inf"))
                    if part.spread == 1 and not any(seen[at]):  # a block's first piece is copied in, later ones merged
                        ov[at], lv[at] = o, o_lse
                        seen[at] = [True] * part.count
                    else:
                        _merge(ov[at], lv[at], o, o_lse)
            if not all(seen):
                raise AssertionError("every query block needs a piece of contiguous rows, before any other")
        if logit is not None:  # a logit with a zero value: only the denominator grows
            total = torch.logaddexp(lse, logit.float().view(1, heads, 1))
            out.mul_(torch.exp(lse - total)[..., None].to(out.dtype))
            lse = total
        ctx.save_for_backward(q, k, v, out, lse, logit)
        ctx.plan, ctx.rows, ctx.scale = plan, rows, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, logit = ctx.saved_tensors
        rows = ctx.rows
        batch, heads, length, dim = q.shape
        dq = q.new_zeros(batch, length, heads, dim).transpose(1, 2)
        dk, dv = (t.new_zeros(t.shape[0], t.shape[2], t.shape[1], dim).transpose(1, 2) for t in (k, v))
        for b in range(batch):
            for piece in _pieces_of(ctx.plan, b):
                if isinstance(piece, Picks):
                    _picks_backward(piece, grad[b], q[b], k[b], v[b], out[b], lse[b], dq[b], dk[b], dv[b], ctx.scale)
                    continue
                qv, gv_rows, ov, lv, dqv = (by_rows(t[b], piece, rows) for t in (q, grad, out, lse, dq))
                ksrc, vsrc = source(k[b], piece), source(v[b], piece)
                gk_src = dk[b] if piece.copy is None else torch.zeros_like(ksrc)
                gv_src = dv[b] if piece.copy is None else torch.zeros_like(vsrc)
                step = _blocks_per_call(piece, qv.shape[2] * heads * dim, k.shape[1], dim)
                for a in range(0, piece.count, step):
                    part = piece.part(a, min(piece.count, a + step))
                    at = slice(part.first, part.first + part.count)
                    gq, gk, gv = BACKWARD(gv_rows[at], qv[at], windows(ksrc, part), windows(vsrc, part), ov[at], lv[at], 0.0,
                                          part.causal, attn_mask=part.mask, scale=ctx.scale)
                    dqv[at] += gq
                    add_windows(gk_src, gk, part)
                    add_windows(gv_src, gv, part)
                if piece.copy is not None:  # back from the padded copy to the keys it holds
                    p0, p1 = piece.copy
                    lo, hi = max(p0, 0), min(p1, length)
                    dk[b, :, lo:hi] += gk_src[:, lo - p0 : hi - p0]
                    dv[b, :, lo:hi] += gv_src[:, lo - p0 : hi - p0]
        dlogit = None
        if logit is not None and ctx.needs_input_grad[6]:
            # d lse / d logit = p_sink, so d loss / d logit = -sum over rows of p_sink * rowsum(dO * O)
            p_sink = torch.exp(logit.float().view(1, heads, 1) - lse)  # (B, H, T)
            dlogit = -(p_sink * (grad.float() * out.float()).sum(-1)).sum((0, 2)).to(logit.dtype)
        return dq, dk, dv, None, None, None, dlogit


def _picks_forward(piece: Picks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                   scale: float) -> None:
    """One sample's Picks (q (H, T, D), k/v (Hk, T, D)) merged into its out (H, T, D) and lse (H, T):
    per head, each block's partials kept in pair order (float32, one buffer for every head), then
    every row's k partials merged at once."""
    heads, dim = q.shape[0], q.shape[-1]
    n, width = piece.slot.shape[1:]
    at = slice(piece.first, piece.first + n)
    buffer = q.new_empty(max(r.shape[0] for r in piece.rows), dim, dtype=torch.float32)  # one for every head
    for h in range(heads):
        rows = piece.rows[h]
        pairs = rows.shape[0]
        if not pairs:
            continue
        parts = buffer[:pairs]
        logs = lse.new_full((n * width + 1,), float("-inf"))  # past the pairs: slots without a block
        for j, s, e in piece.spans[h]:
            o, o_lse = FORWARD(q[h].index_select(0, rows[s:e])[None, None],
                               *_key_block(k, v, h // (heads // k.shape[0]), j, piece.size), 0.0, False, scale=scale)
            parts[s:e], logs[s:e] = o[0, 0], o_lse[0, 0]
        running, running_lse = out[h, at], lse[h, at]
        slot = piece.slot[h]
        total = torch.logaddexp(running_lse, torch.logsumexp(logs[slot], -1))
        seen = ~torch.isneginf(total)
        merged = running if running.dtype == torch.float32 else running.float()
        merged.mul_(torch.where(seen, torch.exp(running_lse - total), 0.0)[:, None])
        weights = torch.where(seen[:, None], torch.exp(logs[slot] - total[:, None]), 0.0)
        for i in range(width):  # a slot without a block has weight 0 (and reads any pair)
            merged.addcmul_(parts[slot[:, i].clamp(max=pairs - 1)], weights[:, i, None])
        if merged is not running:
            running.copy_(merged)
        running_lse.copy_(total)


def _picks_backward(piece: Picks, grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, scale: float) -> None:
    """One sample's Picks' gradients added to its dq (H, T, D), dk and dv (Hk, T, D): per key block,
    the kernel's backward over the rows that chose it (gathered), with their merged outputs and
    log-sum-exps. The kernel's backward runs heads in parallel, not rows: where the heads chose a
    block about equally often (PICKS_SHARED_FILL), one call takes every head's rows, padded to the
    most (padding rows have a zero output gradient: nothing reaches the keys from them); otherwise
    one call per head."""
    heads, groups = q.shape[0], q.shape[0] // k.shape[0]
    for j, rows, valid in piece.by_block():
        block = slice(j * piece.size, (j + 1) * piece.size)
        counts = valid.sum(1).tolist()
        if sum(counts) >= PICKS_SHARED_FILL * valid.numel():
            calls = [(torch.arange(heads, device=q.device)[:, None], slice(None), rows, valid)]
        else:
            calls = [(torch.tensor([[h]], device=q.device), slice(h // groups, h // groups + 1), rows[h : h + 1, :c],
                      valid[h : h + 1, :c]) for h, c in enumerate(counts) if c]
        for hq, hk, r, ok in calls:
            g = grad[hq, r] * ok[..., None]
            logs = lse[hq, r].masked_fill(~ok, 0.0)  # finite: zero gradient rows stay zero
            gq, gk, gv = BACKWARD(g[None], q[hq, r][None], k[None, hk, block], v[None, hk, block], out[hq, r][None], logs[None],
                                  0.0, False, scale=scale)
            dq.index_put_((hq.expand_as(r)[ok], r[ok]), gq[0][ok], accumulate=True)
            dk[hk, block] += gk[0]
            dv[hk, block] += gv[0]


def _key_block(k: torch.Tensor, v: torch.Tensor, head: int, j: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key block j of K/V head `head` of one sample's K and V (Hk, T, D), as (1, 1, size, D) views."""
    block = slice(j * size, (j + 1) * size)
    return k[None, None, head, block], v[None, None, head, block]


def _blocks_per_call(piece: Piece, block_rows: int, kv_heads: int, dim: int) -> int:
    """Query blocks per kernel call: their outputs and their windows (gathered copies, or key
    gradients in the backward) under FLASH_CHUNK_ELEMENTS floats."""
    return max(1, FLASH_CHUNK_ELEMENTS // max(block_rows, kv_heads * piece.length * dim))


def by_rows(t: torch.Tensor, piece: Piece, rows: int) -> torch.Tensor:
    """One sample's (H, T, ...) as the piece's query blocks (nb, H, R, ...), a view: `rows`
    consecutive positions per block, or (spread s) block r = the positions r, r + s, r + 2s, ..."""
    if piece.spread == 1:
        return t.unflatten(1, (t.shape[1] // rows, rows)).transpose(0, 1)
    grouped = t.unflatten(1, (t.shape[1] // piece.spread, piece.spread))  # (H, T / s, s, ...)
    return grouped.movedim(2, 0)


def _pieces_of(plan: Sequence[Any], b: int) -> Sequence[Piece]:
    """Sample b's pieces: `plan` is one sequence of pieces, or one per sample."""
    if plan and isinstance(plan[0], Piece):
        return plan
    return plan[b]


def _merge(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor) -> None:
    """Merge a piece's (out (n, H, R, D), lse (n, H, R)) into the running ones, in place (float32 math)."""
    total = torch.logaddexp(lse, part_lse)
    seen = ~torch.isneginf(total)
    old = torch.where(seen, torch.exp(lse - total), 0.0)[..., None]
    new = torch.where(seen, torch.exp(part_lse - total), 0.0)[..., None]
    merged = out if out.dtype == torch.float32 else out.float()  # in place: no temporaries of the output's size
    merged.mul_(old).addcmul_(part_out, new)
    if merged is not out:
        out.copy_(merged)
    lse.copy_(total)


def serves(call: AttnCall) -> bool:
    """Whether these kernels compute the call exactly: CPU, no attention dropout, no cached keys,
    no mask (transformers passes none without padding or a native window), at least
    FLASH_MIN_TOKENS tokens (other calls: the caller's other paths)."""
    query, key = call.query, call.key
    return not (FORWARD is None or BACKWARD is None or query.device.type != "cpu" or call.dropout
                or call.mask is not None or key.shape[2] != query.shape[2] or query.shape[2] < FLASH_MIN_TOKENS)


def additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, R, W) bool -> (n, 1, R, W) additive mask in `dtype` (the kernel's)."""
    return torch.where(keep, torch.zeros((), dtype=dtype, device=keep.device), torch.finfo(dtype).min)[:, None]


def whole_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """q, k, v padded to whole blocks of `rows` tokens (copies only when they are not: the
    padded queries' outputs are dropped)."""
    length = query.shape[2]
    padded = -(-length // rows) * rows
    if padded == length:
        return query, key, value
    return tuple(F.pad(t, (0, 0, 0, padded - length)) for t in (query, key, value))


def sliding_pieces(nb: int, rows: int, length: int, offset: int, width: int, keep: Any, dtype: torch.dtype,
                   device: torch.device, first_shared: int = 0) -> list[Piece]:
    """Pieces giving block i the window of key positions [i * rows + offset, + width), under
    `keep(qpos (n, R, 1), kpos (n, 1, W))` among real keys for real queries (padded query rows
    see every window key from key 0 on: finite log-sum-exps, outputs dropped). Runs of blocks
    whose windows lie inside the keys and whose queries are all real are views under one mask
    (`keep` must then be the same for each: depend on kpos - qpos only); the others read a
    zero-padded copy under masks of their own, as do blocks before `first_shared` (where `keep`
    still depends on where the block is)."""
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(width, device=device)[None, :]

    def mask(i: torch.Tensor) -> torch.Tensor:
        qpos = i[:, None, None] * rows + r
        kpos = i[:, None, None] * rows + offset + c
        real = keep(qpos, kpos) & (kpos >= 0) & (kpos < length)
        return additive(real & (qpos < length) | (qpos >= length) & (kpos >= 0), dtype)

    inside = [i >= first_shared and i * rows + offset >= 0 and i * rows + offset + width <= length and (i + 1) * rows <= length
              for i in range(nb)]
    pieces, i = [], 0
    while i < nb:
        j = i
        while j < nb and inside[j] == inside[i]:
            j += 1
        if inside[i]:  # one mask for the run
            pieces.append(Piece(i, j - i, i * rows + offset, rows, width, mask(torch.tensor([i], device=device))))
        else:
            p0 = i * rows + offset
            pieces.append(Piece(i, j - i, 0, rows, width, mask(torch.arange(i, j, device=device)),
                                copy=(p0, p0 + (j - i - 1) * rows + width)))
        i = j
    return pieces


def aligned(offset: int, width: int) -> tuple[int, int]:
    """A window (offset, width) widened to the left to a multiple of ALIGN_KEYS keys, for a `keep`
    that masks the added keys: the kernel runs ragged key tiles 5-20% slower (1,279 keys against
    1,280, measured on this CPU)."""
    widen = -width % ALIGN_KEYS
    return offset - widen, width + widen


def band_rows(window: int) -> int:
    """Query rows per block for a band `window` keys wide: a quarter of it as a power of two,
    between FLASH_ROWS and 4 * FLASH_ROWS. Longer blocks read a larger share of keys outside the
    band (rows / window) but run the kernels faster per pair (a 1,024-key window at 8k tokens:
    forward+backward 1.1-1.3x faster with 256 rows than with 64, measured on this CPU)."""
    return max(FLASH_ROWS, min(4 * FLASH_ROWS, 1 << max(0, (window // 4).bit_length() - 1)))


def band_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, before: int, after: int, sinks: int,
                   logit: torch.Tensor | None, scale: float, rows: int) -> torch.Tensor:
    """Attention of each query i over the keys i - before <= j <= i + after (a band: `after` 0
    is causal) and the first `sinks` keys, with `logit` (heads,) in every denominator; query
    (B, H, T, D), key/value (B, Hkv, T, D) of one sequence without padding; (B, H, T, D).

    Blocks of `rows` queries each read one window of before + rows + after keys, widened to whole
    vector tiles (`sliding_pieces`, `aligned`); the sinks outside the band are a piece of their own."""
    length = query.shape[2]
    query, key, value = whole_blocks(query, key, value, rows)
    nb = query.shape[2] // rows
    dtype, device = query.dtype, query.device
    pieces = sliding_pieces(nb, rows, length, *aligned(-before, before + rows + after),
                            lambda qpos, kpos: (kpos >= qpos - before) & (kpos <= qpos + after), dtype, device)
    if sinks:  # the first keys, for the queries whose band does not reach them
        qpos = torch.arange(nb, device=device)[:, None, None] * rows + torch.arange(rows, device=device)[:, None]
        kpos = torch.arange(min(sinks, length), device=device)[None, None, :]
        far = ((kpos < qpos - before) | (kpos > qpos + after)) & (qpos < length)
        far = far & (kpos <= qpos) if after == 0 else far
        pieces.append(Piece(0, nb, 0, 0, kpos.shape[-1], additive(far, dtype), empty=~far.any(-1)[:, None]))
    out = PieceAttention.apply(query, key, value, tuple(pieces), rows, scale, logit)
    return out[:, :, :length]

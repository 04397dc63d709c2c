"""Measurement and reporting helpers that the benchmarks and reports share (`hf-relattn bench`,
`bench kernels`, the demo, model cards, finetune's GQA report): peak memory, statistics of
repeated timings, the machine's facts, sliding-window perplexity, and tables.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` minus the allocation before the block; on
CPU a background thread samples this process's resident set size (/proc/self/statm) every
0.5 ms, peak minus the RSS just before the block (after `gc.collect` and glibc `malloc_trim`, so
freed heap pages do not hide the block's working set).
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import os
import platform
import shutil
import statistics
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Self

import torch
from torch import nn

from .version import __version__


# ========================================================================== environment
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "processor\t: ")) and ":" in line:
                    value = line.split(":", 1)[1].strip()
                    if value and not value.isdigit():
                        return value
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions and machine facts that a benchmark number depends on."""
    import transformers

    try:
        import evaluate

        evaluate_version = evaluate.__version__
    except ImportError:
        evaluate_version = None
    device = torch.device(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "evaluate": evaluate_version,
        "hf_relattn": __version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


# ======================================================================== measurement
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer around it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _malloc_trim() -> None:
    # Return freed heap pages to the OS so the RSS before a call is the true baseline.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_bytes`: extra memory at the peak of the block.

    CUDA: `max_memory_allocated` minus the allocation at entry. CPU: a thread samples the
    process RSS every `interval` seconds; peak minus the RSS at entry (None without /proc).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 5e-4) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes: int | None = None

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        _malloc_trim()
        self._start = _rss()
        self._peak = self._start or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._start is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss() or 0)
        self.peak_bytes = max(0, self._peak - self._start)


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Raw values plus median, min, max and quartiles (inclusive method)."""
    values = [float(v) for v in values]
    q1, q3 = (statistics.quantiles(values, n=4, method="inclusive")[i] for i in (0, 2)) if len(values) > 1 else (values[0], values[0])
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3}


def paired_ratio(variant: Sequence[float], baseline: Sequence[float]) -> float | None:
    """Median over repetitions of variant[r] / baseline[r] (None if a baseline value is 0)."""
    if len(variant) != len(baseline) or not variant or any(b == 0 for b in baseline):
        return None
    return statistics.median(v / b for v, b in zip(variant, baseline))


def quotient(variant: float | None, baseline: float | None) -> float | None:
    """variant / baseline, or None when either is missing or the baseline is 0."""
    if variant is None or baseline is None or baseline == 0:
        return None
    return variant / baseline


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes the keyword `name` (e.g. `logits_to_keep`)."""
    return name in inspect.signature(model.forward).parameters


# ============================================================================== quality
def sliding_windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, n_new) covering targets 1..num_tokens-1 exactly once.

    The window's inputs are tokens [begin, end); they predict targets begin+1..end, of which the
    last `n_new` are scored (the others were scored by an earlier window and are context only).
    Windows start every `stride` tokens; the last one is moved back to keep a full context.
    """
    last = num_tokens - 1
    windows, scored, start = [], 0, 0
    while scored < last:
        end = min(start + context, last)
        windows.append((max(0, end - context), end, end - scored))
        scored = end
        start += stride
    return windows


def load_metric(name: str) -> Any:
    """The Evaluate module `name` shipped in `hf_relattn.metrics`, loaded offline."""
    from . import metrics

    return metrics.load(name, keep_in_memory=True)


@torch.inference_mode()
def perplexity(
    model: nn.Module, ids: torch.Tensor, context: int, stride: int, metric: Any = None, step: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Sliding-window perplexity of a causal LM over the 1-D token ids (hf_relattn.metrics "perplexity")."""
    metric = metric or load_metric("perplexity")
    ids = ids.reshape(-1)
    keep = forward_accepts(model, "logits_to_keep")
    for begin, end, n_new in sliding_windows(ids.numel(), context, stride):
        window = ids[None, begin:end]
        logits = model(input_ids=window, logits_to_keep=n_new).logits if keep else model(input_ids=window).logits
        logits = logits[0, -n_new:].float()
        targets = ids[end - n_new + 1 : end + 1]
        log_probs = logits.log_softmax(-1).gather(-1, targets[:, None].to(logits.device))[:, 0]
        metric.add_batch(log_probs=log_probs.clamp(max=0.0).double().cpu().tolist())
        if step:
            step()
    return metric.compute()


# ============================================================================== reporting
def fmt_bytes(value: float | None) -> str:
    """Bytes as B, KB, MB or GB (powers of 2) with one decimal; "-" for None."""
    if value is None:
        return "-"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def plain_table(headers: list[str], rows: list[list[str]]) -> str:
    """Aligned plain-text table: first column left, the others right."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A markdown table; the first `left` columns are left-aligned (text), the rest right (numbers)."""
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    align = [" --- " if i < left else " ---: " for i in range(len(headers))]
    out = ["| " + " | ".join(map(esc, headers)) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(out)


def print_table(title: str, headers: list[str], rows: list[list[str]], file: Any = None) -> None:
    """Print with rich when it is importable, else as aligned plain text."""
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(f"\n{title}\n{plain_table(headers, rows)}", file=file)
        return
    table = Table(title=escape(title), title_justify="left")
    for i, header in enumerate(headers):
        table.add_column(escape(header), justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*map(escape, row))  # "[min-max]" is text, not rich markup
    # wide enough for every cell: rich would otherwise fold cells to 80 columns when piped
    needed = len(plain_table(headers, rows).splitlines()[0]) + 3 * len(headers) + 1
    Console(file=file, width=max(needed, shutil.get_terminal_size().columns)).print(table)

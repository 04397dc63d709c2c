"""Relation-aware attention on a text-to-SQL input: schema-linking relations as `relation_ids`.

A question and a database schema (Spider's `concert_singer`, abridged) are encoded together by
all-MiniLM-L6-v2 (BERT), as RAT-SQL (Wang et al. 2020) and RASAT (Qi et al. 2022) do. Every
token pair gets a relation id built from the schema and the question:

    0 none                   3 question word = table name     6 columns of the same table
    1 same word / item       4 column -> its table            7 foreign key (both directions)
    2 question word = column 5 table -> its columns

The model is converted with `hf_relattn.convert(model, "relation", num_relations=8)`; the
relation tables start at zero (the encoder is unchanged) and are what a text-to-SQL model
would train. Run:  python examples/relation_schema.py
"""

from __future__ import annotations

import re

import torch

import hf_relattn
from hf_relattn.presets import load

QUESTION = "What are the name and age of every singer who performed at a concert in 2014?"
SCHEMA = {  # table -> columns (natural-language names, as Spider's schema files give them)
    "singer": ["singer id", "name", "country", "age"],
    "concert": ["concert id", "concert name", "year", "stadium id"],
    "singer in concert": ["concert id", "singer id"],
}
FOREIGN_KEYS = [(("singer in concert", "singer id"), ("singer", "singer id")),
                (("singer in concert", "concert id"), ("concert", "concert id"))]
RELATIONS = ["none", "same item", "question-column match", "question-table match", "column->table",
             "table->column", "same-table columns", "foreign key"]


def serialize_schema() -> tuple[str, list[dict]]:
    """'singer : singer id , name , ... | concert : ...' and the character span of every item."""
    text, items = "", []
    for t, (table, columns) in enumerate(SCHEMA.items()):
        if t:
            text += " | "
        items.append({"kind": "table", "table": table, "span": (len(text), len(text) + len(table))})
        text += table + " : "
        for c, column in enumerate(columns):
            if c:
                text += " , "
            items.append({"kind": "column", "table": table, "name": column, "span": (len(text), len(text) + len(column))})
            text += column
    return text, items


def relation_graph(tokenizer) -> tuple[dict, torch.Tensor]:
    """Token ids of (question, schema) and their (1, T, T) relation ids."""
    schema_text, items = serialize_schema()
    enc = tokenizer(QUESTION, schema_text, return_offsets_mapping=True, return_tensors="pt")
    offsets, seq = enc.pop("offset_mapping")[0].tolist(), enc.sequence_ids(0)
    words = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"\w+", QUESTION)]
    owner = []  # per token: ("q", word index) or ("s", item index) or None for special tokens
    for (start, end), part in zip(offsets, seq):
        if part == 0:
            owner.append(("q", next((i for i, (a, b, _) in enumerate(words) if a <= start < b), None)))
        elif part == 1:
            owner.append(("s", next((i for i, it in enumerate(items) if it["span"][0] <= start < it["span"][1]), None)))
        else:
            owner.append(None)

    def item_words(item: dict) -> set[str]:
        return set((item.get("name") or item["table"]).split())

    def relation(a, b) -> int:
        if a is None or b is None or a[1] is None or b[1] is None:
            return 0
        if a == b:
            return 1
        if a[0] == "q" and b[0] == "q":
            return 0
        if a[0] == "s" and b[0] == "s":
            x, y = items[a[1]], items[b[1]]
            if x["kind"] == "column" and y["kind"] == "table" and x["table"] == y["table"]:
                return 4
            if x["kind"] == "table" and y["kind"] == "column" and x["table"] == y["table"]:
                return 5
            if x["kind"] == y["kind"] == "column":
                pair = {(x["table"], x["name"]), (y["table"], y["name"])}
                if any(pair == {src, dst} for src, dst in FOREIGN_KEYS):
                    return 7
                if x["table"] == y["table"]:
                    return 6
            return 0
        word, item = (a, b) if a[0] == "q" else (b, a)
        hit = words[word[1]][2] in item_words(items[item[1]])
        return (2 if items[item[1]]["kind"] == "column" else 3) if hit else 0

    graph = torch.tensor([[relation(a, b) for b in owner] for a in owner])
    return enc, graph[None]


def main() -> None:
    model, tokenizer = load("minilm-l6")
    model.eval()
    inputs, graph = relation_graph(tokenizer)
    counts = torch.bincount(graph.flatten(), minlength=len(RELATIONS))
    print(f"{inputs['input_ids'].shape[1]} tokens; relation pairs:")
    for rid, (name, n) in enumerate(zip(RELATIONS, counts.tolist())):
        print(f"  {rid} {name:<22} {n}")
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    hf_relattn.convert(model, "relation", num_relations=len(RELATIONS))
    with torch.no_grad():
        after = model(**inputs, relation_ids=graph).last_hidden_state
    print(f"zero-initialised relation tables: max |change| of the encoder output = {(after - before).abs().max():.2e}")
    # The tables are trainable: one gradient step of a schema-linking style objective (pull the
    # mean question state towards the states of the columns it mentions) reaches every layer.
    hidden = model(**inputs, relation_ids=graph).last_hidden_state[0]
    mentioned = (graph[0] == 2).any(0)
    loss = -torch.cosine_similarity(hidden[mentioned].mean(0), hidden[inputs["token_type_ids"][0] == 0].mean(0), dim=0)
    loss.backward()
    tables = [(n, p.grad.norm().item()) for n, p in model.named_parameters() if "relattn_relation" in n]
    print(f"{len(tables)} relation tables, gradient norms: " + ", ".join(f"{g:.1e}" for _, g in tables[:4]) + ", ...")


if __name__ == "__main__":
    main()

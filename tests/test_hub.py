"""Sharing on the Hub (hf_relattn.hub, `hf-relattn push`, finetune --push-to-hub).

Uploads go through the real huggingface_hub client to a stand-in Hub (tests/hub_server.py)
on 127.0.0.1. The client reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, and this
test process runs offline (conftest), so every upload runs in a subprocess whose environment
points the client at the stand-in before the import.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from conftest import free_port, save_tiny_llama, tiny_llama
from hub_server import HubServer
from huggingface_hub import ModelCard, constants, get_token
from transformers import AutoModelForCausalLM

import hf_relattn
from hf_relattn.cli import main as cli_main
from hf_relattn.hub import build_card, push_to_hub
from hf_relattn.variants.base import VARIANTS

TOKEN = "hf_stand_in_token_for_tests"
TEXT = "\n".join(topics[k] for k in sorted(topics))[:40_000]
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A plain tiny LLaMA with a byte-level BPE tokenizer: what a user starts from."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), TEXT)


@pytest.fixture(scope="module")
def shaw_dir(base_dir, tmp_path_factory) -> Path:
    """The base converted to Shaw relative positions and saved: an adapted checkpoint."""
    folder = tmp_path_factory.mktemp("ckpts") / "tiny-shaw"
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    hf_relattn.convert(model, "shaw", max_distance=4)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def bench_results(shaw_dir, text_file, tmp_path_factory) -> Path:
    """A real `hf-relattn bench` of the checkpoint, with MQA converted on top as a second row."""
    out = tmp_path_factory.mktemp("bench")
    code = cli_main([
        "bench", "--model", str(shaw_dir), "--variants", "mqa", "--data", str(text_file), "--out", str(out),
        "--context", "32", "--stride", "16", "--max-tokens", "96", "--contexts", "32", "--decode-contexts", "32",
        "--new-tokens", "2", "--reps", "1", "--warmup", "1", "--threads", "1", "--no-plots",
    ])
    assert code == 0
    return out / "results.json"


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No token anywhere huggingface_hub.get_token looks (environment, token file)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert get_token() is None


def hub_env(hub: HubServer, tmp: Path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess whose huggingface_hub talks to the stand-in Hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_XET")}
    env.update({
        "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], check=False, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def top_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_uploaded_checkpoint(files: dict[str, bytes], folder: Path) -> str:
    """The repository holds the folder's files byte for byte plus our README; returns the README."""
    local = top_files(folder)
    assert set(files) == set(local) | {"README.md"}
    for name, content in local.items():
        assert files[name] == content, name
    assert "model.safetensors" in files and "config.json" in files
    return files["README.md"].decode()


# ---------------------------------------------------------------------------------- card
def test_card_states_spec_paper_usage_and_only_this_checkpoints_results(shaw_dir, bench_results):
    doc = json.loads(bench_results.read_text())
    rows = {r["label"]: r for r in doc["results"]}
    assert set(rows) == {"baseline", "mqa"}  # MQA on top is another model: it must not be reported
    card = build_card(shaw_dir, bench_results, base_model="HuggingFaceTB/SmolLM2-135M", repo_id="tester/tiny-shaw")

    evals = card.data.eval_results
    assert len(evals) == 1
    assert evals[0].task_type == "text-generation"
    assert evals[0].metric_type == "perplexity"
    assert evals[0].metric_value == pytest.approx(rows["baseline"]["quality"]["perplexity"], rel=1e-6)
    assert evals[0].metric_value != pytest.approx(rows["mqa"]["quality"]["perplexity"], rel=1e-6)
    assert evals[0].dataset_name == doc["settings"]["data"]
    assert evals[0].metric_args == {"context": 32, "stride": 16, "scored_tokens": doc["quality"]["scored_tokens"]}
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert {"hf_relattn", "relattn_llama", "shaw"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"

    text = str(card)
    shaw = VARIANTS["shaw"]
    assert shaw.paper in text and shaw.description in text
    assert "max_distance=4" in text and "all 2 (0-1)" in text  # options and layers of the spec entry
    assert 'hf_relattn.convert(model, "shaw", max_distance=4' in text
    assert "import hf_relattn" in text and 'AutoModelForCausalLM.from_pretrained("tester/tiny-shaw")' in text
    assert 'from_pretrained("tester/tiny-shaw", trust_remote_code=True)' in text
    assert "hf-relattn bench --model" in text and "prefill 32 tokens" in text
    assert "## Limitations" in text and "not trained after conversion" in text
    # the metadata survives the round trip through README.md
    again = ModelCard(text).data.eval_results
    assert [(e.metric_type, e.metric_value) for e in again] == [(e.metric_type, e.metric_value) for e in evals]


def test_card_without_results_or_training(shaw_dir):
    card = build_card(shaw_dir)
    assert card.data.eval_results is None and card.data.base_model is None  # saved from a random model: no Hub base
    text = str(card)
    assert "No benchmark results were attached" in text and "No training after the conversion" in text


# ------------------------------------------------------------------------------ dry run
def test_dry_run_writes_exactly_the_files_to_upload(shaw_dir, bench_results, tmp_path, no_token):
    out = tmp_path / "preview"
    assert push_to_hub(shaw_dir, "tester/tiny-shaw", results=bench_results, dry_run=out) == str(out)
    files = top_files(out)
    readme = assert_uploaded_checkpoint(files, shaw_dir)
    assert not [p for p in out.iterdir() if p.is_dir()]
    assert readme == str(build_card(shaw_dir, bench_results, repo_id="tester/tiny-shaw"))
    with pytest.raises(ValueError, match="must be new or empty"):
        push_to_hub(shaw_dir, "tester/tiny-shaw", dry_run=out)


def test_dry_run_leaves_out_sub_folders_hidden_files_and_an_old_readme(shaw_dir, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(shaw_dir, folder)
    (folder / "checkpoints" / "step-2").mkdir(parents=True)
    (folder / "checkpoints" / "step-2" / "optimizer.bin").write_bytes(b"state")
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "README.md").write_text("an old card\n")
    out = tmp_path / "preview"
    push_to_hub(folder, "tester/run", dry_run=out)
    expected = {p.name for p in folder.iterdir() if p.is_file() and p.name not in (".DS_Store",)}
    assert {p.name for p in out.iterdir()} == expected
    assert "an old card" not in (out / "README.md").read_text()


def test_push_of_a_model_object_saves_it_first(tmp_path):
    model = tiny_llama(heads=4)
    hf_relattn.convert(model, "alibi")
    out = tmp_path / "preview"
    push_to_hub(model, "tester/alibi", dry_run=out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert json.loads((out / "config.json").read_text())["relattn"]["variants"][0]["name"] == "alibi"
    assert VARIANTS["alibi"].paper in (out / "README.md").read_text()


def test_cli_push_dry_run(shaw_dir, bench_results, tmp_path, capsys, no_token):
    out = tmp_path / "cli-preview"
    code = cli_main(["push", str(shaw_dir), "tester/tiny-shaw", "--results", str(bench_results),
                     "--base-model", "HuggingFaceTB/SmolLM2-135M", "--dry-run", str(out)])
    assert code == 0
    assert "Dry run" in capsys.readouterr().out
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M" and len(card.data.eval_results) == 1
    assert set(top_files(out)) == set(top_files(shaw_dir)) | {"README.md"}


# ------------------------------------------------------------------------------- refusals
def test_missing_token_names_the_ways_to_log_in(shaw_dir, no_token, capsys):
    with pytest.raises(ValueError, match="No Hugging Face token") as err:
        push_to_hub(shaw_dir, "tester/tiny-shaw")
    assert "hf auth login" in str(err.value) and "huggingface-cli login" in str(err.value) and "HF_TOKEN" in str(err.value)
    assert cli_main(["push", str(shaw_dir), "tester/tiny-shaw"]) == 2
    assert "hf auth login" in capsys.readouterr().err


def test_folders_that_are_not_adapted_checkpoints_are_refused(base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "missing", "tester/x", token=TOKEN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        push_to_hub(tmp_path / "empty", "tester/x", token=TOKEN)
    with pytest.raises(ValueError, match="plain transformers checkpoint"):
        push_to_hub(base_dir, "tester/x", token=TOKEN)  # native llama, no spec, no finetune record
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="--merge"):
        push_to_hub(adapter, "tester/x", token=TOKEN)
    with pytest.raises(ValueError, match="not adapted by hf_relattn"):
        push_to_hub(tiny_llama(), "tester/x", token=TOKEN)


def test_bad_repo_id_and_offline_mode_are_refused(shaw_dir):
    with pytest.raises(ValueError, match="Invalid repo_id"):
        push_to_hub(shaw_dir, "a/b/c", token=TOKEN)
    assert constants.is_offline_mode()  # conftest: this process is offline
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        push_to_hub(shaw_dir, "tester/tiny-shaw", token=TOKEN)


def test_results_that_do_not_match_the_checkpoint_are_refused(shaw_dir, bench_results, tmp_path):
    doc = json.loads(bench_results.read_text())
    other = tmp_path / "other-shaw"
    shutil.copytree(shaw_dir, other)
    with pytest.raises(ValueError, match="results.json measured .*tiny-shaw.*not the checkpoint being pushed"):
        build_card(other, bench_results)  # same spec and weights, but the bench ran on another folder

    changed = json.loads(json.dumps(doc))
    changed["results"][0]["relattn_spec"]["variants"][0]["options"]["max_distance"] = 8
    with pytest.raises(ValueError, match="No row of results.json measured"):
        build_card(shaw_dir, changed)

    bert = json.loads(json.dumps(doc))
    bert["model"]["model_type"] = "relattn_bert"
    with pytest.raises(ValueError, match="model_type 'relattn_bert'"):
        build_card(shaw_dir, bert)

    with pytest.raises(ValueError, match="not a results.json"):
        build_card(shaw_dir, {"hello": 1})
    with pytest.raises(FileNotFoundError, match="not found"):
        build_card(shaw_dir, tmp_path / "missing.json")

    # results written elsewhere (the source path does not exist here) count by the folder's name
    moved = json.loads(json.dumps(doc))
    moved["model"]["source"] = moved["settings"]["model"] = f"/elsewhere/{shaw_dir.name}"
    assert len(build_card(shaw_dir, moved).data.eval_results) == 1


# ------------------------------------------------------------------- uploads, real client
def test_push_uploads_checkpoint_and_card_to_the_hub(shaw_dir, bench_results, tmp_path):
    script = textwrap.dedent(f"""
        from hf_relattn.hub import push_to_hub
        print(push_to_hub({str(shaw_dir)!r}, "tiny-shaw", private=True, results={str(bench_results)!r}))
        print(push_to_hub({str(shaw_dir)!r}, "tester/tiny-shaw", results={str(bench_results)!r}))  # exists: second commit
    """)
    with HubServer(token=TOKEN) as hub:
        result = run(["-c", script], hub_env(hub, tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split() == [f"{hub.url}/tester/tiny-shaw"] * 2
        repo = hub.repos["tester/tiny-shaw"]
    assert repo.visibility == "private" and len(repo.commits) == 2
    assert repo.commits[0]["summary"].startswith("Upload llama checkpoint with shaw attention")
    readme = assert_uploaded_checkpoint(repo.files, shaw_dir)
    assert readme == str(build_card(shaw_dir, bench_results, repo_id="tester/tiny-shaw"))  # full id from the Hub
    card = ModelCard(readme)
    assert "shaw" in card.data.tags and card.data.eval_results[0].metric_type == "perplexity"
    assert VARIANTS["shaw"].paper in readme
    assert ("POST", "/api/repos/create") in hub.requests and ("POST", "/api/validate-yaml") in hub.requests


def test_cli_push_through_the_lfs_protocol(shaw_dir, bench_results, tmp_path):
    """Without hf_xet the client uploads LFS files by the batch API (PUT + verify)."""
    env = None
    with HubServer(token=TOKEN, lfs_suffixes=(".safetensors",)) as hub:
        env = hub_env(hub, tmp_path, HF_HUB_DISABLE_XET="1")
        del env["HF_TOKEN"]  # the token comes from --token
        result = run(["-m", "hf_relattn.cli", "push", str(shaw_dir), "tester/tiny-shaw-lfs", "--token", TOKEN,
                      "--results", str(bench_results)], env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"{hub.url}/tester/tiny-shaw-lfs" in result.stdout
        repo = hub.repos["tester/tiny-shaw-lfs"]
        lfs_puts = [path for method, path in hub.requests if method == "PUT"]
    assert repo.visibility == "public"
    assert repo.lfs_paths == {"model.safetensors"} and len(lfs_puts) == 1
    assert_uploaded_checkpoint(repo.files, shaw_dir)


def test_bad_input_reaches_no_endpoint(shaw_dir, base_dir, bench_results, tmp_path):
    doc = json.loads(bench_results.read_text())
    doc["results"][0]["relattn_spec"]["variants"][0]["options"]["max_distance"] = 8
    script = textwrap.dedent(f"""
        import os
        from hf_relattn.hub import push_to_hub
        attempts = [
            lambda: push_to_hub({str(base_dir)!r}, "tester/plain"),
            lambda: push_to_hub({str(shaw_dir)!r}, "tester/mismatch", results={doc!r}),
            lambda: (os.environ.pop("HF_TOKEN"), push_to_hub({str(shaw_dir)!r}, "tester/no-token")),
        ]
        for attempt in attempts:
            try:
                attempt()
                print("UPLOADED")
            except ValueError as err:
                print("refused:", str(err)[:60])
    """)
    with HubServer(token=TOKEN) as hub:
        result = run(["-c", script], hub_env(hub, tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("refused:") == 3 and "UPLOADED" not in result.stdout
        assert not hub.repos
        assert not [r for r in hub.requests if r != ("GET", "/api/agent-harnesses")], hub.requests


# ------------------------------------------------------------------------------ finetune
def test_finetune_push_to_hub_after_training(base_dir, text_file, tmp_path):
    """GQA on every LLaMA layer trains (two DDP processes under `accelerate launch`) into a native
    llama folder: pushed once, by the main process, with the recorded recipe."""
    out = tmp_path / "ft"
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
              str(REPO_ROOT / "finetune" / "accelerate_configs" / "cpu_ddp2.yaml"), "--main_process_port", str(free_port())]
    with HubServer(token=TOKEN) as hub:
        result = subprocess.run([
            *launch, "-m", "hf_relattn.finetune", "--model", str(base_dir), "--data", str(text_file), "--output", str(out),
            "--variant", "gqa", "--variant-options", "num_key_value_heads=2", "--max-steps", "2", "--block-size", "32",
            "--batch-size", "4", "--eval-fraction", "0.1", "--eval-batches", "1", "--logging-steps", "1",
            "--push-to-hub", "tester/tiny-gqa", "--hub-private",
        ], check=False, env=hub_env(hub, tmp_path), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        repo = hub.repos["tester/tiny-gqa"]
    assert repo.visibility == "private" and len(repo.commits) == 1
    assert json.loads((out / "final_metrics.json").read_text())["processes"] == 2
    readme = assert_uploaded_checkpoint(repo.files, out)
    assert {"training_args.json", "final_metrics.json", "metrics.jsonl"} <= set(repo.files)
    assert json.loads(repo.files["config.json"])["model_type"] == "llama"
    assert "plain\n`llama` checkpoint" in readme and "hf_relattn.finetune --model" in readme
    assert VARIANTS["gqa"].paper in readme and "num_key_value_heads=2" in readme
    assert "trust_remote_code" not in readme  # a native checkpoint needs neither plugin nor remote code


def test_finetune_push_to_hub_checks_before_training(base_dir, text_file, tmp_path, no_token, monkeypatch):
    from hf_relattn.finetune import run as finetune_run
    from hf_relattn.finetune.args import parse_args

    out = tmp_path / "never"
    args = parse_args(["--model", str(base_dir), "--data", str(text_file), "--output", str(out), "--variant", "gqa",
                       "--variant-options", "num_key_value_heads=2", "--max-steps", "1", "--push-to-hub", "tester/x"])
    with pytest.raises(ValueError, match="hf auth login"):
        finetune_run(args)
    assert not out.exists()

    # with a token and online, a run that would save a plain model (no variant) is refused before training too
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    args = parse_args(["--model", str(base_dir), "--data", str(text_file), "--output", str(out), "--max-steps", "1", "--push-to-hub", "tester/x"])
    with pytest.raises(ValueError, match="plain llama model and --variant is not set"):
        finetune_run(args)
    assert not out.exists()


def test_model_push_to_hub_methods_use_our_card(tmp_path, monkeypatch):
    """An adapted model's push_to_hub and save_pretrained(push_to_hub=True) go through
    hf_relattn.push_to_hub (our README, after the remote code is written), not transformers'."""
    from hf_relattn import modeling

    calls = []

    def record(model_or_folder, repo_id, **kwargs):
        folder = Path(model_or_folder) if isinstance(model_or_folder, (str, Path)) else None
        calls.append((repo_id, kwargs, sorted(p.name for p in folder.iterdir()) if folder else type(model_or_folder).__name__))
        return "ok"

    monkeypatch.setattr(modeling, "PUSH_HOOKS", [record])
    model = hf_relattn.convert(tiny_llama(), "alibi")
    assert model.push_to_hub("me/tiny", private=True) == "ok"
    assert calls[-1][:2] == ("me/tiny", {"private": True}) and calls[-1][2] == type(model).__name__
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/tiny2", commit_message="m")
    repo_id, kwargs, files = calls[-1]
    assert repo_id == "me/tiny2" and kwargs == {"commit_message": "m", "token": None}
    assert "modeling_relattn.py" in files and "model.safetensors" in files
    with pytest.raises(TypeError, match="create_pr"):
        model.push_to_hub("me/tiny", create_pr=True)

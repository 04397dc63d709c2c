"""Issue 16, "training never loses or corrupts work": exact resume (across epochs too), atomic
checkpoints and outputs, resume refusing changed settings, output folders, push safety.

Faults are injected where the real ones happen: an exception that no handler catches (a kill)
inside accelerate's checkpoint writer, transformers' weight writer or the provenance write; a
process killed by the kernel (SIGXFSZ) in the middle of rewriting config.json; torch's C++ writer
error and safetensors' "no space" error for a full disk; a folder the process cannot write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import save_tiny_llama, tiny_llama
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_finetune import TEXT, losses
from transformers import AutoTokenizer

import hf_relattn.cli as cli
import hf_relattn.finetune.train as train
from hf_relattn.finetune import main, run
from hf_relattn.finetune.args import parse_args
from hf_relattn.hub import push_to_hub

BLOCK, BATCH, BLOCKS = 16, 2, 7  # 7 blocks in batches of 2: 3 batches per epoch (the last block dropped)


class Killed(BaseException):
    """Stands for SIGKILL: no handler of the code under test catches it."""


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA of test_finetune with attention dropout: training draws from the RNG, so a
    resume must also restore the random stream exactly."""
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-dropout"), TEXT)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def text_file(llama_dir, tmp_path_factory) -> Path:
    """A text of exactly BLOCKS blocks of BLOCK tokens (plus a few tokens that make no block)."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    offsets = tokenizer(TEXT[:4000], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    text = TEXT[: offsets[BLOCKS * BLOCK + BLOCK // 2][1]]
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) // BLOCK == BLOCKS
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(text)
    return path


def args_for(llama_dir: Path, text_file: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(llama_dir), "--data", str(text_file), "--output", str(output), "--block-size", str(BLOCK),
            "--batch-size", str(BATCH), "--learning-rate", "3e-3", "--warmup-steps", "1", "--logging-steps", "1",
            "--lr-scheduler", "linear", *extra]


def finetune(*argv: str) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    return run(parse_args(list(argv)))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def logged(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def one_error_line(err: str) -> str:
    """The message a user sees: one line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    return lines[-1]


# ----------------------------------------------------------------- 6. exact resume, across epochs
@pytest.fixture(scope="module")
def two_epochs(llama_dir, text_file, tmp_path_factory) -> Path:
    """An uninterrupted run of 2 epochs x 3 steps, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("runs") / "full"
    metrics = finetune(*args_for(llama_dir, text_file, out, "--num-epochs", "2", "--save-steps", "1"))
    assert metrics["steps"] == 6
    return out


@pytest.mark.parametrize("stop", [1, 3, 4], ids=["mid-epoch-0", "end-of-epoch-0", "mid-epoch-1"])
def test_resume_is_bit_identical_at_any_point_of_two_epochs(two_epochs, llama_dir, text_file, tmp_path, stop):
    out = tmp_path / "resumed"
    finetune(*args_for(llama_dir, text_file, out, "--num-epochs", "2", "--save-steps", "1",
                       "--resume", str(two_epochs / "checkpoints" / f"step-{stop}")))
    assert losses(out) == losses(two_epochs)[stop:]  # exact floats, not approx
    assert [r["lr"] for r in logged(out)] == [r["lr"] for r in logged(two_epochs)][stop:]
    assert_same_weights(two_epochs, out)


def test_resume_with_accumulation_over_an_odd_epoch(llama_dir, text_file, tmp_path):
    """3 batches and accumulation 2: an epoch is 2 optimizer steps (the last one of 1 batch), so the
    data position of step 2 is epoch 1, batch 0 (not epoch 0, batch 4 mod 3)."""
    common = ("--gradient-accumulation-steps", "2", "--num-epochs", "2", "--max-steps", "4", "--save-steps", "1")
    full = tmp_path / "full"
    finetune(*args_for(llama_dir, text_file, full, *common))
    for stop in (1, 2, 3):
        out = tmp_path / f"from-{stop}"
        finetune(*args_for(llama_dir, text_file, out, *common, "--resume", str(full / "checkpoints" / f"step-{stop}")))
        assert losses(out) == losses(full)[stop:], stop
        assert_same_weights(full, out)


# ------------------------------------------------------ 7. atomic checkpoints, kill mid-save
def kill_on_call(monkeypatch, target: object, name: str, when) -> list[tuple]:
    """Replace target.name by a wrapper that raises Killed when `when(args)` holds (after the
    earlier calls really wrote their files)."""
    real, calls = getattr(target, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if when(args):
            raise Killed(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)
    return calls


def test_kill_mid_checkpoint_then_resume_latest_is_exact(two_epochs, llama_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    common = ("--num-epochs", "2", "--save-steps", "2")
    # the weights of step 4 are written, the optimizer state is not: the save dies half-way
    kill_on_call(monkeypatch, accelerate.checkpointing, "save", lambda a: "step-4" in str(a[1]) and "optimizer" in str(a[1]))
    with pytest.raises(Killed):
        finetune(*args_for(llama_dir, text_file, out, *common))
    monkeypatch.undo()
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".step-4.partial", "step-2"]  # the half save is hidden
    assert (checkpoints / ".step-4.partial" / "model.safetensors").is_file()
    assert not (checkpoints / ".step-4.partial" / train.STATE_FILE).exists()
    assert train.latest_checkpoint(out) == checkpoints / "step-2"
    assert [r["step"] for r in logged(out) if "loss" in r] == [1, 2, 3, 4]  # logged before the kill

    finetune(*args_for(llama_dir, text_file, out, *common, "--resume", "latest"))
    assert_same_weights(two_epochs, out)
    assert losses(out) == losses(two_epochs)  # steps 3 and 4 once each, with the resumed values
    assert [r["step"] for r in logged(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4", "step-6"]  # the leftover is gone


def test_kill_mid_final_save_leaves_no_folder_that_looks_complete(two_epochs, llama_dir, text_file, tmp_path, monkeypatch):
    import transformers.modeling_utils

    out = tmp_path / "run"
    common = ("--num-epochs", "2", "--save-steps", "3")
    kill_on_call(monkeypatch, train, "write_provenance", lambda a: True)  # after weights, config, tokenizer were written
    with pytest.raises(Killed):
        finetune(*args_for(llama_dir, text_file, out, *common))
    monkeypatch.undo()
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible == {"metrics.jsonl", "checkpoints"}  # no config.json, no weights: not a checkpoint
    # a kill while writing the weights themselves
    kill_on_call(monkeypatch, transformers.modeling_utils, "safe_save_file", lambda a: True)
    with pytest.raises(Killed):
        finetune(*args_for(llama_dir, text_file, out, *common, "--resume", "latest"))
    monkeypatch.undo()
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == visible
    (out / ".saving-left-by-a-kill").mkdir()  # what a real kill leaves (no finally clause runs then)
    finetune(*args_for(llama_dir, text_file, out, *common, "--resume", "latest"))
    assert_same_weights(two_epochs, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".saving-")]  # leftovers of the killed saves removed


def test_kill_mid_convert_keeps_the_previous_model(llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "converted"
    assert cli.main(["convert", str(llama_dir), str(out), "--variant", "alibi"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    kill_on_call(monkeypatch, cli, "write_provenance", lambda a: True)
    with pytest.raises(Killed):
        cli.main(["convert", str(llama_dir), str(out), "--variant", "mqa", "--overwrite"])
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old model, whole
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["converted"]  # leftovers are hidden


KILL_MID_CONFIG = r"""
import json, resource, signal, sys
from pathlib import Path
import hf_relattn, hf_relattn.remote as remote
from transformers import LlamaConfig, LlamaForCausalLM
folder = Path(sys.argv[1])
model = hf_relattn.convert(LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=2, head_dim=16)), "alibi")
model.save_pretrained(folder)
config = (folder / "config.json").read_text()
remote.flattened_sources = lambda: {}  # rewrite only config.json
json_text = json.dumps(json.loads(config), indent=2, sort_keys=True)
# the kernel kills the process (SIGXFSZ, which Python ignores unless told) when a file grows past
# the new config.json's size less 10 bytes (the small entry module is written whole before it)
assert len(remote.entry_source("LlamaConfig", ["LlamaForCausalLM"] * 6)) < len(json_text) - 10
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
resource.setrlimit(resource.RLIMIT_FSIZE, (len(json_text) - 10, resource.RLIM_INFINITY))
print(config, file=sys.stderr, flush=True)
remote.write_remote_code(model, folder)
"""


def test_process_killed_while_rewriting_config_json_leaves_it_whole(tmp_path):
    folder = tmp_path / "model"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_CONFIG, str(folder)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr[-2000:]
    before = proc.stderr[proc.stderr.index("{"): proc.stderr.rindex("}") + 1]
    assert json.loads((folder / "config.json").read_text()) == json.loads(before)  # the old config, not half a new one


# --------------------------------------------------------- 7. full disk and read-only outputs
def test_full_disk_during_a_checkpoint_is_one_clear_line(llama_dir, text_file, tmp_path, monkeypatch, capsys):
    def full_disk(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4314\n"
                           "frame #0: c10::ThrowEnforceNotMet(char const*, int, char const*, std::string const&, void const*) + 0x6c")

    monkeypatch.setattr(accelerate.checkpointing, "save", full_disk)
    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(args_for(llama_dir, text_file, out, "--max-steps", "3", "--save-steps", "2")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"hf_relattn.finetune: error: Cannot write checkpoint step-2 to {out / 'checkpoints'}: ")
    assert "unexpected pos 4416 vs 4314" in line and "disk full" in line and "frame #0" not in line
    assert list((out / "checkpoints").iterdir()) == []  # nothing half-written stays


def test_full_disk_during_the_final_save_is_one_clear_line(llama_dir, text_file, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    def no_space(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    out = tmp_path / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(args_for(llama_dir, text_file, out, "--max-steps", "1")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"hf_relattn.finetune: error: Cannot write the trained model to {out}: ") and "No space left" in line
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot write: read-only by its mode, or (as root, whom modes do not
    stop) a path under /sys, a read-only file system."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder / "out"
        folder.chmod(0o755)
        return
    folder = Path("/sys/relattn-test-output")
    try:
        folder.mkdir()
    except OSError:
        yield folder
        return
    folder.rmdir()
    pytest.skip("no unwritable folder here")


def test_read_only_output_is_one_clear_line_before_any_work(llama_dir, text_file, unwritable, tmp_path, capsys):
    assert main(args_for(llama_dir, text_file, unwritable, "--max-steps", "1")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"hf_relattn.finetune: error: --output {unwritable} cannot be written: ")
    assert cli.main(["convert", str(llama_dir), str(unwritable), "--variant", "alibi"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"hf-relattn: error: OUTPUT {unwritable} cannot be written: ")
    assert cli.main(["bench", "--model", str(llama_dir), "--out", str(unwritable)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"hf-relattn: error: --out {unwritable} cannot be written: ")


# ------------------------------------------------- 8. resume refuses silently changed settings
@pytest.mark.parametrize("change, expected", [
    (["--learning-rate", "1e-3"], "--learning-rate 0.003 -> 0.001"),
    (["--batch-size", "3"], "--batch-size 2 -> 3"),
    (["--variant", "alibi"], "--variant None -> 'alibi'"),
    (["--num-epochs", "3"], "--num-epochs 2 -> 3"),
    ("data", "--data (its content changed)"),
])
def test_resume_refuses_changed_settings_before_touching_anything(two_epochs, llama_dir, text_file, tmp_path, capsys, change, expected):
    data = tmp_path / "small.txt"
    data.write_text(text_file.read_text())
    out = tmp_path / "run"
    finetune(*args_for(llama_dir, data, out, "--max-steps", "2", "--num-epochs", "2", "--save-steps", "2"))
    if change == "data":  # same path, other text
        data.write_text(text_file.read_text()[::-1])
        change = []
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(args_for(llama_dir, data, out, "--max-steps", "2", "--num-epochs", "2", *change, "--resume", "latest")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "settings differ from the run that saved it" in line and expected in line and "--resume-changed-ok" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_changed_ok_continues_with_the_new_settings(llama_dir, text_file, tmp_path):
    out = tmp_path / "run"
    finetune(*args_for(llama_dir, text_file, out, "--max-steps", "2", "--save-steps", "2"))
    finetune(*args_for(llama_dir, text_file, out, "--max-steps", "4", "--resume", "latest", "--resume-changed-ok"))
    assert [r["step"] for r in logged(out) if "loss" in r] == [1, 2, 3, 4]
    # changing only bookkeeping (how often to log and save) needs no flag
    finetune(*args_for(llama_dir, text_file, out, "--max-steps", "2", "--resume", str(out / "checkpoints" / "step-2"),
                       "--logging-steps", "2", "--save-steps", "1"))


# ----------------------------------------------------------------------- 9. output folders
def former_output(folder: Path, source: Path) -> Path:
    """An output of an earlier, other model: its chat template and generation config, and a
    checkpoint that `--resume latest` would otherwise pick."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((source / name).read_bytes())
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    (folder / "generation_config.json").write_text('{"max_new_tokens": 99}')
    (folder / "checkpoints" / "step-99").mkdir(parents=True)
    (folder / "checkpoints" / "step-99" / train.STATE_FILE).write_text('{"step": 99}')
    return folder


def test_finetune_refuses_a_non_empty_output_and_overwrite_leaves_nothing_stale(llama_dir, text_file, tmp_path, capsys):
    out = former_output(tmp_path / "out", llama_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(args_for(llama_dir, text_file, out, "--max-steps", "1")) == 2
    assert "is not empty: pass --overwrite" in one_error_line(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finetune(*args_for(llama_dir, text_file, out, "--max-steps", "1", "--overwrite"))
    names = {p.name for p in out.iterdir()}
    assert not names & {"chat_template.jinja", "checkpoints"}
    assert "99" not in (out / "generation_config.json").read_text()  # the new model's own
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= names
    assert len(logged(out)) == 1


@pytest.mark.parametrize("case, message", [
    ("resume", "--overwrite would delete the checkpoint"),
    ("not-ours", "holds no model or bench output"),
    ("data-inside", "which is inside --output"),
])
def test_overwrite_refuses_to_delete_what_it_must_not(two_epochs, llama_dir, text_file, tmp_path, capsys, case, message):
    out, extra, data = tmp_path / "out", ["--overwrite"], text_file
    if case == "resume":
        out, extra = two_epochs, ["--overwrite", "--resume", "latest", "--num-epochs", "2"]
    elif case == "not-ours":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        former_output(out, llama_dir)
        data = out / "data.txt"
        data.write_text(text_file.read_text())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(args_for(llama_dir, data, out, "--max-steps", "1", *extra)) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_convert_and_bench_refuse_a_non_empty_output_and_overwrite_replaces_it(llama_dir, text_file, tmp_path, capsys):
    out = former_output(tmp_path / "converted", llama_dir)
    assert cli.main(["convert", str(llama_dir), str(out), "--variant", "alibi"]) == 2
    assert "OUTPUT" in (err := one_error_line(capsys.readouterr().err)) and "is not empty: pass --overwrite" in err
    assert (out / "chat_template.jinja").exists()
    assert cli.main(["convert", str(llama_dir), str(out), "--variant", "alibi", "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert not names & {"chat_template.jinja", "checkpoints"} and "relattn_provenance.json" in names
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the usual mode, not the staging folder's private 0700
    assert "99" not in (out / "generation_config.json").read_text() if (out / "generation_config.json").exists() else True

    bench_out = tmp_path / "bench"
    bench_out.mkdir()
    (bench_out / "results.json").write_text("{}")
    (bench_out / "old_plot.png").write_bytes(b"stale")
    flags = ["bench", "--model", str(llama_dir), "--data", str(text_file), "--out", str(bench_out), "--variants", "alibi",
             "--context", "16", "--max-tokens", "32", "--contexts", "16", "--decode-contexts", "", "--reps", "1", "--no-plots"]
    assert cli.main(flags) == 2
    assert "--out" in (err := one_error_line(capsys.readouterr().err)) and "is not empty: pass --overwrite" in err
    assert cli.main([*flags, "--overwrite"]) == 0
    assert not (bench_out / "old_plot.png").exists() and json.loads((bench_out / "results.json").read_text())["model"]


def test_only_write_failures_are_reported_as_one_line(tmp_path):
    from hf_relattn.outputs import OutputError, reporting_write_errors

    with pytest.raises(OutputError, match="No space left on device"):
        with reporting_write_errors("the model", tmp_path):
            raise OSError(28, "No space left on device")
    with pytest.raises(RuntimeError, match="CUDA error: device-side assert"):  # not a disk problem: unchanged
        with reporting_write_errors("the model", tmp_path):
            raise RuntimeError("CUDA error: device-side assert triggered")


# ------------------------------------------------------------------------------ 10. push
def test_push_refuses_a_symlink_out_of_the_folder(llama_dir, tmp_path):
    out = tmp_path / "alibi"
    assert cli.main(["convert", str(llama_dir), str(out), "--variant", "alibi"]) == 0
    (tmp_path / "secret.txt").write_text("not for the Hub")
    (out / "notes.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ValueError, match="symlink to .*secret.txt, outside .*copy of the file"):
        push_to_hub(out, "tester/x", dry_run=tmp_path / "preview")
    assert not (tmp_path / "preview").exists()
    (out / "notes.txt").unlink()
    (out / "vocab-link.json").symlink_to(out / "tokenizer.json")  # inside the folder: fine
    push_to_hub(out, "tester/x", dry_run=tmp_path / "preview")
    assert (tmp_path / "preview" / "vocab-link.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_converted_cards_name_the_base_model_and_a_native_gqa_folder_can_be_pushed(llama_dir, tmp_path):
    adapted, native = tmp_path / "alibi", tmp_path / "gqa"
    assert cli.main(["convert", str(llama_dir), str(adapted), "--variant", "alibi"]) == 0
    card = (Path(push_to_hub(adapted, "tester/a", dry_run=tmp_path / "a")) / "README.md").read_text()
    assert f"`{llama_dir}` (a local folder, not on the Hub)" in card
    assert cli.main(["convert", str(llama_dir), str(native), "--variant", "gqa", "--num-key-value-heads", "2"]) == 0
    assert json.loads((native / "config.json").read_text())["model_type"] == "llama"
    record = json.loads((native / "relattn_provenance.json").read_text())
    assert record["base_model"] == str(llama_dir) and record["variant"] == "gqa" and record["variant_options"] == {"num_key_value_heads": 2}
    card = (Path(push_to_hub(native, "tester/g", dry_run=tmp_path / "g")) / "README.md").read_text()
    assert f"`{llama_dir}`" in card and "num_key_value_heads=2" in card and 'hf_relattn.convert(model, "gqa"' in card


def test_final_metrics_count_trainable_scalars(llama_dir, text_file, tmp_path):
    out = tmp_path / "t5"
    finetune(*args_for(llama_dir, text_file, out, "--variant", "t5_bias", "--num-buckets", "8", "--max-distance", "16",
                       "--train", "new", "--max-steps", "1"))
    tables = [v for k, v in weights(out).items() if "relattn_t5_bias" in k]
    assert len(tables) == 2
    assert json.loads((out / "final_metrics.json").read_text())["trainable_parameters"] == sum(t.numel() for t in tables) == 2 * 8 * 4


# ------------------------------------------------------ 5. variant options as flags in finetune
def test_finetune_takes_variant_options_as_flags(llama_dir, text_file, tmp_path, capsys):
    args = parse_args(args_for(llama_dir, text_file, tmp_path / "o", "--variant", "gqa", "--num-key-value-heads", "1",
                               "--variant-options", "init=mean"))
    assert json.loads(args.variant_options) == {"init": "mean", "num_key_value_heads": 1} and args.block_size == BLOCK
    out = tmp_path / "mqa"
    finetune(*args_for(llama_dir, text_file, out, "--variant", "gqa", "--num-key-value-heads", "1", "--max-steps", "1"))
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {llama_dir}\nvariant: gqa\nnum_key_value_heads: 2\n")
    assert json.loads(parse_args(["--config", str(recipe)]).variant_options) == {"num_key_value_heads": 2}
    for bad, message in (
        (["--variant", "gqa", "--num-key-value-heads", "1", "--variant-options", "num_key_value_heads=2"], "disagree: give the option once"),
        (["--num-key-value-heads", "1"], "given without --variant"),
    ):
        AcceleratorState._reset_state(reset_partial_state=True)
        assert main(args_for(llama_dir, text_file, tmp_path / "bad", "--max-steps", "1", *bad)) == 2
        assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()

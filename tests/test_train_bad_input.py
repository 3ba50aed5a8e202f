"""Bad input: a clear message, a non-zero exit, before training starts, with nothing written.

Most cases call train.main() in-process (the checks run before DeepSpeed is initialized, so this is
the same code path as the launcher, minus the start-up cost). The batch-size case and the
during-training NaN stop also go through the real launcher with 2 ranks, to check that every rank
stops and the launcher exits non-zero.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_train import (REPO, chat_rows, fast_args, read_jsonl, read_only_command, run_train, small_dataset,
                           text_rows, tiny_config_file, tiny_model_dir, write_jsonl)

import train  # noqa: E402  (REPO is on sys.path via helpers_train)


@pytest.fixture(autouse=True)
def clean_env():
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return d, small_dataset(d / "data", n_text=20, n_chat=0, n_pr=0), tiny_config_file(d / "model")


def args_for(base, out: Path, **over) -> list[str]:
    d, data, model = base
    a = {"--deepspeed": "ds_configs/zero3_offload.json", "--model": model, "--data": data, "--max-seq-len": "128",
         "--output-dir": str(out), "--max-steps": "2"}
    a.update(over)
    argv = []
    for k, v in a.items():
        if v is None:
            continue
        argv.append(k)
        if isinstance(v, list):
            argv.extend(v)
        elif v is not True:
            argv.append(v)
    return argv


def expect_error(argv, capsys, *needles, out: Path | None = None) -> str:
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = train.main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code != 0, "expected a non-zero exit"
    for n in needles:
        assert n in err, f"{n!r} not in:\n{err}"
    if out is not None:
        assert not out.exists(), "nothing may be written for bad input"
    return err


def tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(str(p.relative_to(d)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# ---- datasets ---------------------------------------------------------------------------------

def test_missing_dataset(base, tmp_path, capsys):
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--data": [str(tmp_path / "nope.jsonl")]}), capsys,
                 "dataset not found", "nope.jsonl", out=out)


def test_malformed_dataset_names_file_and_line(base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n{"text": "fine"}\n')
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--data": [str(bad)]}), capsys, "bad.jsonl:2", "malformed JSON", out=out)


@pytest.mark.parametrize("line,needle", [
    ('{"text": "broken', "(Unterminated string starting at column 10)"),  # the last line, without its newline
    ('{"text": "broken\n', "(Invalid control character at column 17)"),
    ('{"text": "tab\there"}\n', "(Invalid control character at column 14)"),
    ('{"text": "a"} x\n', "(Extra data at column 15)"),
])
def test_malformed_json_wording(base, tmp_path, capsys, line, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' + line)
    err = expect_error(args_for(base, tmp_path / "o", **{"--data": [str(bad)]}), capsys, "bad.jsonl:2: malformed JSON",
                       needle, "Fix or remove that record")
    assert "at at" not in err


def test_gzip_file_named_jsonl(base, tmp_path, capsys):
    import gzip

    f = tmp_path / "docs.jsonl"
    f.write_bytes(gzip.compress(b'{"text": "apple"}\n' * 50))
    expect_error(args_for(base, tmp_path / "o", **{"--data": [str(f)]}), capsys, "docs.jsonl: the file is "
                 "gzip-compressed", "gunzip -k docs.jsonl", out=tmp_path / "o")


def test_binary_file_named_jsonl(base, tmp_path, capsys):
    f = tmp_path / "blob.jsonl"
    f.write_bytes(bytes(range(256)) * 8)
    expect_error(args_for(base, tmp_path / "o", **{"--data": [str(f)]}), capsys, "blob.jsonl: a binary file",
                 out=tmp_path / "o")


def test_parquet_file_named_jsonl(base, tmp_path, capsys):
    import datasets

    f = tmp_path / "rows.jsonl"
    datasets.Dataset.from_list([{"text": "apple"}] * 3).to_parquet(str(f))
    expect_error(args_for(base, tmp_path / "o", **{"--data": [str(f)]}), capsys, "rows.jsonl: this is a Parquet "
                 "file", "rename it to rows.parquet", out=tmp_path / "o")


def test_invalid_utf8_names_file_and_line(base, tmp_path, capsys):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n')
    expect_error(args_for(base, tmp_path / "o", **{"--data": [str(f)]}), capsys,
                 "latin.jsonl:3: not UTF-8 text (byte 0xe9 at column 14)", out=tmp_path / "o")
    arr = tmp_path / "arr.json"
    arr.write_bytes(b'[\n{"text": "fine"},\n{"text": "caf\xe9"}\n]\n')
    expect_error(args_for(base, tmp_path / "o", **{"--data": [str(arr)]}), capsys,
                 "arr.json:3: not UTF-8 text (byte 0xe9 at column 14)", out=tmp_path / "o")


def test_malformed_record_names_file_and_line(base, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "rec.jsonl", [{"text": "ok"}, {"text": "ok"}, {"text": 5}])
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--data": [str(bad)]}), capsys, "rec.jsonl:3", "'text' must be a string",
                 out=out)


def test_empty_dataset(base, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--data": [str(empty)]}), capsys, "empty.jsonl is empty", out=out)


def test_all_samples_without_targets(base, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "hello there"}]} for _ in range(5)]
    f = write_jsonl(tmp_path / "nochat.jsonl", rows)
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--data": [str(f)]}), capsys, "no usable training documents",
                 "5 without any supervised token", out=out)


def test_truncation_error_policy(base, tmp_path, capsys):
    f = write_jsonl(tmp_path / "long.jsonl", text_rows(3, lo=200, hi=220))
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--data": [str(f)], "--truncation": "error"}), capsys,
                 "long.jsonl:1", "> --max-seq-len 128", out=out)


def test_sft_documents_that_would_all_be_dropped_stop_the_run(base, tmp_path, capsys):
    """Long prompt/response rows mixed with text, cut at the end (--sft-truncation end): every answer is lost.
    The run used to go on with the text alone; now it stops and says why."""
    d, data, _ = base
    rows = [{"prompt": "Context: " + " ".join(["apple"] * 200) + f" Question {i}?", "response": f" {i}"}
            for i in range(6)]
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--data": data + [str(sft)], "--sft-truncation": "end"}), capsys,
                 "too many unusable SFT documents", "sft.jsonl: 6 of 6 documents (100%)",
                 "with no supervised token left: dropped", "--sft-drop-limit 1", out=out)


def test_unknown_chat_role_names_file_and_line(base, tmp_path, capsys):
    rows = chat_rows(3)
    rows[1]["messages"][1]["role"] = "robot"
    f = write_jsonl(tmp_path / "roles.jsonl", rows)
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--data": [str(f)]}), capsys, "roles.jsonl:2: message 1 has role 'robot'",
                 out=out)


# ---- model, attention ---------------------------------------------------------------------------

def test_max_seq_len_beyond_positions_without_rope_scaling(base, tmp_path, capsys):
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--max-seq-len": "2048"}), capsys, "beyond the model's position range",
                 "max_position_embeddings 1,024", out=out)


def test_rope_scaling_allows_longer_rows():
    from helpers_train import tiny_model_config
    from longctx.modeling import check_positions

    config = tiny_model_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                "original_max_position_embeddings": 1024})
    check_positions(config, 4096)  # no error


def test_corrupt_model_config_is_not_a_tokenizer_error(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text()[:40])  # cut off, as by an interrupted copy
    d = tmp_path / "d"
    data = small_dataset(d, n_text=4, n_chat=0, n_pr=0)
    out = tmp_path / "o"
    err = expect_error(["--model", model, "--data", *data, "--output-dir", str(out)], capsys,
                       f"{cfg}:", "the model config (config.json) is not valid JSON", "restore it", out=out)
    assert "tokenizer" not in err


@pytest.mark.parametrize("impl,needle", [("varlen", "varlen is unavailable"),
                                         ("flash_attention_2", "flash_attention_2 is unavailable")])
def test_unavailable_attention(base, tmp_path, capsys, impl, needle):
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--attn-implementation": impl}), capsys, needle, out=out)


def test_dense_mask_at_long_context_is_refused(base, tmp_path, capsys):
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--dense-mask-max-len": "64", "--attn-implementation": "sdpa"}), capsys,
                 "refusing to build a dense 128 x 128 attention mask", "--no-packing", out=out)


def test_offload_requires_the_fork(base, tmp_path):
    """Upstream transformers is simulated by making transformers.fork_info unimportable."""
    out = tmp_path / "o"
    argv = args_for(base, out, **{"--offload-gradient-checkpointing": True})
    code = ("import sys, runpy; sys.modules['transformers.fork_info'] = None; "
            f"sys.argv = ['train.py'] + {argv!r}; runpy.run_path('train.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "needs the patched transformers fork" in p.stderr and "upstream" in p.stderr, p.stderr[-2000:]
    assert not out.exists()


# ---- config, ds_config, output dir ----------------------------------------------------------------

def test_unknown_config_file_option(base, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("max_seq_len: 128\nlearning_rate: 1e-4\n")
    out = tmp_path / "o"
    expect_error(["--config", str(f)] + args_for(base, out), capsys, "unknown option 'learning_rate'", out=out)


@pytest.mark.parametrize("patch,needle", [
    ({"zero_optimizaton": {"stage": 3}}, "unknown key 'zero_optimizaton' (did you mean 'zero_optimization'?)"),
    ({"zero_optimization": {"stage": 3, "offload_parameters": {"device": "cpu"}}}, "offload_parameters"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler' is not supported here"),
])
def test_unknown_ds_config_key(base, tmp_path, capsys, patch, needle):
    ds = json.loads((REPO / "ds_configs/zero3_offload.json").read_text())
    ds.update(patch)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--deepspeed": str(f)}), capsys, needle, out=out)


def test_zero_stage_out_of_range(base, tmp_path, capsys):
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["zero_optimization"]["stage"] = 5
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    err = expect_error(args_for(base, tmp_path / "o", **{"--deepspeed": str(f)}), capsys,
                       "zero_optimization.stage must be 0, 1, 2 or 3, got 5")
    assert "3 or 3" not in err


def test_inconsistent_batch_sizes(base, tmp_path, capsys):
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["train_batch_size"] = 3
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    out = tmp_path / "o"
    expect_error(args_for(base, out, **{"--deepspeed": str(f), "--grad-accum": "2"}), capsys,
                 "train_batch_size is 3 but train_micro_batch_size_per_gpu 1 x gradient_accumulation_steps 2 x "
                 "world size 1 = 2", out=out)


@pytest.mark.slow
def test_inconsistent_batch_sizes_through_the_launcher(base, tmp_path):
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 2
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    out = tmp_path / "o"
    p = run_train(args_for(base, out, **{"--deepspeed": str(f)}), check=False)
    assert p.returncode != 0
    assert "train_micro_batch_size_per_gpu is 2 but --micro-batch-size gives 1" in p.stderr + p.stdout
    assert not out.exists()


def test_output_dir_with_another_run(base, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"started": "yesterday", "git": {"hash": "abc"}}))
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = tree_digest(out)
    expect_error(args_for(base, out), capsys, "holds another run", "--resume auto", "--overwrite")
    assert tree_digest(out) == before


@pytest.mark.parametrize("flag", [None, "--resume"])
def test_corrupt_run_record(base, tmp_path, capsys, flag):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text('{"started": "yesterday", "git": {"ha')  # cut off by a crash
    before = tree_digest(out)
    over = {"--resume": "auto"} if flag else {}
    expect_error(args_for(base, out, **over), capsys, f"{out / 'run.json'}: the run record is corrupt (line 1 column",
                 "--overwrite")
    assert tree_digest(out) == before


def test_run_record_is_written_atomically(tmp_path):
    """A write that fails half-way leaves the previous run.json whole (Path.write_text would have emptied it)."""
    from longctx import runs

    path = tmp_path / "run.json"
    path.write_text('{"started": "before"}\n')
    with pytest.raises(UnicodeEncodeError):
        runs.write_text_atomic(path, '{"started": "' + "x" * 100_000 + '\udc80"}')
    assert json.loads(path.read_text()) == {"started": "before"}


def test_unwritable_output_dir_is_refused_before_anything_starts(base, tmp_path):
    ro = tmp_path / "ro"
    out = ro / "run"
    cmd = read_only_command(ro, [sys.executable, "train.py", *args_for(base, out)])
    if cmd is None:
        pytest.skip("cannot make a read-only directory here (root without unshare)")
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        ro.chmod(0o755)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"--output-dir {out}: cannot write in {ro}" in p.stderr, p.stderr[-2000:]
    assert "token ledger" not in p.stdout and "preflight" not in p.stdout  # refused first, before data and setup
    assert not out.exists()


def test_output_dir_not_a_run_is_never_overwritten(base, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = tree_digest(out)
    expect_error(args_for(base, out, **{"--overwrite": True}), capsys, "not empty and holds no run")
    assert tree_digest(out) == before


# ---- during training ---------------------------------------------------------------------------

@pytest.mark.slow
def test_samples_without_targets_are_dropped_and_counted_and_offload_trains(base, tmp_path):
    """Positive control in one short run: 3 of 12 chat samples have no assistant turn (dropped, counted in
    the ledger); the run itself uses the fork's offloaded gradient checkpointing on CPU."""
    d, _, model = base
    rows = chat_rows(9) + [{"messages": [{"role": "user", "content": "no answer"}]}] * 3
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "o"
    argv = args_for(base, out, **{"--data": [str(f)], "--offload-gradient-checkpointing": True,
                                  "--eval-fraction": "0", "--max-steps": "2", "--sft-drop-limit": "0.5"})
    p = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["per_file"]["mixed.jsonl"]["docs_dropped_no_targets"] == 3
    assert ledger["per_file"]["mixed.jsonl"]["documents"] == 12
    assert "checkpointing offloaded" in p.stdout
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_sample_ids(base, tmp_path):
    d, data, model = base
    out = tmp_path / "o"
    args = fast_args(out, data, model, steps=4, extra=["--save-interval", "1"])
    p = run_train(args, env={"LONGCTX_TEST_NAN_AT_STEP": "2"}, check=False)
    assert p.returncode != 0
    log = p.stdout + p.stderr
    assert "non-finite loss (nan) at step 2" in log and "text.jsonl:" in log, log[-3000:]
    ckpts = sorted(c.name for c in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000001"]  # nothing saved from the diverged step on


@pytest.mark.slow
def test_gpu_out_of_memory_is_reported_with_the_checkpoint_to_resume_from(base, tmp_path):
    """The last rank runs out of GPU memory (CUDA's exception, raised at step 2 by tests/fault_train_worker.py): it says
    where, against what plan, and from which checkpoint to resume; the launcher stops the other rank and fails."""
    d, data, model = base
    out = tmp_path / "o"
    args = fast_args(out, data, model, steps=3, extra=["--save-interval", "1"])
    p = run_train(args, env={"LONGCTX_TEST_OOM_AT_STEP": "2"}, check=False, timeout=300)
    assert p.returncode != 0
    log = p.stdout + p.stderr
    assert "GPU out of memory on rank 1, in the forward of micro-batch 1 of 1" in log and "step 2 of 3" in log, \
        log[-3000:]
    assert "torch: CUDA out of memory. Tried to allocate 2.00 GiB" in log and "second line" not in log
    assert "the memory plan predicted a peak of" in log
    done = out / "checkpoints" / "step-00000001"
    assert f"the last complete checkpoint is {done}; rerun the same command with --resume auto" in log
    assert "OutOfMemoryError" not in log, log[-3000:]  # no CUDA traceback from the failing rank (rank 0 may show
    # its collective's broken connection: the launcher stops it after rank 1 exits)
    from longctx import checkpoint

    assert checkpoint.latest_complete(out) == done


def test_exit_now_keeps_what_was_printed_and_the_exit_code(tmp_path):
    """train.py leaves through exit_now (no interpreter teardown, where a library's C++ thread once aborted a
    finished rank): what the run printed to a pipe (block-buffered) still arrives, and the code is the run's."""
    code = ("import logging, sys, train; logging.basicConfig(stream=sys.stderr); print('summary line', end=''); "
            "logging.getLogger('x').warning('logged'); train.exit_now(3)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 3 and p.stdout == "summary line" and "logged" in p.stderr

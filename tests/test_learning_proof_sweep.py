"""bench/learning_proof/sweep.py: runs variants end to end (CPU, 2 steps) and picks the best by retrieval."""
import json

from bench.learning_proof import sweep


def test_sweep_runs_and_picks_the_best(tmp_path):
    out = tmp_path / "sweep"
    assert sweep.main(["--out", str(out), "--device", "cpu", "--variants", "numbers_8heads", "--steps", "2",
                       "--rows", "2", "--seq-len", "128", "--eval-every", "1", "--eval-samples", "1",
                       "--workers", "1", "--docs", "8"]) == 0
    rows = [json.loads(x) for x in (out / "numbers_8heads.jsonl").read_text().splitlines()]
    assert rows[0]["params"] > 0 and [r["step"] for r in rows[1:]] == [1, 2]
    assert set(rows[1]) >= {"loss", "passkey@128", "multi@128", "passkey@512", "multi@512"}

    # a second variant whose last evaluations retrieve better: best() must pick it and write its model overrides
    setup = {**rows[0], "variant": "numbers_4layers"}
    evals = [{"step": 1, "loss": 3.0, "passkey@128": 0.5, "multi@128": 0.0},
             {"step": 2, "loss": 2.9, "passkey@128": 1.0, "multi@128": 0.5}]
    (out / "numbers_4layers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [setup] + evals))
    line = sweep.best(out)
    assert line.startswith("BEST=numbers_4layers ") and "NUMBERS=0.3" in line
    assert json.loads((out / "best_model.json").read_text())["num_hidden_layers"] == 4
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

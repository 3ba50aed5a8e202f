"""Shared helpers for the train.py tests: small datasets, a tiny model with known weights, and
running train.py through the real `deepspeed` launcher (CPU ranks on gloo)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `import longctx` from tests, whatever the working directory
    sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO / "longctx" / "default_data"
TOKENIZER = DEFAULT_DATA / "tokenizer"
TINY_CONFIG = DEFAULT_DATA / "tiny_llama.json"
WORDS = ("apple anchor bottle candle desk engine feather garden harbor island jacket kettle lantern mirror "
         "needle orchard pillow quartz ribbon saddle tunnel umbrella velvet window yarn").split()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_rows(n: int, seed: int = 0, lo: int = 8, hi: int = 60) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))} for _ in range(n)]


def chat_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.choice(WORDS)
        v = rng.randint(100, 999)
        rows.append({"messages": [
            {"role": "user", "content": f"{k} is {v}. " + " ".join(rng.choice(WORDS) for _ in range(20)) + f" {k}?"},
            {"role": "assistant", "content": f"{k} is {v}."}]})
    return rows


def pr_rows(n: int, seed: int = 2) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        items = [rng.choice(WORDS) for _ in range(rng.randint(5, 25))]
        out.append({"prompt": "Reverse: " + " ".join(items), "response": " " + " ".join(reversed(items))})
    return out


def small_dataset(d: Path, n_text: int = 60, n_chat: int = 20, n_pr: int = 20) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    files = [write_jsonl(d / "text.jsonl", text_rows(n_text))]
    if n_chat:
        files.append(write_jsonl(d / "chat.jsonl", chat_rows(n_chat)))
    if n_pr:
        files.append(write_jsonl(d / "pr.jsonl", pr_rows(n_pr)))
    return [str(f) for f in files]


def tokenizer():
    """The embedded tokenizer (longctx/default_data/tokenizer), as train.py loads it by default."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def load_rows(tok, rows: list[dict], tmp_path: Path, name: str = "d.jsonl", max_len: int = 4096,
              truncation: str = "truncate", sft_truncation: str = "context"):
    """`rows` written to tmp_path/name and read back by longctx.documents.load_docs: (docs, ledger)."""
    from longctx import documents

    f = write_jsonl(tmp_path / name, rows)
    ledger = documents.Ledger()
    return documents.load_docs([str(f)], tok, max_len, truncation, ledger, sft_truncation), ledger


def target_text(tok, doc) -> str:
    """The decoded tokens of `doc` that are loss targets (label not IGNORE)."""
    from longctx.tokenization import IGNORE

    return tok.decode([int(i) for i, t in zip(doc.input_ids, doc.labels) if t != IGNORE])


def tiny_config(**overrides) -> dict:
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024)
    cfg.update(overrides)
    return cfg


def tiny_model_config(**overrides):
    """tiny_config(**overrides) as a transformers config (a fresh one each call: from_config sets the attention on
    the config it is given)."""
    from transformers import AutoConfig

    cfg = tiny_config(**overrides)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def tiny_lm(*, seed: int = 0, dtype=None, attn_implementation: str | None = None, **overrides):
    """The tests' one tiny-model builder: a Llama of tiny_config(**overrides) with fixed random weights (fp32 unless
    `dtype` says otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_model_config(**overrides)
    torch.manual_seed(seed)
    impl = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **impl)


def tiny_model_weights(layers: int, seed: int = 0):
    """(config, fp32 state dict) of a randomly initialised tiny Llama: the same weights for every run of a test."""
    return tiny_model_config(num_hidden_layers=layers), tiny_lm(seed=seed, num_hidden_layers=layers).state_dict()


def tiny_config_file(d: Path, **overrides) -> str:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "tiny_config.json"
    p.write_text(json.dumps(tiny_config(**overrides)))
    return str(p)


def tiny_model_dir(d: Path, seed: int = 0, **overrides) -> str:
    """A tiny Llama with fixed random weights saved as a HF directory (fp32) plus the tokenizer."""
    tiny_lm(seed=seed, **overrides).save_pretrained(str(d), safe_serialization=True)
    tokenizer().save_pretrained(str(d))
    return str(d)


# In-process gradient checks (tiled MLP, tiled loss): a smaller vocabulary, fp64, so "equal" means equal to round-off.
GRAD_CHECK_CONFIG = dict(vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                         max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)


def tiny_lm_fp64(**overrides):
    import torch

    lm = tiny_lm(dtype=torch.float64, attn_implementation="sdpa", **{**GRAD_CHECK_CONFIG, **overrides})
    lm.config.use_cache = False
    return lm


def token_batch(B: int = 2, S: int = 45, seed: int = 1):
    """(input_ids, position_ids, labels) of random tokens for tiny_lm_fp64, some of them without a target."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, GRAD_CHECK_CONFIG["vocab_size"], (B, S), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    labels[0, 20:25] = -100
    return ids, torch.arange(S).expand(B, S), labels


def loss_and_grads(model, ids, pos, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, position_ids=pos, labels=labels)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def assert_same_loss_and_grads(a, b, tol=1e-10):
    """Loss within tol, every gradient within tol of its largest element."""
    import torch

    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=0)
    for k in ga:
        err, scale = (ga[k] - gb[k]).abs().max().item(), gb[k].abs().max().item()
        assert err <= tol * scale, f"{k}: {err:.3g} vs max |grad| {scale:.3g}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(script: str, args: list[str], nproc: int = 2) -> list[str]:
    """The deepspeed launcher over `script` (relative to the repository) on `nproc` CPU ranks, on a free port."""
    beside = Path(sys.executable).parent / "deepspeed"  # the venv's launcher; else the one on PATH (a --target
    deepspeed = str(beside) if beside.exists() else shutil.which("deepspeed")  # install, as on the GPU machines)
    if deepspeed is None:
        raise FileNotFoundError(f"no deepspeed launcher beside {sys.executable} or on PATH")
    return [deepspeed, "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]


def launcher_cmd(args: list[str], nproc: int = 2, env: dict | None = None) -> list[str]:
    """The deepspeed launcher over train.py, or over tests/fault_train_worker.py when `env` asks for a fault."""
    script = "tests/fault_train_worker.py" if any(k.startswith("LONGCTX_TEST_") for k in (env or {})) else "train.py"
    return deepspeed_cmd(script, args, nproc)


def _env(extra: dict | None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_launcher(cmd: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `cmd` (the deepspeed launcher) in a process group of its own. On timeout, or if the test is
    interrupted, kill the whole group: the launcher, launch.py and every rank, not just the first process."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)

    def kill_group():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group()
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"{' '.join(cmd[:4])} ... timed out after {timeout} s; killed its process group\n"
                             f"{out[-3000:]}\n{err[-3000:]}") from None
    except BaseException:
        kill_group()
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def error_lines(stderr: str, limit: int = 60) -> str:
    """The lines that say why a rank died (a tail shows the last rank's traceback, often a peer's "connection
    reset" rather than the first failure): exceptions, aborts, fatal signals and the launcher's exit codes."""
    marks = ("Error", "error:", "Abort", "abort", "terminate", "Fatal", "fatal", "Segmentation", "exits with")
    hits = [ln for ln in stderr.splitlines() if any(m in ln for m in marks)]
    return "\n".join(hits[:limit]) or "(none)"


def run_train(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    p = run_launcher(launcher_cmd(args, nproc, env), env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
                             f"\n--- the error lines of every rank ---\n{error_lines(p.stderr)}")
    return p


def run_until_paused(args: list[str], marker: Path, env: dict, nproc: int = 2, timeout: int = 600) -> None:
    """Start train.py, wait for a test-hook pause marker, then kill -9 the whole process group."""
    log = open(marker.with_name(marker.name + ".log"), "w")  # beside the run dir, as the marker
    proc = subprocess.Popen(launcher_cmd(args, nproc, env), cwd=REPO, env=_env(env), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"train.py exited ({proc.returncode}) before pausing; see {log.name}")
            if time.time() - t0 > timeout:
                raise AssertionError("timed out waiting for the pause marker")
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Settings shared by the launcher tests: tiny model, short rows, fp32 on CPU.
def fast_args(out: Path, data: list[str], model: str, *, steps: int, extra: list[str] = ()) -> list[str]:
    return ["--deepspeed", "ds_configs/zero3_offload.json", "--model", model, "--data", *data,
            "--max-seq-len", "128", "--output-dir", str(out), "--max-steps", str(steps), "--eval-fraction", "0",
            "--lr", "3e-3", "--warmup-steps", "0", "--lr-scheduler", "constant", *extra]


# The runs the resume tests resume copies of (tests/test_train_resume.py, tests/test_resume_reshard.py): 8 steps of
# 4 rows (2 ranks x grad accumulation 2), a cosine schedule with warmup (the resumed lr must continue it), a checkpoint
# at every step (all kept) and the final model. conftest.py's `uninterrupted` fixture makes each once per session.
RESUME_STEPS = 8
RESUME_EXTRA = ["--grad-accum", "2", "--lr-scheduler", "cosine", "--warmup-steps", "2", "--save-interval", "1",
                "--keep-last", str(RESUME_STEPS)]


class UninterruptedRuns:
    """The uninterrupted runs of the resume tests, one per ds_config file, all from the same data and initial
    weights, each made on first use: runs(ds_file) -> (run directory, the launcher's stdout)."""

    def __init__(self, d: Path):
        self.dir = d
        self.data = small_dataset(d / "data")
        self.model = tiny_model_dir(d / "init")
        self._made: dict[str, tuple[Path, str]] = {}

    def args(self, out: Path, ds_file: str, more: list[str] = ()) -> list[str]:
        """train.py's arguments for a run (or a resume) of this family into `out`; `more` may override flags."""
        a = fast_args(out, self.data, self.model, steps=RESUME_STEPS, extra=RESUME_EXTRA + list(more))
        a[a.index("--deepspeed") + 1] = ds_file
        return a

    def __call__(self, ds_file: str) -> tuple[Path, str]:
        if ds_file not in self._made:
            out = self.dir / f"uninterrupted_{len(self._made)}_{Path(ds_file).stem}"
            self._made[ds_file] = out, run_train(self.args(out, ds_file)).stdout
        return self._made[ds_file]


def reference_step(model_dir: str, data_file: Path, sample_ids: list[str]) -> tuple[float, float]:
    """Independent reference for one optimizer step over text documents: transformers' own forward and
    loss, one document at a time, fp32 on CPU. Returns (target-token mean loss, norm of its gradient)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = Path(data_file).read_text().splitlines()
    total, n_all = 0.0, 0
    for sid in sample_ids:
        name, line = sid.rsplit(":", 1)
        assert name == Path(data_file).name
        text = json.loads(texts[int(line) - 1])["text"]
        x = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]])
        n = x.shape[1] - 1
        loss_sum = lm(input_ids=x, labels=x).loss * n
        loss_sum.backward()  # gradients of the sum accumulate over documents
        total += float(loss_sum.detach())
        n_all += n
    norm = torch.sqrt(sum((p.grad / n_all).pow(2).sum() for p in lm.parameters())).item()
    return total / n_all, norm


def read_only_command(d: Path, cmd: list[str]) -> list[str] | None:
    """`cmd` run with directory `d` read-only: plain when not root (d is chmod 555 here), else in a user and mount
    namespace with `d` bind-mounted read-only (root ignores permission bits). None where neither works."""
    import shutil as _shutil

    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        d.chmod(0o555)
        return cmd
    if not _shutil.which("unshare"):
        return None
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", script + ' 2>/dev/null', str(d), "true"],
                           capture_output=True, timeout=30)
    if probe.returncode != 0:
        return None
    return ["unshare", "-rm", "sh", "-c", script, str(d), *cmd]


def attention_calls():
    """A dispatch mode counting the attention kernels the dispatcher runs (longctx.selective's list: what selective
    checkpointing and the replay keep; a kept output answers without dispatching)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from longctx import selective

    class AttentionCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += selective.is_attention_op(func)
            return func(*args, **(kwargs or {}))

    return AttentionCalls()

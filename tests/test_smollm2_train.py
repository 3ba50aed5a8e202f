"""train.py on the real SmolLM2-135M-Instruct (converted by longctx.models.from_gguf): 2 CPU ranks through the
deepspeed launcher, ZeRO-3 with offload, fp32, packed rows of real English text, 3 steps at lr 1e-5. One run; each
test checks one thing against transformers' own computation, done here independently:

a. the first step's loss (metrics.jsonl) equals the pretrained model's NLL on that step's documents (so the
   weights were loaded under ZeRO-3 correctly and the packed loss is the per-document one), to 1e-4 relative;
b. the NLL of held-out text after the 3 steps is within 1% of the model's own, and the weights did move;
c. the saved final_model reloads with from_pretrained and generates the same greedy tokens as the weights of the
   last DeepSpeed checkpoint, consolidated independently with zero_to_fp32.
"""

from __future__ import annotations

import pytest

from helpers_smollm2 import doc_ids, held_out_text, nll_sum, paragraphs, step_reference_loss
from helpers_train import read_jsonl, run_train, write_jsonl

pytestmark = pytest.mark.slow

MAX_SEQ_LEN, STEPS = 128, 3


@pytest.fixture(scope="module")
def run(smollm2_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    model_dir, _ = smollm2_dir
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = [p for p in paragraphs() if len(doc_ids(tok, p)) <= MAX_SEQ_LEN]  # none cut: the reference is whole
    assert len(docs) >= 8
    d = tmp_path_factory.mktemp("smollm2_run")
    data = write_jsonl(d / "text.jsonl", [{"text": t} for t in docs])
    out = d / "run"
    run_train(["--deepspeed", "ds_configs/zero3_offload.json", "--model", str(model_dir), "--data", str(data),
               "--max-seq-len", str(MAX_SEQ_LEN), "--output-dir", str(out), "--max-steps", str(STEPS),
               "--eval-fraction", "0", "--lr", "1e-5", "--warmup-steps", "0", "--lr-scheduler", "constant"],
              timeout=900)
    return model_dir, data, out


@pytest.fixture(scope="module")
def pretrained(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = smollm2_dir
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def final(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run[2] / "final_model").eval()


def test_first_step_loss_is_the_pretrained_nll(run, pretrained):
    model_dir, data, out = run
    model, tok = pretrained
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = read_jsonl(out / "samples.jsonl")[0]
    assert first["step"] == 1 and len(first["sample_ids"]) >= 2
    reference = step_reference_loss(model, tok, data, first["sample_ids"])
    assert 1.0 < reference < 5.0  # a pretrained model on English (random weights: 10.8)
    assert rows[0]["loss"] == pytest.approx(reference, rel=1e-4)


def test_a_few_small_steps_keep_the_held_out_nll(pretrained, final):
    import torch

    model, tok = pretrained
    moved = max((a - b).abs().max().item() for a, b in zip(final.parameters(), model.parameters()))
    assert moved > 1e-6  # it trained: Adam moves every weight by about lr per step
    ids = doc_ids(tok, held_out_text())
    before = nll_sum(model, ids)[0]
    after = nll_sum(final, ids)[0]
    assert after == pytest.approx(before, rel=0.01)
    assert torch.isfinite(torch.tensor(after))


def test_final_model_generates_as_the_checkpointed_weights(run, pretrained, final):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, _, out = run
    _, tok = pretrained
    sd = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step-{STEPS:08d}")
    sd = {k[len("lm."):]: v for k, v in sd.items() if k.startswith("lm.")}
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    missing, unexpected = reference.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    reference.tie_weights()
    reference.eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        a = final.generate(**prompt, **kw)[0, prompt["input_ids"].shape[1]:]
        b = reference.generate(**prompt, **kw)[0, prompt["input_ids"].shape[1]:]
    assert a.tolist() == b.tolist() and len(a) > 0
    assert "Paris" in tok.decode(a)  # and the tuned model still answers like the instruct model it was

"""Launcher-run worker for the sequence-parallel parity tests (tests/test_sp_parity.py).

    deepspeed --num_gpus 2 tests/sp_worker.py --core segments --out DIR
    deepspeed --num_gpus 2 tests/sp_worker.py --core varlen --out DIR

Every rank builds the same tiny fp32 Llama. The reference is independent of the code under test: each
document run alone through the eager-attention model (no packing, no SP), CE summed over its supervised
tokens, divided by the batch's supervised-token count, backpropagated. The SP side is the training path:
Layout.collate (pad, shift, slice), Ulysses over the core attention, TrainingLM's CE sum, the DeepSpeed
engine (ZeRO stage 0, mpu from register_with_transformers) and Layout.loss_scale, whose all-reduced
gradients must equal the reference's. Rank 0 writes DIR/result.pt with both sides for every case.

--core segments: SDPA with the block-diagonal mask from the full position_ids, micro-batch of 2 rows
(cases: packed rows of odd length 31; unpacked rows of different lengths). --core varlen: the varlen
path that GPUs take (cu_seq_lens of the full padded row), with a pure-PyTorch kernel standing in for
torch's varlen_attn, one packed row of odd length 61. Each case also runs with tiled MLP (3 chunks) and full logits.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.nn.functional as F

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_docs(lengths, seed):
    from longctx.documents import Doc
    from longctx.tokenization import IGNORE

    rng = np.random.default_rng(seed)
    docs = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, CONFIG["vocab_size"], size=n).astype(np.int32)
        labels = ids.copy()
        labels[: rng.integers(1, max(2, n // 3))] = IGNORE  # a prompt without targets, like SFT data
        docs.append(Doc(f"doc{i}", ids, labels))
    return docs


def reference(lm_ref, docs, doc_ids):
    """Loss and gradients of sum(CE over every document alone) / n_targets, eager attention, no SP."""
    lm_ref.zero_grad(set_to_none=True)
    total, n = 0.0, 0
    losses = []
    for d in doc_ids:
        ids = torch.as_tensor(docs[d].input_ids, dtype=torch.long)[None]
        y = torch.as_tensor(docs[d].labels, dtype=torch.long)[1:]
        logits = lm_ref(input_ids=ids).logits[0, :-1].float()
        losses.append(F.cross_entropy(logits, y, ignore_index=-100, reduction="sum"))
        n += int((y != -100).sum())
    loss = torch.stack(losses).sum() / n
    loss.backward()
    total = float(loss)
    grads = {k: p.grad.detach().clone() for k, p in lm_ref.named_parameters()}
    return total, grads, n


def reference_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=True, scale=None):
    """(T, H, D) causal attention per segment with SDPA; stands in for torch's varlen_attn on CPU."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal, scale=scale).transpose(0, 1)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--core", choices=("segments", "varlen", "sdpa_per_doc", "fa4"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()

    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from longctx import attention, batching, opbuild, resolve
    from longctx.modeling import CausalLMWithLoss
    from longctx import sequence_parallel as sp_mod, tiled_mlp

    torch.set_num_threads(1)
    opbuild.probe_cpu_once()  # as train.py's ranks do (longctx.dist.init)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sp = world
    config = AutoConfig.for_model("llama", **CONFIG)
    torch.manual_seed(0)
    lm_ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    sp_mod.check(sp, world, config)

    flatten = args.core in ("varlen", "sdpa_per_doc", "fa4")
    micro = 1 if flatten else 2
    if args.core == "varlen":
        impl = attention.register_varlen(reference_varlen_kernel)
    elif args.core == "sdpa_per_doc":
        impl = attention.register(resolve.SDPA_PER_DOC)
    elif args.core == "fa4":  # longctx.fa4's ops over a plain stand-in for flash-attention-4's kernels
        import helpers_fa4

        helpers_fa4.install()
        impl = attention.register(resolve.FA4)
    else:
        impl = "sdpa"
    core = sp_mod.core_attention(impl, sp)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG), dtype=torch.float32,
                                          attn_implementation=core)  # its own config: the impl is set on it
    lm.load_state_dict(lm_ref.state_dict())
    lm.config.use_cache = False
    model = CausalLMWithLoss(lm, labels_shifted=True, tiled_loss=True)
    mpu = sp_mod.register_ulysses(lm, core, sp, micro)
    ds_config = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
                 "train_batch_size": micro * (world // sp), "zero_optimization": {"stage": 0},
                 "steps_per_print": 10 ** 9, "sequence_parallel_size": sp}
    layout = sp_mod.Layout.for_run(sp, rank, world, micro, ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, mpu=mpu,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.0))

    if flatten:  # one packed row of odd length 61: documents 20+13+11+9+7 and one padding token
        docs = make_docs([13, 7, 9, 20, 11], seed=1)
        cases = {"varlen_packed_odd": dict(rows=batching.pack([len(d) for d in docs], 61), packing=True,
                                           max_seq_len=61)}
    else:
        docs = make_docs([13, 7, 9, 20, 11, 23, 16], seed=1)
        cases = {
            "packed_odd": dict(rows=batching.pack([len(d) for d in docs[:5]], 31), packing=True, max_seq_len=31),
            "unpacked_varlen": dict(rows=[[5], [6]], packing=False, max_seq_len=64),  # lengths 23, 16
        }
    results = {}
    for name, c in cases.items():
        doc_ids = [d for row in c["rows"] for d in row]
        ref_loss, ref_grads, n = reference(lm_ref, docs, doc_ids)
        for variant, (mlp_tiled, tiled_loss) in {"plain": (False, True), "tiled_mlp+full_logits": (True, False)}.items():
            if mlp_tiled:
                tiled_mlp.enable(lm, shards=3)
            else:
                tiled_mlp.disable(lm)
            model.head.tiled_loss = tiled_loss
            batch = layout.collate(docs, c["rows"], pad_id=0, packing=c["packing"], max_seq_len=c["max_seq_len"],
                                   flatten=flatten)
            for prm in model.parameters():
                prm.grad = None
            loss = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                          **attention.model_kwargs(batch, core if flatten else None, torch.device("cpu")))
            engine.backward(loss * layout.loss_scale(1, n))
            tot = torch.tensor([float(loss), batch["n_targets"]], dtype=torch.float64)
            torch.distributed.all_reduce(tot)
            grads = {k[len("lm."):]: prm.grad.detach().clone() for k, prm in model.named_parameters()}
            results[f"{name}/{variant}"] = dict(ref_loss=ref_loss, ref_grads=ref_grads, n_targets=n,
                                                sp_loss=float(tot[0]) / n, sp_targets=int(tot[1]), sp_grads=grads,
                                                local_len=int(batch["input_ids"].shape[1]))
    if rank == 0:
        torch.save(results, os.path.join(args.out, "result.pt"))
    torch.distributed.barrier()


if __name__ == "__main__":
    import train

    main()
    train.exit_now(0)  # as train.py leaves: a library's C++ thread once aborted interpreter teardown (rc -6)

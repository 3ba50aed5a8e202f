"""Regenerate the embedded default dataset and tokenizer (the files beside this script).

    python longctx/default_data/make_default_data.py

Everything is synthetic and seeded, so the output is the same on every machine. The documents are
built to need long context: facts stated early are asked about or repeated much later.

  text.jsonl             {"text"}               long "field notes" documents, some longer than the
                                                default max_seq_len (exercising truncation)
  chat.jsonl             {"messages"}           key/value retrieval over a long record list, 1-2 turns
  prompt_response.jsonl  {"prompt","response"}  reverse / look up items of a long list
  tokenizer/             byte-level BPE (2048 entries) trained on the three files, with a chat template
  tiny_llama.json        a tiny GQA Llama config whose vocab matches the tokenizer

Nothing here is downloaded; only the `tokenizers` and `transformers` packages are used.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261122

COLORS = "red blue green amber violet silver golden black white grey pale dark".split()
ANIMALS = ("fox heron otter badger lynx crane beetle salmon raven hare wolf moth newt "
           "falcon marten vole ibis gecko").split()
PLACES = ("north ridge, the old mill, the salt marsh, the cedar grove, the east bank, the quarry, "
          "the lower field, the weir, the birch hollow, the stone bridge").split(", ")
VERBS = "was seen near|was counted at|nested by|crossed|fed along|rested at|was heard from".split("|")
WORDS = ("apple anchor bottle candle desk engine feather garden harbor island jacket kettle lantern "
         "mirror needle orchard pillow quartz ribbon saddle tunnel umbrella velvet window yarn zephyr "
         "meadow copper thistle lagoon marble ember cobalt willow").split()

SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def text_doc(rng: random.Random, n_days: int) -> str:
    """Field notes: each day lists sightings; a summary at the end repeats the first day's facts."""
    lines = [f"Field notes of observer {rng.randint(100, 999)}."]
    first = []
    count = {}
    for day in range(1, n_days + 1):
        lines.append(f"Day {day}.")
        for _ in range(rng.randint(3, 6)):
            c, a, p, v = rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(VERBS)
            n = rng.randint(1, 12)
            lines.append(f"A {c} {a} {v} {p}; total {n}.")
            count[a] = count.get(a, 0) + n
            if day == 1:
                first.append(f"the {c} {a} at {p}")
    lines.append("Summary. On the first day we recorded " + ", ".join(first) + ".")
    lines.append("Totals: " + "; ".join(f"{a} {n}" for a, n in sorted(count.items())) + ".")
    return "\n".join(lines)


def records(rng: random.Random, n: int) -> list[tuple[str, int]]:
    keys = rng.sample([f"{w}-{i}" for w in WORDS for i in range(10)], n)
    return [(k, rng.randint(1000, 9999)) for k in keys]


def chat_sample(rng: random.Random) -> dict:
    recs = records(rng, rng.randint(20, 140))
    listing = "\n".join(f"record {i}: key={k} value={v}" for i, (k, v) in enumerate(recs))
    q1 = rng.choice(recs)
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": "You answer questions about record lists exactly."})
    msgs += [
        {"role": "user", "content": f"Here are the records.\n{listing}\nWhat is the value of key {q1[0]}?"},
        {"role": "assistant", "content": f"The value of key {q1[0]} is {q1[1]}."},
    ]
    if rng.random() < 0.5:
        q2 = rng.choice(recs)
        msgs += [
            {"role": "user", "content": f"And the value of key {q2[0]}?"},
            {"role": "assistant", "content": f"The value of key {q2[0]} is {q2[1]}."},
        ]
    return {"messages": msgs}


def prompt_response_sample(rng: random.Random) -> dict:
    items = [rng.choice(WORDS) for _ in range(rng.randint(20, 200))]
    if rng.random() < 0.5:
        return {"prompt": "Reverse this list of words:\n" + " ".join(items) + "\nReversed:",
                "response": " " + " ".join(reversed(items))}
    i = rng.randrange(len(items))
    numbered = "\n".join(f"{j}. {w}" for j, w in enumerate(items))
    return {"prompt": f"A numbered list:\n{numbered}\nWhich word is number {i}?",
            "response": f" Number {i} is {items[i]}."}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_tokenizer(texts: list[str], out_dir: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", model_max_length=1 << 20)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return len(fast)


def main() -> None:
    rng = random.Random(SEED)
    text = [{"text": text_doc(rng, rng.choice([4, 6, 10, 16, 30]))} for _ in range(60)]
    chat = [chat_sample(rng) for _ in range(50)]
    pr = [prompt_response_sample(rng) for _ in range(60)]
    write_jsonl(HERE / "text.jsonl", text)
    write_jsonl(HERE / "chat.jsonl", chat)
    write_jsonl(HERE / "prompt_response.jsonl", pr)

    corpus = [r["text"] for r in text] + [m["content"] for r in chat for m in r["messages"]]
    corpus += [r["prompt"] + r["response"] for r in pr]
    vocab = build_tokenizer(corpus, HERE / "tokenizer")
    tiny = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "initializer_range": 0.02, "hidden_act": "silu",
        "bos_token_id": SPECIAL.index("<|bos|>"), "eos_token_id": SPECIAL.index("<|eos|>"),
        "pad_token_id": SPECIAL.index("<|pad|>"),
    }
    (HERE / "tiny_llama.json").write_text(json.dumps(tiny, indent=2) + "\n")
    sizes = {p.name: p.stat().st_size for p in HERE.glob("*.jsonl")}
    print(f"vocab {vocab}; files {sizes}")


if __name__ == "__main__":
    main()

"""A few fixed short chat prompts, answered greedily: what a fine-tune did to the model as a chat model, read side by
side before and after (eval.py --tasks chat). Not scored: a long-context fine-tune should leave these answers about
as they were (an instruct model that starts to ramble, repeat itself or lose the chat format shows it here first).
"""

from __future__ import annotations

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the factorial of n.",
    "Give three tips for staying healthy.",
    "Explain in two sentences what a hash table is.",
    "Translate to French: Where is the train station?",
    "What is 12 times 7?",
)


def prompt_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def answer_all(model, tok, prompts=PROMPTS, max_new_tokens: int = 64) -> list[dict]:
    """[{"prompt", "answer", "tokens"}], greedy, stopped at the template's end of turn (or eos)."""
    from . import citation, generate

    stop = citation.stop_ids(tok) or None
    outs = generate.greedy_many(model, [prompt_ids(tok, p) for p in prompts], max_new_tokens, stop)
    return [{"prompt": p, "answer": tok.decode(o, skip_special_tokens=True).strip(), "tokens": len(o)}
            for p, o in zip(prompts, outs)]

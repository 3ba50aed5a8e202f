"""Long-context evaluation, driven by eval.py. Nothing here downloads anything.

  needle.py      passkey / multi-needle prompts over a grid of context lengths x needle depths (seeded)
  perplexity.py  perplexity bucketed by token position, logits computed one chunk of positions at a time
  longbench.py   LongBench-style QA scoring (exact match, token F1) of a local {context, question, answers} jsonl
  citation.py    cite-the-source QA from the stdlib's sources: the builder (train + held-out eval files) and scorer
  chat.py        a few fixed short chat prompts, answered greedily (read before and after side by side)
  heldout_prose.py  English prose from a domain no training text comes from (the King James Bible, a pinned package)
  corpus.py      text for perplexity: the user's files, or Python's standard library sources read at run time
  generate.py    the model side: loading a local HF model directory, greedy decoding with a KV cache, batched
  plot.py        accuracy heatmaps and perplexity-by-position curves (PNG)
  runner.py      the typed eval config, input checks, and the run that writes eval.json + PNGs
"""

"""Real English text for the SmolLM2 tests (stdlib docstrings, on every Python) and transformers' own NLL on it:
the independent reference train.py's losses are compared with."""

from __future__ import annotations

import json
from pathlib import Path


def paragraphs(min_chars: int = 120, max_chars: int = 400) -> list[str]:
    """Prose paragraphs of a few stdlib module docstrings, short enough that one fits a 128-token row."""
    import argparse
    import csv
    import difflib
    import heapq
    import string

    out = []
    for mod in (argparse, csv, heapq, difflib, string):
        for para in (mod.__doc__ or "").split("\n\n"):
            para = " ".join(para.split())
            if min_chars <= len(para) <= max_chars:
                out.append(para)
    return out


def held_out_text() -> str:
    """Text not in paragraphs(): the json module's documentation (also the converter's check text)."""
    import json as json_mod

    return json_mod.__doc__


def doc_ids(tok, text: str) -> list[int]:
    """A text document as train.py's {"text"} format tokenizes it: bos + text + eos."""
    return [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def nll_sum(model, ids: list[int]) -> tuple[float, int]:
    """transformers' own loss: (sum of next-token NLL, number of targets), fp32."""
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        n = x.shape[1] - 1
        return float(model(input_ids=x, labels=x).loss) * n, n


def step_reference_loss(model, tok, data_file: Path, sample_ids: list[str]) -> float:
    """Target-token mean NLL over the documents of one optimizer step, one document at a time."""
    lines = Path(data_file).read_text().splitlines()
    total, count = 0.0, 0
    for sid in sample_ids:
        name, line = sid.rsplit(":", 1)
        assert name == Path(data_file).name
        s, n = nll_sum(model, doc_ids(tok, json.loads(lines[int(line) - 1])["text"]))
        total, count = total + s, count + n
    return total / count

#!/usr/bin/env python
"""Long-context evaluation of a local Hugging Face model directory. Nothing is downloaded.

    python eval.py --model runs/default/final_model                      # passkey, multi-needle, perplexity
    python eval.py --model DIR --lengths 8192,32768,65536 --samples 20 --longbench-data qa.jsonl
    python eval.py --model DIR --tasks citation --citation-data data/citation     # cite-the-source QA per length

Writes <output-dir>/eval.json (every number, rewritten after each task) and PNGs: passkey_heatmap.png,
multi_needle_heatmap.png (accuracy per context length x needle depth), ppl_by_position.png.
Where things live: longctx/evaluation/ (needle.py prompts, perplexity.py, longbench.py, citation.py, corpus.py,
generate.py model loading + decoding, plot.py, runner.py the config and the run).
"""

from __future__ import annotations

import sys

from longctx.errors import LongctxError


def main(argv: list[str] | None = None) -> int:
    from longctx.evaluation import runner

    try:
        cfg = runner.parse(argv)
        runner.run(cfg)
        return 0
    except LongctxError as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())

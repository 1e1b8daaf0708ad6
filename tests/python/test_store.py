"""The expert store: the mapping, its caches' consistency within and across processes, the
materialised PEFT folders (verified, bounded, written once), and what killed writers leave."""

import json
import multiprocessing
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:Could not find a config file in tiny/net")

peft = pytest.importorskip("peft")

import compeft_rs  # noqa: E402
from compeft_rs import _io, _store  # noqa: E402
from compeft_rs._expert import CompressedExpert  # noqa: E402

BASE = "tiny/net"  # what the experts' adapter configs name as their base model


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """peft looks the base model up on the Hub when it reads an adapter's state dict; there is
    none to find (and no network in CI)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class Net(torch.nn.Module):
    def __init__(self, width=48):
        super().__init__()
        self.q = torch.nn.Linear(width, width)
        self.v = torch.nn.Linear(width, width)
        self.classifier = torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.classifier(self.v(self.q(x)))


def base_model(seed=0, width=48):
    torch.manual_seed(seed)
    m = Net(width)
    m.name_or_path = BASE  # peft writes it into the adapter config's base_model_name_or_path
    return m


def peft_model(seed=5, r=8, lora_alpha=16, width=48, **config):
    cfg = peft.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q", "v"], modules_to_save=["classifier"],
                          **config)
    m = peft.get_peft_model(base_model(0, width), cfg)
    torch.manual_seed(seed)
    with torch.no_grad():  # trained-looking: B no longer zero
        for n, p in m.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.normal_(0, 0.05)
    return m


def an_expert(seed=5, k=0.3, **kw):
    return compeft_rs.compress_peft(peft_model(seed, **kw), k)


def same_weights(got, want):
    assert sorted(got) == sorted(want)
    return all(torch.equal(got[n], want[n]) for n in want)


# -- the mapping --------------------------------------------------------------------------------


def test_store_put_get_names_remove(tmp_path):
    store = compeft_rs.ExpertStore(tmp_path / "store")
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    store.put("one", e1)
    store.put("two", e2)
    assert store.names() == ["one", "two"] and "one" in store and "three" not in store and len(store) == 2
    for n in ("one", "two"):  # cached under the identity of the file linked in: hits are not read again
        on_disk = os.stat(tmp_path / "store" / f"{n}.cpft.safetensors")
        assert store._compressed.get(n).ident == _store._local_identity(on_disk)
    assert (tmp_path / "store" / "one.cpft.safetensors").is_file()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        store.put("one", e2)
    fresh = compeft_rs.ExpertStore(tmp_path / "store")  # nothing cached
    assert fresh["two"].to_bytes() == e2.to_bytes()
    assert same_weights(fresh.decoded("one"), e1.apply())
    store.put("one", e2, overwrite=True)
    assert store["one"].to_bytes() == e2.to_bytes()
    assert same_weights(store.decoded("one"), e2.apply())
    store.remove("one")
    assert store.names() == ["two"]
    with pytest.raises(KeyError, match="no expert 'one'"):
        store.remove("one")
    for bad in ["", "../x", "a/b", ".hidden", "x.cpft.safetensors"]:
        with pytest.raises(ValueError, match="bad expert name"):
            store.put(bad, e1)


def test_store_is_a_mapping_of_names_to_experts(tmp_path):
    from collections.abc import Mapping

    store = compeft_rs.ExpertStore(tmp_path)
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    store.put("b", e2)
    store.put("a", e1)
    assert isinstance(store, Mapping)
    assert list(store) == ["a", "b"] and list(store.keys()) == ["a", "b"] and len(store) == 2
    assert "a" in store and "c" not in store and "../a" not in store and 3 not in store
    assert store["a"].to_bytes() == e1.to_bytes()
    assert [e.to_bytes() for e in store.values()] == [e1.to_bytes(), e2.to_bytes()]
    assert store.get("c") is None and store.get("c", 7) == 7 and store.get("../a") is None
    assert store.get("b").to_bytes() == e2.to_bytes()
    with pytest.raises(KeyError, match=r"no expert 'c' in .*"):
        store["c"]
    with pytest.raises(KeyError, match="not a valid expert name"):
        store["../a"]
    assert store == store and store != compeft_rs.ExpertStore(tmp_path)  # identity: nothing read to compare
    assert len({store}) == 1


def test_a_file_that_is_not_an_expert_is_named_in_the_error(tmp_path):
    from safetensors.torch import save_file

    store = compeft_rs.ExpertStore(tmp_path)
    (tmp_path / "junk.cpft.safetensors").write_bytes(b"not an expert at all")
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.cpft.safetensors"))
    for name, why in [("junk", "not a readable safetensors file"), ("foreign", "not a compeft expert")]:
        path = str(tmp_path / f"{name}.cpft.safetensors")
        for read in (lambda: store[name], lambda: store.get(name), lambda: store.decoded(name)):
            with pytest.raises(compeft_rs.CompeftError, match=f"^{re.escape(path)}[: ].*{why}"):
                read()


def test_a_missing_root_is_refused_without_create(tmp_path):
    with pytest.raises(FileNotFoundError, match="no expert store at .*create=True"):
        compeft_rs.ExpertStore(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        compeft_rs.ExpertStore(tmp_path / "file")
    assert len(compeft_rs.ExpertStore(tmp_path / "new")) == 0  # created by default


def test_store_on_an_fsspec_url():
    pytest.importorskip("fsspec")
    store = compeft_rs.ExpertStore("memory://compeft-test-store")
    e = an_expert()
    store.put("x", e)
    again = compeft_rs.ExpertStore("memory://compeft-test-store")
    assert again.names() == ["x"] and again["x"].to_bytes() == e.to_bytes()
    again.remove("x")
    assert again.names() == [] and store.get("x") is None


# -- the caches -------------------------------------------------------------------------------


def test_store_decoded_cache_is_bounded(tmp_path):
    e = an_expert()
    size = sum(t.numel() * t.element_size() for t in e.apply().values())
    store = compeft_rs.ExpertStore(tmp_path, decoded_cache_bytes=2 * size + 1)
    for i in range(4):
        store.put(f"e{i}", e)
        store.decoded(f"e{i}")
        assert store._decoded.nbytes <= 2 * size + 1
    assert list(store._decoded.items) == ["e2", "e3"]
    store.decoded("e2")  # a hit moves it to the end
    store.decoded("e0")
    assert list(store._decoded.items) == ["e2", "e0"]


def held_bytes(lru):
    return sum(n for _, n in lru.items.values())


def test_cache_byte_counts_follow_overwrites_and_removes(tmp_path):
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    size = sum(t.numel() * t.element_size() for t in e1.apply().values())
    store = compeft_rs.ExpertStore(tmp_path, decoded_cache_bytes=3 * size)
    for i in range(4):
        store.put("x", (e1, e2)[i % 2], overwrite=True)
        store.decoded("x")
        for lru in (store._compressed, store._decoded):
            assert list(lru.items) == ["x"] and lru.nbytes == held_bytes(lru)
    store.remove("x")
    assert store._decoded.nbytes == 0 == store._compressed.nbytes
    assert not store._decoded.items and not store._compressed.items
    # The cache still has room, so a decoded expert is served from it, not decoded again.
    store.put("y", e1)
    first = store.decoded("y")
    assert store.decoded("y") is first and store._decoded.nbytes == held_bytes(store._decoded) == size


def _racing(monkeypatch, cls, attr, action):
    """Patches cls.attr to run ``action`` once, right after the first call does its work: a write
    that lands between a read and the caching of what it read."""
    orig = getattr(cls, attr)
    done = []

    def patched(*args, **kwargs):
        out = orig(*args, **kwargs)
        if not done:
            done.append(1)
            action()
        return out

    monkeypatch.setattr(cls, attr, patched)
    return done


@pytest.mark.parametrize("revalidate", [None, 0.0])
def test_a_put_between_read_and_cache_is_not_hidden(tmp_path, monkeypatch, revalidate):
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    w1, w2 = e1.apply(), e2.apply()
    store = compeft_rs.ExpertStore(tmp_path, revalidate=revalidate)
    store.put("x", e1)
    _racing(monkeypatch, CompressedExpert, "apply", lambda: store.put("x", e2, overwrite=True))
    assert same_weights(store.decoded("x"), w1)  # started before the put: the old expert
    assert same_weights(store.decoded("x"), w2)
    monkeypatch.undo()

    fresh = compeft_rs.ExpertStore(tmp_path, revalidate=revalidate)  # nothing cached: get reads the file
    _racing(monkeypatch, _store, "_expert_from", lambda: fresh.put("x", e1, overwrite=True))
    assert fresh["x"].to_bytes() == e2.to_bytes()
    assert fresh["x"].to_bytes() == e1.to_bytes()


@pytest.mark.parametrize("revalidate", [None, 0.0])
def test_a_removed_expert_is_never_served_from_the_cache(tmp_path, monkeypatch, revalidate):
    e = an_expert()
    store = compeft_rs.ExpertStore(tmp_path, revalidate=revalidate)
    store.put("x", e)
    _racing(monkeypatch, CompressedExpert, "apply", lambda: store.remove("x"))
    store.decoded("x")  # started before the remove
    monkeypatch.undo()
    # decoded() first: a get() would drop the cached copies on its way and hide a stale one.
    with pytest.raises(KeyError, match="no expert 'x'"):
        store.decoded("x")
    assert store.get("x") is None and "x" not in store


def test_another_writers_put_and_remove_are_seen(tmp_path):
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    # a's compressed cache and c's decoded cache are each checked first after b's writes (one
    # read drops both caches of a store, which would hide a stale hit in the other).
    a, b, c = (compeft_rs.ExpertStore(tmp_path) for _ in range(3))
    a.put("x", e1)
    assert a["x"].to_bytes() == e1.to_bytes() and same_weights(c.decoded("x"), e1.apply())
    b.put("x", e2, overwrite=True)
    assert a["x"].to_bytes() == e2.to_bytes() and same_weights(c.decoded("x"), e2.apply())
    b.remove("x")
    assert a.get("x") is None and "x" not in a
    with pytest.raises(KeyError):
        c.decoded("x")
    # Another process, and a rewrite that keeps the size and mtime: the inode still tells.
    a.put("y", e1)
    assert same_weights(a.decoded("y"), e1.apply())
    before = os.stat(tmp_path / "y.cpft.safetensors")
    code = textwrap.dedent(f"""
        import compeft_rs
        s = compeft_rs.ExpertStore({str(tmp_path)!r})
        s.put("y", compeft_rs.CompressedExpert.from_bytes(bytes.fromhex({e1.to_bytes().hex()!r})), overwrite=True)
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    os.utime(tmp_path / "y.cpft.safetensors", ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(tmp_path / "y.cpft.safetensors")
    assert after.st_ino != before.st_ino and (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    hit = a._compressed.get("y")
    assert a["y"] is not hit.value  # read again


def test_another_writer_on_an_fsspec_url_is_seen():
    pytest.importorskip("fsspec")
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    a, b, c = (compeft_rs.ExpertStore("memory://compeft-test-consistency") for _ in range(3))
    a.put("x", e1)
    assert a["x"].to_bytes() == e1.to_bytes() and same_weights(c.decoded("x"), e1.apply())
    b.put("x", e2, overwrite=True)
    assert a["x"].to_bytes() == e2.to_bytes() and same_weights(c.decoded("x"), e2.apply())
    b.remove("x")
    with pytest.raises(KeyError):
        c.decoded("x")
    assert a.get("x") is None


def test_revalidate_trusts_the_cache_for_that_long(tmp_path, monkeypatch):
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    a = compeft_rs.ExpertStore(tmp_path, revalidate=3600.0)
    a.put("x", e1)
    compeft_rs.ExpertStore(tmp_path).put("x", e2, overwrite=True)
    assert a["x"].to_bytes() == e1.to_bytes()  # within the hour: not checked
    now = time.monotonic()
    monkeypatch.setattr(_store.time, "monotonic", lambda: now + 3601)
    assert a["x"].to_bytes() == e2.to_bytes()
    with pytest.raises(ValueError, match="revalidate"):
        compeft_rs.ExpertStore(tmp_path, revalidate=-1)


def test_store_from_many_threads(tmp_path):
    experts = [an_expert(seed=s) for s in range(4)]
    store = compeft_rs.ExpertStore(tmp_path, decoded_cache_bytes=30_000)
    for i, e in enumerate(experts):
        store.put(f"e{i}", e)
    want = [e.apply() for e in experts]
    errors = []

    def work(t):
        try:
            for j in range(40):
                i = (t + j) % 4
                got = store.decoded(f"e{i}") if j % 2 else store[f"e{i}"].apply()
                assert same_weights(got, want[i])
                if j % 10 == 0:
                    store.put(f"e{i}", experts[i], overwrite=True)
        except BaseException as ex:  # reported in the main thread
            errors.append(ex)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert store._decoded.nbytes == held_bytes(store._decoded) <= 30_000


def _stalled(monkeypatch, obj, attr):
    """Patches obj.attr to stop, once, inside its call until ``release`` is set; ``inside`` is set
    when it gets there. Returns (inside, release)."""
    orig = getattr(obj, attr)
    inside, release = threading.Event(), threading.Event()

    def stalled(*args, **kwargs):
        if not inside.is_set():
            inside.set()
            assert release.wait(60), "never released"
        return orig(*args, **kwargs)

    monkeypatch.setattr(obj, attr, stalled)
    return inside, release


def _in_thread(fn):
    """Runs fn in a thread; returns (done event, results list: fn's value or the exception)."""
    done, out = threading.Event(), []

    def run():
        try:
            out.append(fn())
        except BaseException as ex:  # reported by the test
            out.append(ex)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, out


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_slow_put_does_not_hold_up_reads(tmp_path, monkeypatch, where):
    """While a put writes (stalled here inside the write), gets and decodes of other names, and
    of the name being written, return."""
    root = tmp_path if where == "local" else f"memory://compeft-test-slow-put-{os.getpid()}"
    store = compeft_rs.ExpertStore(root)
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    store.put("other", e1)
    store.put("x", e1)
    store.decoded("other")
    if where == "local":
        inside, release = _stalled(monkeypatch, _store, "stage_file")
    else:
        inside, release = _stalled(monkeypatch, store.fs, "pipe_file")
    put_done, put_out = _in_thread(lambda: store.put("x", e2, overwrite=True))
    try:
        assert inside.wait(60)
        done, out = _in_thread(lambda: (store["other"], store.decoded("other"), store["x"]))
        assert done.wait(30), "a read waited for another name's put"
        assert not put_done.is_set()  # the put was still in progress
        other, dec, x = out[0]
        assert other.to_bytes() == e1.to_bytes() and same_weights(dec, e1.apply())
        assert x.to_bytes() == e1.to_bytes()  # not yet replaced
    finally:
        release.set()
    assert put_done.wait(60) and put_out == [None]
    assert store["x"].to_bytes() == e2.to_bytes() and same_weights(store.decoded("x"), e2.apply())
    if where == "local":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["other.cpft.safetensors", "x.cpft.safetensors"]
    else:
        store.remove("x")
        store.remove("other")


@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "no-hard-links"])
def test_two_puts_without_overwrite_one_wins(tmp_path, monkeypatch, links):
    """A put checks that the name is free, then writes; another put of the name that lands in
    between wins, and the first fails rather than replace it."""
    if not links:
        def no_links(src, dst, *a, **k):
            raise OSError(1, "Operation not permitted")  # as on FAT

        monkeypatch.setattr(_io.os, "link", no_links)
    store = compeft_rs.ExpertStore(tmp_path)
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    inside, release = _stalled(monkeypatch, _store, "stage_file")
    done, out = _in_thread(lambda: store.put("x", e1))
    try:
        assert inside.wait(60)  # past its check, writing
        store.put("x", e2)  # not stalled: the patch stops once
    finally:
        release.set()
    assert done.wait(60)
    assert isinstance(out[0], FileExistsError) and "overwrite=True" in str(out[0])
    assert store["x"].to_bytes() == e2.to_bytes()
    assert compeft_rs.ExpertStore(tmp_path)["x"].to_bytes() == e2.to_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["x.cpft.safetensors"]  # no temporary left


def test_two_remote_puts_without_overwrite_one_wins(monkeypatch):
    pytest.importorskip("fsspec")
    store = compeft_rs.ExpertStore(f"memory://compeft-test-two-puts-{os.getpid()}")
    e1, e2 = an_expert(seed=1), an_expert(seed=2)
    inside, release = _stalled(monkeypatch, store.fs, "pipe_file")
    done, out = _in_thread(lambda: store.put("x", e1))
    try:
        assert inside.wait(60)
        with pytest.raises(FileExistsError, match="overwrite=True"):
            store.put("x", e2)  # the first is uploading
    finally:
        release.set()
    assert done.wait(60) and out == [None]
    assert store["x"].to_bytes() == e1.to_bytes()
    store.remove("x")


# -- materialised folders -----------------------------------------------------------------------


def folders(cache):
    return sorted(p.name for p in Path(cache).iterdir() if not p.name.startswith("."))


def test_the_materialised_folder_is_what_peft_loads(tmp_path):
    """The folder, loaded by peft's own from_pretrained, gives the outputs compeft_rs.load_peft
    gives from the expert (and the same tensors)."""
    from safetensors.torch import load_file

    for kw in ({}, {"lora_alpha": 32}, {"use_rslora": True}, {"rank_pattern": {"q": 4}, "alpha_pattern": {"v": 8}}):
        e = an_expert(**kw)
        store = compeft_rs.ExpertStore(tmp_path / "s")
        store.put("x", e, overwrite=True)
        folder = store.materialize("x", tmp_path / "c")
        assert same_weights(load_file(str(folder / "adapter_model.safetensors")), e.apply())
        assert json.loads((folder / "adapter_config.json").read_text()) == e.peft_config
        theirs = peft.PeftModel.from_pretrained(base_model(), str(folder)).eval()
        ours = compeft_rs.load_peft(base_model(), e).eval()
        x = torch.randn(16, 48, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert torch.equal(theirs(x), ours(x)), kw
            assert not torch.allclose(theirs(x), base_model()(x))  # the adapter does something


def test_cache_folder_is_private(tmp_path):
    store = compeft_rs.ExpertStore(tmp_path / "s")
    store.put("x", an_expert())
    cache = tmp_path / "a" / "b" / "cache"
    store.materialize("x", cache)
    for d in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_a_readable_cache_folder_is_left_as_it_is_and_its_entries_are_private(tmp_path):
    store = compeft_rs.ExpertStore(tmp_path / "s")
    store.put("x", an_expert())
    cache = tmp_path / "c"
    cache.mkdir()
    os.chmod(cache, 0o755)  # as earlier versions made it
    out = store.materialize("x", cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755  # never chmod a folder we did not make
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o1777, 0o775, 0o757], ids=["tmp-like", "group", "others"])
def test_a_cache_folder_others_can_write_is_refused_and_left_alone(tmp_path, mode):
    store = compeft_rs.ExpertStore(tmp_path / "s")
    store.put("x", an_expert())
    cache = tmp_path / "c"
    cache.mkdir()
    os.chmod(cache, mode)
    with pytest.raises(PermissionError, match=r"can be written by other users .*chmod 700"):
        store.materialize("x", cache)
    assert list(cache.iterdir()) == [] and stat.S_IMODE(cache.stat().st_mode) == mode


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("mode", [0o700, 0o777], ids=["0700", "0777"])
def test_a_cache_folder_of_another_user_is_refused(tmp_path, mode):
    store = compeft_rs.ExpertStore(tmp_path / "s")
    store.put("x", an_expert())
    cache = tmp_path / "c"
    cache.mkdir()
    os.chmod(cache, mode)
    os.chown(cache, 12345, 12345)
    with pytest.raises(PermissionError, match=r"cache folder .*/c belongs to another user \(uid 12345"):
        store.materialize("x", cache)
    assert list(cache.iterdir()) == [] and stat.S_IMODE(cache.stat().st_mode) == mode


def test_a_failed_write_leaves_nothing_under_the_hash(tmp_path, monkeypatch):
    import safetensors.torch

    store = compeft_rs.ExpertStore(tmp_path / "s")
    e = an_expert()
    store.put("x", e)
    real = safetensors.torch.save_file

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # half a file, then the error
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    cache = tmp_path / "c"
    with pytest.raises(OSError, match="No space left"):
        store.materialize("x", cache)
    assert folders(cache) == [] and [p.name for p in cache.iterdir()] == [f".{store.content_hash('x')[:32]}.lock"]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    folder = store.materialize("x", cache)
    assert folders(cache) == [folder.name] == [store.content_hash("x")[:32]]


def tamper_flip_a_byte(folder):
    p = folder / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x40
    p.write_bytes(bytes(data))


def tamper_truncate(folder):
    p = folder / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-4])


def tamper_no_sidecar(folder):
    (folder / ".compeft.json").unlink()


def tamper_config(folder):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 10_000
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def tamper_extra_file(folder):
    (folder / "adapter_model.bin").write_bytes(b"x")


def tamper_foreign(folder):  # someone else's folder at the predictable path, sidecar and all
    import shutil

    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    side = {"format": 1, "expert_sha256": "0" * 64, "files": {}}
    (folder / ".compeft.json").write_text(json.dumps(side))


@pytest.mark.parametrize("tamper", [tamper_flip_a_byte, tamper_truncate, tamper_no_sidecar, tamper_config,
                                    tamper_extra_file, tamper_foreign])
def test_a_changed_folder_is_rebuilt_not_served(tmp_path, tamper):
    store = compeft_rs.ExpertStore(tmp_path / "s")
    e = an_expert()
    store.put("x", e)
    folder = store.materialize("x", tmp_path / "c")
    want = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    tamper(folder)
    assert store.materialize("x", tmp_path / "c") == folder
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == want


def test_a_link_at_the_hash_is_replaced_and_its_target_left_alone(tmp_path):
    store = compeft_rs.ExpertStore(tmp_path / "s")
    store.put("x", an_expert())
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep")
    (cache / store.content_hash("x")[:32]).symlink_to(elsewhere)
    folder = store.materialize("x", cache)
    assert not folder.is_symlink() and (folder / ".compeft.json").is_file()
    assert (elsewhere / "precious").read_text() == "keep"


def test_the_folder_cache_is_bounded_least_recently_used_first(tmp_path):
    experts = [an_expert(seed=s) for s in range(4)]
    store = compeft_rs.ExpertStore(tmp_path / "s")
    for i, e in enumerate(experts):
        store.put(f"e{i}", e)
    one = store.materialize("e0", tmp_path / "probe")
    size = sum(p.stat().st_size for p in one.iterdir())
    cache = tmp_path / "c"

    def use(i, cap=2 * size + size // 2):
        p = store.materialize(f"e{i}", cache, cache_max_bytes=cap)
        time.sleep(0.05)  # distinct mtimes (the kernel's clock may tick every 10 ms)
        return p.name

    p0, p1 = use(0), use(1)
    assert use(0) == p0  # reused and touched: now e1 is the least recently used
    p2 = use(2)
    assert folders(cache) == sorted([p0, p2])
    p3 = use(3)
    assert folders(cache) == sorted([p2, p3])
    assert use(1, cap=1) == p1 and folders(cache) == [p1]  # never the one returned
    assert use(0, cap=None) == p0 and folders(cache) == sorted([p0, p1])


def test_materialize_waits_for_the_lock(tmp_path):
    from filelock import FileLock

    store = compeft_rs.ExpertStore(tmp_path / "s")
    store.put("x", an_expert())
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    digest = store.content_hash("x")[:32]
    got = []
    with FileLock(str(cache / f".{digest}.lock")):
        t = threading.Thread(target=lambda: got.append(store.materialize("x", cache)))
        t.start()
        t.join(1.0)
        assert t.is_alive() and folders(cache) == [] and got == []
    t.join(60)
    assert got == [cache / digest]


def _materialize_counting(args):
    root, cache, marker, n = args
    from compeft_rs import _store as s

    write = s._write_folder

    def counting(out, exp, digest):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # the other process asks meanwhile
        write(out, exp, digest)

    s._write_folder = counting
    # Start together: each says it is ready and waits for the others.
    Path(f"{marker}.ready.{os.getpid()}").touch()
    while len(list(Path(marker).parent.glob(Path(marker).name + ".ready.*"))) < n:
        time.sleep(0.01)
    return str(compeft_rs.ExpertStore(root).materialize("x", cache))


def test_two_processes_materialize_the_same_expert_once(tmp_path):
    e = an_expert()
    compeft_rs.ExpertStore(tmp_path / "s").put("x", e)
    marker = tmp_path / "writes"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.map(_materialize_counting, [(str(tmp_path / "s"), str(tmp_path / "c"), str(marker), 2)] * 2)
    assert len(set(paths)) == 1
    assert len(marker.read_text().split()) == 1  # one process wrote it, the other reused it
    assert folders(tmp_path / "c") == [paths[0].rsplit("/", 1)[-1]]
    folder = Path(paths[0])
    assert sorted(q.name for q in folder.iterdir()) == [".compeft.json", "adapter_config.json",
                                                         "adapter_model.safetensors"]
    from safetensors.torch import load_file

    assert same_weights(load_file(str(folder / "adapter_model.safetensors")), e.apply())


# -- what killed writers leave ------------------------------------------------------------------


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def untouched(path, seconds):
    """Sets the mtimes of ``path`` and everything in it ``seconds`` back (as if nothing wrote there)."""
    t = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (t, t), follow_symlinks=False)


def test_stale_temporaries_are_swept_when_writing_there_again(tmp_path):
    host, other = _io._host_tag(), "0badf00d"
    assert host != other
    d = tmp_path / "d"
    d.mkdir()
    me, gone = os.getpid(), dead_pid()
    minute, hour = 60, 3600
    names = {  # name: (seconds untouched, kept)
        f".a.cpft.safetensors.{gone}-{host}-k3j4h5g6.tmp": (11 * minute, False),  # writer gone, idle 11 min
        # Writer gone from this pid namespace, but recently touched: maybe another container's.
        f".a2.cpft.safetensors.{gone}-{host}-k3j4h5g6.tmp": (9 * minute, True),
        f".b.cpft.safetensors.{me}-{host}-k3j4h5g6.tmp": (0, True),  # writer alive, recent
        f".b2.cpft.safetensors.{me}-{host}-k3j4h5g6.tmp": (50 * minute, True),  # alive, idle under an hour
        f".c.cpft.safetensors.{me}-{host}-k3j4h5g6.tmp": (2 * hour, False),  # alive but idle two hours
        f".d.cpft.safetensors.{gone}-{other}-k3j4h5g6.tmp": (50 * minute, True),  # another host's, under an hour
        f".e.cpft.safetensors.{gone}-{other}-k3j4h5g6.tmp": (2 * hour, False),  # another host's, old
        ".f.tmp": (2 * hour, True),  # not ours
        f".g.{gone}-{host}.tmp": (2 * hour, True),  # not ours either
    }
    for n, (idle, _) in names.items():
        (d / n).write_bytes(b"partial")
        untouched(d / n, idle)
    # A folder renamed aside by a writer killed before the new one took its place: put back.
    aside = d / f".out.{gone}-{host}-abcdefgh.old"
    (aside / "old").mkdir(parents=True)
    (aside / "old" / "adapter_config.json").write_text("{}")
    untouched(aside, 11 * minute)
    tmpdir = d / f".out2.{gone}-{host}-abcdefgh.tmp"
    tmpdir.mkdir()
    (tmpdir / "adapter_model.safetensors").write_bytes(b"half")
    untouched(tmpdir, 11 * minute)
    # A folder counts as touched when a file in it is: one being filled is left alone.
    busy = d / f".out3.{gone}-{host}-abcdefgh.tmp"
    busy.mkdir()
    (busy / "adapter_config.json").write_text("{}")
    (busy / "adapter_model.safetensors").write_bytes(b"being")
    untouched(busy, 11 * minute)
    (busy / "adapter_model.safetensors").write_bytes(b"being written")  # the folder's own mtime stays
    assert time.time() - busy.stat().st_mtime > 10 * minute
    an_expert().save(d / "new.cpft.safetensors")
    left = sorted(p.name for p in d.iterdir())
    assert left == sorted([n for n, (_, keep) in names.items() if keep] + [busy.name, "new.cpft.safetensors", "out"])
    assert (d / "out" / "adapter_config.json").read_text() == "{}"


def test_a_writer_killed_mid_save_leaves_a_temporary_the_next_store_sweeps(tmp_path):
    e = an_expert()
    d = tmp_path / "store"
    d.mkdir()
    code = textwrap.dedent(f"""
        import time
        from compeft_rs._io import atomic_file

        def write(tmp):
            tmp.write_bytes(b"half an expert")
            time.sleep(60)

        atomic_file({str(d / 'x.cpft.safetensors')!r}, write)
    """)
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while not [q for q in d.iterdir() if q.name.endswith(".tmp")] and time.time() < deadline:
            time.sleep(0.05)
        (tmp,) = [q.name for q in d.iterdir()]
        assert tmp.startswith(f".x.cpft.safetensors.{p.pid}-{_io._host_tag()}-")
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert [q.name for q in d.iterdir()] == [tmp]  # what kill -9 leaves
    # Its pid is gone, but a writer in another pid namespace (a container sharing the volume and
    # the host name) would look the same: kept until untouched for ten minutes.
    compeft_rs.ExpertStore(d)
    assert [q.name for q in d.iterdir()] == [tmp]
    untouched(d / tmp, 601)
    store = compeft_rs.ExpertStore(d)
    assert list(d.iterdir()) == [] and len(store) == 0
    store.put("x", e)
    assert [q.name for q in d.iterdir()] == ["x.cpft.safetensors"]


def test_a_store_sweeps_old_temporaries_of_earlier_versions(tmp_path):
    old, new = ".x.cpft.safetensors.ab_cd123.tmp", ".y.cpft.safetensors.ef_gh456.tmp"
    for n in (old, new):
        (tmp_path / n).write_bytes(b"partial")
    t = time.time() - 2 * 3600
    os.utime(tmp_path / old, (t, t))
    compeft_rs.ExpertStore(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [new]  # a recent one may still be written

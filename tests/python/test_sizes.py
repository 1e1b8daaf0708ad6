"""Stream sizes against the expected Rice length and the entropy bound (DESIGN.md section 2)."""

import numpy as np
import pytest

import compeft_rs
from reference import entropy_bits, expected_rice_bits, rice_b


@pytest.fixture(scope="module")
def tau():
    return np.random.default_rng(1234).standard_normal(1_000_000).astype(np.float16)


def overhead_bits(c):
    # Header (< 40 bytes), checksum and the block index (< 8 bytes per block of 4096 nonzeros).
    return 8 * (40 + 8 * (c.nnz // 4096 + 1))


@pytest.mark.parametrize("k", [0.05, 0.1, 0.2])
def test_golomb_size(tau, k):
    c = compeft_rs.encode(tau, k)
    d = tau.size
    assert c.nnz == round(k * d)
    assert c.rice_param == rice_b(c.nnz, d)
    bits = 8 * c.nbytes
    expected = expected_rice_bits(c.nnz, d)
    assert bits <= 1.02 * expected + overhead_bits(c)
    assert bits >= 0.98 * expected
    assert bits <= 1.03 * entropy_bits(d, k) + overhead_bits(c)
    # The package's own figures agree with the reference formulas.
    assert compeft_rs.expected_golomb_bits(c.nnz, d) == pytest.approx(expected, rel=1e-12)
    assert compeft_rs.entropy_bound_bits(d, k) == pytest.approx(entropy_bits(d, k), rel=1e-12)


def test_entropy_bound_values_from_design():
    assert compeft_rs.entropy_bound_bits(1, 0.1) == pytest.approx(0.569, abs=5e-4)
    assert compeft_rs.entropy_bound_bits(1, 0.05) == pytest.approx(0.336, abs=5e-4)


@pytest.mark.parametrize("k", [0.05, 0.2])
def test_bitmask_size(tau, k):
    c = compeft_rs.encode(tau, k, encoding="bitmask")
    assert 2 * tau.size <= 8 * c.nbytes <= 2 * tau.size + 8 * 40


def test_ratio_against_fp16(tau):
    c = compeft_rs.encode(tau, 0.1)
    assert tau.nbytes / c.nbytes > 25  # 16 bits against about 0.58


def _lora_adapter(dtype):
    """The shape of the study's adapter: r=8 on q/k/v/o of a 6-layer, 384-wide encoder, and a
    classifier head; values as after training (B no longer zero)."""
    g = np.random.default_rng(7)
    sd = {}
    for layer in range(6):
        for mod in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            p = f"base_model.model.encoder.layer.{layer}.{mod}"
            sd[f"{p}.lora_A.weight"] = g.uniform(-0.05, 0.05, (8, 384))
            sd[f"{p}.lora_B.weight"] = g.normal(0, 0.01, (384, 8))
    sd["base_model.model.classifier.weight"] = g.normal(0, 0.02, (2, 384))
    sd["base_model.model.classifier.bias"] = np.zeros(2)
    torch = pytest.importorskip("torch")
    return {n: torch.from_numpy(v).to(dtype) for n, v in sd.items()}


@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
def test_small_lora_expert_file_is_payload_plus_little(dtype_name):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    sd = _lora_adapter(getattr(torch, dtype_name))
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "task_type": "SEQ_CLS", "bias": "none",
              "target_modules": ["query", "key", "value", "attention.output.dense"],
              "modules_to_save": ["classifier", "score"], "base_model_name_or_path": "all-MiniLM-L6-v2",
              "init_lora_weights": True}
    e = compeft_rs.compress_expert(sd, 0.1, peft_config=config)
    streams = sum(e.stream(n).nbytes for n in e.compressed_keys())
    head = sum(sd[n].numel() * sd[n].element_size() for n in e.lossless_keys())
    # The whole file (names, config, safetensors header and all) takes at most 600 bytes more
    # than its 48 bare streams would (each with its 33-byte header and checksum): the packed
    # headers deflate to less than those; version 2 took 4.5 kB more.
    assert e.nbytes - head < streams + 600
    fp16_file = len(save({n: t.half().contiguous() for n, t in sd.items()}))
    if dtype_name == "float16":
        assert fp16_file / e.nbytes >= 20


def test_rice_parameter_against_decimal_arithmetic_near_boundaries():
    import math

    phi = (1 + 5 ** 0.5) / 2
    cases = [(789, 1_719_256_699), (796, 1_734_509_927), (1, 1 << 48), (9, 10), (1, 2), (1, 3)]
    for m in range(1, 40, 3):  # densities where r = ln(phi - 1) / ln(1 - p) crosses 2^m
        p = -math.expm1(math.log(phi - 1) / 2 ** m)
        for n in (1, 7, 789):
            d = round(n / p)
            cases += [(n, d - 1), (n, d), (n, d + 1)]
    for nnz, d in cases:
        if 0 < nnz < d:
            assert compeft_rs.rice_parameter(nnz, d) == rice_b(nnz, d), (nnz, d)

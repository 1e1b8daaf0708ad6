"""CompressedExpert.decode_into: an expert decoded into existing tensors (a model's weights,
reused buffers) holds what decode() returns, in their dtype; bad outputs are refused before
anything is written."""

import numpy as np
import pytest
import torch

import compeft_rs

peft = pytest.importorskip("peft")


def an_expert(seed=0, k=0.2):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "m.lora_A.weight": torch.randn(8, 96, generator=g).half(),
        "m.lora_B.weight": torch.randn(80, 8, generator=g).half() * 1e-2,
        "bias": torch.randn(100, generator=g),
    }
    return compeft_rs.compress_expert(sd, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_into_tensors_of_any_float_dtype_and_layout(dtype):
    e = an_expert()
    want = e.decode(dtype=dtype)
    contiguous = {n: torch.full(t.shape, 7.0, dtype=dtype) for n, t in want.items()}
    # A transposed view: not contiguous, so decoded beside it and copied in.
    strided = {n: (torch.full(t.shape[::-1], 7.0, dtype=dtype).T if t.dim() == 2 else torch.full(t.shape, 7.0,
                                                                                                 dtype=dtype))
               for n, t in want.items()}
    for out in (contiguous, strided):
        e.decode_into(out)
        for n in want:
            assert torch.equal(out[n], want[n].to(dtype)), n  # kept exactly: converted


@pytest.mark.parametrize("np_dtype", [np.float16, np.float32, np.float64])
def test_into_numpy_arrays(np_dtype):
    e = an_expert()
    want = e.decode(dtype=torch.float32)
    out = {n: np.full(tuple(t.shape), 7.0, np_dtype) for n, t in want.items()}
    strided = {n: np.full(tuple(t.shape)[::-1], 7.0, np_dtype).T for n, t in want.items()}
    for o in (out, strided):
        e.decode_into(o)
        for n in want:
            exact = e.init_of(n) is None
            ref = want[n] if exact else e.decode([n], dtype=np.dtype(np_dtype).name)[n]
            np.testing.assert_array_equal(o[n], ref.numpy().astype(np_dtype), err_msg=n)


def test_a_bfloat16_tensor_kept_exactly_into_numpy_float16():
    # numpy has no bfloat16 of its own: the values go through float32, not as raw bits.
    sd = {"m.lora_A.weight": torch.randn(8, 96).bfloat16(), "bias": torch.randn(100).bfloat16()}
    e = compeft_rs.compress_expert(sd, 0.2)
    assert e.init_of("bias") is None  # kept exactly
    out = {"bias": np.zeros(100, np.float16)}
    e.decode_into(out)
    np.testing.assert_array_equal(out["bias"], sd["bias"].float().numpy().astype(np.float16))


def test_some_names_into_parameters_that_require_grad():
    # Parameters as a module holds them (requires_grad), only the names given are written.
    e = an_expert()
    want = e.decode()
    lin = torch.nn.Linear(96, 8, bias=False).half()
    e.decode_into({"m.lora_A.weight": lin.weight})
    assert lin.weight.requires_grad and torch.equal(lin.weight.detach(), want["m.lora_A.weight"])


def test_a_model_loaded_through_decode_into_gives_peft_outputs():
    # The user's view: the expert written into a PeftModel's own parameters gives the outputs of
    # the same model loaded by peft from the decoded state dict, and the parameters stay in place.
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], modules_to_save=[])
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    e = compeft_rs.compress_peft(model, 0.3)
    ref = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)),
                              cfg)
    ref.load_state_dict(model.state_dict(), strict=False)  # same base weights
    peft.set_peft_model_state_dict(ref, e.apply())
    params = peft.get_peft_model_state_dict(model)
    before = {n: t.data_ptr() for n, t in params.items()}
    e.decode_into(params)
    assert {n: t.data_ptr() for n, t in peft.get_peft_model_state_dict(model).items()} == before
    x = torch.randn(5, 32)
    assert torch.equal(model(x), ref(x))


def test_bad_outputs_are_refused_before_anything_is_written():
    e = an_expert()
    good = {n: torch.full(t.shape, 7.0) for n, t in e.decode(dtype=torch.float32).items()}

    def untouched():
        return all(bool((t == 7.0).all()) for t in good.values())

    aliased = torch.zeros(640 + 100)
    np_aliased = np.zeros(740, np.float32)
    cases = [
        ({"nope": torch.zeros(3)}, KeyError, "not in this expert"),
        ({"m.lora_A.weight": torch.zeros(96, 8)}, ValueError, r"shape \(96, 8\)"),
        ({"bias": torch.zeros(99)}, ValueError, r"shape \(99,\)"),
        ({"m.lora_A.weight": torch.zeros(8, 96, dtype=torch.int32)}, ValueError, "float16, bfloat16"),
        ({"bias": np.broadcast_to(np.float32(0), (100,))}, ValueError, "read-only"),
        ({"bias": torch.zeros(1).expand(100)}, ValueError, "expanded view"),
        ({"bias": np.zeros(100, ">f4")}, ValueError, "byte order"),
        ({"bias": torch.empty(100, device="meta")}, ValueError, "meta device"),
        # Two names over overlapping memory (the decode writes both in parallel).
        ({"m.lora_B.weight": aliased[:640].view(80, 8), "bias": aliased[600:700]}, ValueError, "share memory"),
        ({"m.lora_B.weight": np_aliased[:640].reshape(80, 8), "bias": np_aliased[600:700]}, ValueError,
         "share memory"),
        ({"bias": [0.0] * 100}, TypeError, "torch tensor or a numpy array"),
    ]
    for bad, err, msg in cases:
        # The bad outputs last, after good ones that would be written first.
        given = {**{n: t for n, t in good.items() if n not in bad}, **bad}
        with pytest.raises(err, match=msg):
            e.decode_into(given)
        assert untouched(), bad
    # Side by side in one buffer, not overlapping: fine.
    buf = torch.full((740,), 7.0)
    e.decode_into({"m.lora_B.weight": buf[:640].view(80, 8), "bias": buf[640:]})
    want = e.decode(dtype=torch.float32)
    assert torch.equal(buf[:640].view(80, 8), want["m.lora_B.weight"]) and torch.equal(buf[640:], want["bias"])

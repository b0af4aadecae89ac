"""Packed int4 / int2 storage: bit-exact round trips and ONNX's INT4 / UINT4 byte layout."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from jquant.integer.packing import STORAGES, narrowest_storage, pack, packed_length, unpack


@given(
    bits=st.sampled_from([2, 4]),
    signed=st.booleans(),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**31),
)
def test_round_trip_is_bit_exact_for_any_length(bits, signed, shape, seed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    codes = np.random.default_rng(seed).integers(lo, hi + 1, shape).astype(np.int8)
    packed = pack(codes, bits, signed=signed)
    assert packed.dtype == np.uint8
    assert packed.shape == (*shape[:-1], packed_length(shape[-1], bits))
    np.testing.assert_array_equal(unpack(packed, bits, shape[-1], signed=signed), codes)


@pytest.mark.parametrize("signed, dtype", [(True, TensorProto.INT4), (False, TensorProto.UINT4)])
def test_int4_bytes_are_onnx_packing(rng, signed, dtype):
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = rng.integers(lo, hi + 1, 11)  # odd length: the last byte half empty
    tensor = helper.make_tensor("t", dtype, [11], codes.tolist())
    onnx_bytes = np.asarray(tensor.int32_data, np.uint8)  # one packed byte per entry
    assert len(onnx_bytes) == 6
    np.testing.assert_array_equal(pack(codes, 4, signed=signed), onnx_bytes)


def test_known_bytes():
    # int4: 1 (0x1) low, -1 (0xF) high -> 0xF1; int2: 1, -2 (0b10), 0, -1 (0b11) -> 0b11001001
    assert pack(np.array([1, -1]), 4).tolist() == [0xF1]
    assert pack(np.array([1, -2, 0, -1]), 2).tolist() == [0b11001001]
    assert pack(np.array([3]), 2, signed=False).tolist() == [3]


def test_bad_input():
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        pack(np.array([8]), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(np.array([1]), 3)
    with pytest.raises(TypeError, match="integer array"):
        pack(np.array([0.5]), 4)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack(np.zeros(3, np.uint8), 4, 4)
    with pytest.raises(TypeError, match="uint8"):
        unpack(np.zeros(2, np.int8), 4, 4)


@given(lo=st.integers(-130, 20), span=st.integers(0, 150), n=st.integers(1, 9))
def test_narrowest_storage_is_the_first_range_that_holds_the_codes(lo, span, n):
    """Oracle: the ranges written out from the formula, tried narrowest first."""
    hi = lo + span
    codes = np.linspace(lo, hi, n).round().astype(np.int16)
    codes[0], codes[-1] = lo, hi
    ranges = {"int2": (-2, 1), "uint2": (0, 3), "int4": (-8, 7), "uint4": (0, 15)}
    want = next((k for k, (a, b) in ranges.items() if a <= lo and hi <= b), None)
    assert narrowest_storage(codes) == want
    assert list(STORAGES) == list(ranges)
    if want is not None:  # and the codes round-trip through that storage
        bits, signed = STORAGES[want]
        packed = pack(codes, bits, signed=signed)
        assert packed.size == -(-n * bits // 8)
        np.testing.assert_array_equal(unpack(packed, bits, n, signed=signed), codes)


def test_narrowest_storage_rejects_floats():
    with pytest.raises(TypeError, match="integer array"):
        narrowest_storage(np.array([0.5]))

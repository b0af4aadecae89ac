"""Tests of jquant.nn.rules: matching order, unused rules, validation, per-layer bits."""

import re
import warnings

import pytest

from jquant.formats import IntFormat, fp8_e4m3, int4
from jquant.nn.rules import (
    QuantRule,
    match_rules,
    report_not_quantized,
    report_unused,
    set_bits,
)

PATHS = ["conv1", "conv2", "dense1", "head"]


def test_first_match_wins_and_fullmatch():
    first = QuantRule("conv1", keep_float=True)
    convs = QuantRule("conv.", weight="int4")
    rest = QuantRule(".*", weight="int2")
    m = match_rules([first, convs, rest], PATHS)
    assert m.assignment["conv1"] is first
    assert m.assignment["conv2"] is convs
    assert m.assignment["dense1"] is rest and m.assignment["head"] is rest
    assert m.unused == ()
    # fullmatch: "conv" alone matches no path ("conv1" is longer)
    assert match_rules([QuantRule("conv")], PATHS).assignment == dict.fromkeys(PATHS)


def test_unused_rules_reported_in_order():
    a, b, c = QuantRule("head"), QuantRule("encoder/.*"), QuantRule("xyz")
    m = match_rules([a, b, c], PATHS)
    assert m.unused == (b, c)
    with pytest.warns(UserWarning, match=re.escape("['encoder/.*', 'xyz']")):
        report_unused(m, "warn")
    with pytest.raises(ValueError, match="matched no layer"):
        report_unused(m, "raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_unused(m, "ignore")


def test_layers_rules_cannot_quantize_are_listed_and_warned_about():
    keep, convs, rest = QuantRule("up2", keep_float=True), QuantRule("up1"), QuantRule("head")
    m = match_rules([keep, convs, rest], ["head"], {"up1": "ConvTranspose", "up2": "Foo"})
    assert m.not_quantized == {"up1": "ConvTranspose"}  # up2 is float on purpose
    assert m.unused == ()  # a rule matching only unquantizable layers was used
    with pytest.warns(UserWarning, match=re.escape("'up1' (ConvTranspose)")):
        report_not_quantized(m)
    assert match_rules([rest], ["head"], {"up1": "ConvTranspose"}).not_quantized == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_not_quantized(match_rules([rest], PATHS))


def test_rule_formats_and_configs():
    r = QuantRule(".*", weight="int4", act="uint8", weight_granularity="per_tensor")
    assert r.weight == int4 and r.act == IntFormat(8, signed=False)
    assert r.weight_config(4).axis is None
    assert QuantRule(".*").weight_config(4).axis == 3  # per output channel (HWIO / IO)
    # a DenseGeneral / einsum kernel: per channel along every non-contracted axis
    assert QuantRule(".*").weight_config(3, (0, 2)).axis == (0, 2)
    assert r.weight_config(3, (0, 2)).axis is None
    assert QuantRule(".*", act=None).act_config() is None
    assert QuantRule(".*", keep_float=True).weight_config(2) is None
    assert (
        QuantRule(".*", act=IntFormat(2, signed=False), act_estimator="pact").act_config().estimator
        == "pact"
    )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"pattern": "conv(1"}, ValueError, "not a valid regex"),
        ({"pattern": ".*", "weight": "int5"}, ValueError, "unknown format 'int5'"),
        ({"pattern": ".*", "act": 8}, TypeError, "QuantRule.act"),
        ({"pattern": ".*", "estimator": "magic"}, ValueError, "estimator"),
        ({"pattern": ".*", "calibration": "max"}, ValueError, "calibration"),
        ({"pattern": ".*", "mode": "fast"}, ValueError, "mode"),
        ({"pattern": ".*", "weight_granularity": "per_row"}, ValueError, "granularity"),
        ({"pattern": ".*", "act_estimator": "pact"}, ValueError, "unsigned"),
        ({"pattern": ".*", "weight": fp8_e4m3, "estimator": "lsq"}, ValueError, "IntFormat"),
        ({"pattern": 3}, TypeError, "pattern"),
    ],
)
def test_bad_rules_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QuantRule(**kwargs)


def test_match_rules_rejects_non_rules():
    with pytest.raises(TypeError, match=r"rules\[1\]"):
        match_rules([QuantRule(".*"), "conv1"], PATHS)


def test_set_bits_overrides_one_layer_only():
    rules = (QuantRule("conv1", keep_float=True), QuantRule(".*", weight="int8", act="uint8"))
    new = set_bits(rules, "dense1", weight_bits=3, act_bits=4)
    m = match_rules(new, PATHS).assignment
    assert m["dense1"].weight == IntFormat(3)
    assert m["dense1"].act == IntFormat(4, signed=False)  # keeps signedness of the old format
    assert m["conv2"].weight == IntFormat(8) and m["conv1"].keep_float
    assert (
        not match_rules(set_bits(rules, "conv1", weight_bits=2), PATHS)
        .assignment["conv1"]
        .keep_float
    )

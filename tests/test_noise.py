"""Tests for saema_core.noise: seeds, scales, noise draws, validation of the sweep axes."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from saema_core.noise import (
    DEFAULT_NOISE_LEVELS,
    add_noise,
    derive_seed,
    noise_scale,
    validate_noise_levels,
    validate_replicates,
)

HOOK = "blocks.3.hook_resid_post"


def test_derive_seed_has_a_fixed_value():
    # Hard-coded: a change here silently changes every stored noise draw.
    assert derive_seed(42, HOOK, "months", 0.1, 2) == 5172372231201001154


def test_derive_seed_is_canonical_in_sigma():
    reference = derive_seed(42, HOOK, "months", 0.1, 2)
    assert derive_seed(42, HOOK, "months", np.float64(0.1), 2) == reference
    assert derive_seed(42, HOOK, "months", 1e-1, 2) == reference
    assert derive_seed(0, HOOK, "months", -0.0, 0) == derive_seed(0, HOOK, "months", 0, 0)


@pytest.mark.parametrize(
    "changed",
    [
        (43, HOOK, "months", 0.1, 2),
        (42, "blocks.4.hook_resid_post", "months", 0.1, 2),
        (42, HOOK, "days", 0.1, 2),
        (42, HOOK, "months", 0.2, 2),
        (42, HOOK, "months", 0.1, 1),
    ],
)
def test_derive_seed_depends_on_every_field(changed):
    assert derive_seed(*changed) != derive_seed(42, HOOK, "months", 0.1, 2)


def test_derive_seed_does_not_confuse_field_boundaries():
    assert derive_seed(0, "a|b", "c", 0.0, 0) != derive_seed(0, "a", "b|c", 0.0, 0)


def test_seed_and_noise_are_identical_in_another_process():
    code = (
        "from saema_core.noise import derive_seed, add_noise; import numpy as np;"
        f"s = derive_seed(42, {HOOK!r}, 'months', 0.1, 2);"
        "print(s, add_noise(np.zeros((2, 3, 4)), 0.5, 2.0, s).tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    seed = derive_seed(42, HOOK, "months", 0.1, 2)
    here = add_noise(np.zeros((2, 3, 4)), 0.5, 2.0, seed).tobytes().hex()
    assert out.stdout.split() == [str(seed), here]


@pytest.mark.parametrize("bad", [(-1, {}), (0, {"sigma": -0.1}), (0, {"sigma": math.nan})])
def test_derive_seed_rejects_bad_fields(bad):
    replicate, override = bad
    fields = {
        "base_seed": 0,
        "hook": HOOK,
        "concept": "months",
        "sigma": 0.1,
        "replicate": replicate,
    }
    with pytest.raises(ValueError):
        derive_seed(**{**fields, **override})


def test_noise_scale_absolute_is_one():
    assert noise_scale(np.full((2, 2, 3), 7.0), np.ones((2, 2), bool), "absolute") == 1.0


def test_noise_scale_relative_by_hand():
    # Analysed tokens: ‖(2,2,2,2)‖/√4 = 2 and 0 → RMS √((4 + 0)/2) = √2. The masked token is ignored.
    x = np.array([[[2.0, 2, 2, 2], [0, 0, 0, 0], [1e6, 0, 0, 0]]])
    mask = np.array([[True, True, False]])
    assert noise_scale(x, mask, "relative") == pytest.approx(math.sqrt(2))


def test_noise_scale_rejects_bad_input():
    with pytest.raises(ValueError, match="'other'"):
        noise_scale(np.ones((1, 2, 3)), np.ones((1, 2), bool), "other")
    with pytest.raises(ValueError, match="cell c7"):
        noise_scale(np.zeros((1, 2, 3)), np.ones((1, 2), bool), "relative", cell="c7")
    with pytest.raises(ValueError, match="at least one analysed"):
        noise_scale(np.ones((1, 2, 3)), np.zeros((1, 2), bool), "relative")


def test_add_noise_sigma_zero_returns_x():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = add_noise(x, 0.0, 1.0, seed=5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_add_noise_is_float32_deterministic_and_scaled():
    x = np.ones((4, 50, 50), dtype=np.float64)
    a, b = add_noise(x, 0.5, 2.0, seed=11), add_noise(x, 0.5, 2.0, seed=11)
    assert a.dtype == np.float32 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    eps = (a - 1.0) / (0.5 * 2.0)
    assert abs(eps.mean()) < 0.02 and eps.std() == pytest.approx(1.0, abs=0.02)
    assert not np.array_equal(a, add_noise(x, 0.5, 2.0, seed=12))


def test_add_noise_rejects_bad_sigma_and_scale():
    with pytest.raises(ValueError, match="sigma"):
        add_noise(np.zeros((1, 1, 2)), -1.0, 1.0, 0)
    with pytest.raises(ValueError, match="scale"):
        add_noise(np.zeros((1, 1, 2)), 1.0, 0.0, 0)


def test_validate_noise_levels_sorts():
    assert validate_noise_levels([1, 0.5, 0]) == (0.0, 0.5, 1.0)
    assert validate_noise_levels(DEFAULT_NOISE_LEVELS) == DEFAULT_NOISE_LEVELS


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ([0, -0.1], "-0.1"),
        ([0, math.nan], "nan"),
        ([0, math.inf], "inf"),
        ([0, 0.1, 0.1], "duplicate"),
        ([], "empty"),
    ],
)
def test_validate_noise_levels_rejects(levels, message):
    with pytest.raises(ValueError, match=message):
        validate_noise_levels(levels)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_validate_replicates_rejects(bad):
    with pytest.raises(ValueError, match="replicates"):
        validate_replicates(bad)


def test_validate_replicates_accepts():
    assert validate_replicates(3) == 3
    assert validate_replicates(np.int64(1)) == 1

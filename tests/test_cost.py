"""The verify cost curve: measurement, the disk cache (a damaged file is re-measured, not trusted), pricing."""

import json

import pytest

from lookahead import cost
from lookahead.cost import CostModel, calibrate, curve_key, measure_cost_curve


def test_cost_model_prices_relative_to_one_token():
    model = CostModel({1: 0.02, 8: 0.0226, 16: 0.0274})
    assert model(1) == 1.0 and model(8) == pytest.approx(1.13) and model(16) == pytest.approx(1.37)
    assert model(12) == pytest.approx(1.25)  # linear between points
    assert model(24) == pytest.approx(1.37 + 8 * 0.24 / 8)  # and beyond the last
    for bad in ({}, {0: 1.0}, {1: 0.0}, {1: -2.0}):
        with pytest.raises(ValueError, match="cost curve"):
            CostModel(bad)


def test_measured_curve_covers_every_size_and_never_falls(tiny_llama):
    curve = measure_cost_curve(tiny_llama(), [1, 2, 4, 8])
    assert sorted(curve) == [1, 2, 4, 8]
    assert all(v > 0 for v in curve.values())
    assert [curve[T] for T in (1, 2, 4, 8)] == sorted(curve[T] for T in (1, 2, 4, 8))


def test_calibrate_caches_on_the_model_and_on_disk(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    model = tiny_llama()
    curve = calibrate(model, 8)
    assert sorted(curve) == [1, 2, 3, 4, 6, 8]
    assert model.state.cost_curves[curve_key(model)] is curve
    saved = json.loads((tmp_path / "cost_curves.json").read_text())
    assert {int(T) for T in saved[curve_key(model)]} == {1, 2, 3, 4, 6, 8}

    def no_measuring(*args):
        raise AssertionError("measured although the curve was cached")

    monkeypatch.setattr(cost, "measure_cost_curve", no_measuring)
    fresh = tiny_llama()  # same shape, device, dtype, threads: the disk cache serves it
    assert calibrate(fresh, 8) == curve


@pytest.mark.parametrize("damage", ["{not json", json.dumps([1, 2]), json.dumps({"k": {"1": -1.0}}), "\x00\x01"])
def test_a_damaged_cache_file_is_measured_again(tiny_llama, tmp_path, monkeypatch, damage):
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path))
    model = tiny_llama()
    (tmp_path / "cost_curves.json").write_text(damage)
    curve = calibrate(model, 4)
    assert sorted(curve) == [1, 2, 3, 4]
    saved = json.loads((tmp_path / "cost_curves.json").read_text())  # rewritten whole
    assert set(saved[curve_key(model)]) == {"1", "2", "3", "4"}


def test_curve_key_names_what_the_cost_depends_on(tiny_llama, monkeypatch):
    key = curve_key(tiny_llama())
    for part in ("llama-2x32", "cpu", "float32", "threads=", "graphs=0"):
        assert part in key

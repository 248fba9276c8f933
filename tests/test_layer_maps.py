import pytest

from letrecipes.components.layer_maps import LayerMap, LayerMapError


@pytest.mark.parametrize(
    "preset, depth, expected",
    [
        ("L2E", 4, [(1, 4)]), ("L2M", 4, [(2, 4)]), ("L2L", 4, [(4, 4)]),
        ("M2E", 4, [(1, 2)]), ("M2M", 4, [(2, 2)]), ("M2L", 4, [(4, 2)]),
        ("L2E", 12, [(3, 12)]), ("L2M", 12, [(6, 12)]), ("L2L", 12, [(12, 12)]),
        ("M2E", 12, [(3, 6)]), ("M2M", 12, [(6, 6)]), ("M2L", 12, [(12, 6)]),
    ],
)
def test_presets_on_4_and_12_layer_models(preset, depth, expected):
    assert LayerMap(preset=preset).resolve(student_depth=depth, teacher_depth=depth) == expected


def test_presets_with_different_depths():
    assert LayerMap("L2E").resolve(student_depth=12, teacher_depth=4) == [(3, 4)]
    assert LayerMap("M2E").resolve(student_depth=4, teacher_depth=30) == [(1, 15)]


def test_explicit_pairs_negative_indices_and_fractions():
    m = LayerMap(pairs=[[2, -1], [-2, 0.5], [0.25, "L"]])
    assert m.resolve(student_depth=12, teacher_depth=4) == [(2, 4), (11, 2), (3, 4)]


def test_early_fraction_is_configurable():
    assert LayerMap("L2E", early=0.5).resolve(8, 4) == [(4, 4)]


@pytest.mark.parametrize("pairs, side", [([[13, -1]], "student"), ([[2, 5]], "teacher"), ([[-14, 1]], "student")])
def test_out_of_range_layers_fail_with_the_depth(pairs, side):
    with pytest.raises(LayerMapError) as err:
        LayerMap(pairs=pairs).resolve(student_depth=12, teacher_depth=4)
    assert f"{side} layer" in str(err.value) and "Fix" in str(err.value)


def test_unknown_preset_and_bad_fraction():
    with pytest.raises(LayerMapError, match="unknown preset 'E2L'"):
        LayerMap(preset="E2L")
    with pytest.raises(LayerMapError, match=r"\(0, 1\]"):
        LayerMap(pairs=[[1.5, -1]]).resolve(4, 4)

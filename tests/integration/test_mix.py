"""The integration tests of tests/unit/test_mix.py, which holds their helpers and fixtures."""

from tests.unit.test_mix import _peak_growth


def test_memory_stays_bounded_by_a_layer_whatever_the_depth(tmp_path):
    layer_bytes = 4 * 3 * 128 * 2048 * 4  # four experts' FFNs of one layer, in fp32: 12.6 MB
    shallow, deep = _peak_growth(tmp_path / "l2", 2), _peak_growth(tmp_path / "l16", 16)
    # 16 layers x 4 experts is ~210 MB of fp32 output, 176 MB more than 2 layers; a layer-streaming
    # mix holds about a layer plus the writer's queue, whatever the depth (a loaded CI machine once
    # measured 1.2 layers more for 16 layers than for 2, with the default malloc arenas).
    assert deep < shallow + 2 * layer_bytes, (shallow, deep)
    assert deep < 6 * layer_bytes, (shallow, deep)


"""The paper's presets, one step each as packaged (tests/test_as_written.py holds the others)."""

import pytest

from test_as_written import PAPER, one_step, tiny_photos  # noqa: F401  (the fixture, built once here)


@pytest.mark.parametrize("preset", PAPER)
def test_every_paper_preset_takes_a_step(preset, tiny_photos, tmp_path, capsys):  # noqa: F811
    one_step(preset, tiny_photos, tmp_path / "run", capsys)


def test_the_paper_presets_are_packaged():
    from ecvl_fast.experiments.presets import names

    assert set(PAPER) <= set(names())

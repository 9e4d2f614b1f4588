"""The files `agentsd generate` and `agentsd compare` write."""

import json
import os
import stat

import pytest
from PIL import Image

from agentsd.cli import output


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask_like_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        output.save_image(Image.new("RGB", (8, 8)), tmp_path / "p0000_s0.png", {"prompt": "x"})
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("p0000_s0.png", "p0000_s0.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert json.loads((tmp_path / "p0000_s0.json").read_text()) == {"prompt": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0000_s0.json", "p0000_s0.png", "plain.txt"]


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    (tmp_path / "kept.png").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        output.atomic_write(tmp_path / "kept.png", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["kept.png"]
    assert (tmp_path / "kept.png").read_bytes() == b"old"


def test_a_sidecar_from_before_a_setting_existed_matches_its_absence():
    """`max_sequence_length` came later: an older sidecar without it matches a run without one
    (SD 1.x, 2.x, XL: None), and not a run with one."""
    wanted = dict.fromkeys(output.SETTING_KEYS, 1) | {"max_sequence_length": None}
    older = {k: v for k, v in wanted.items() if k != "max_sequence_length"}
    assert output.setting_differences(older, wanted) == []
    assert output.setting_differences(older, wanted | {"max_sequence_length": 256}) == [
        "max_sequence_length None (now 256)"
    ]
    assert output.setting_differences({k: v for k, v in wanted.items() if k != "steps"}, wanted) == [
        "steps 'missing' (now 1)"
    ]

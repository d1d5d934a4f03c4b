"""The one atomic-write helper: a failed write keeps the old file and leaves no temp file."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fastnft.atomic import TMP_PREFIX, atomic_write, torch_save_atomic, write_json_atomic


@pytest.mark.parametrize("form", ["file", "text", "by_name"])
def test_failing_write_keeps_old_file_and_no_temp(tmp_path, form):
    p = tmp_path / "report.json"
    write_json_atomic(p, {"old": 1})

    partial = {"file": lambda f: f.write(b"{"), "text": lambda f: f.write("{"),
               "by_name": lambda name: Path(name).write_text("{")}[form]

    def fail(target):
        partial(target)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, fail, text=form == "text", by_name=form == "by_name")
    assert json.loads(p.read_text()) == {"old": 1}
    assert os.listdir(tmp_path) == ["report.json"]


def test_forms_write_the_content_with_ordinary_permissions(tmp_path):
    j = write_json_atomic(tmp_path / "sub" / "a.json", {"x": [1, 2]})  # the folder is created
    assert j.read_text() == json.dumps({"x": [1, 2]}, indent=2)
    t = torch_save_atomic(tmp_path / "b.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(t, weights_only=True)["w"], torch.arange(3))
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01")
    c = atomic_write(tmp_path / "c.bin", lambda tmp: shutil.copyfile(src, tmp), by_name=True)
    assert c.read_bytes() == b"\x00\x01"
    assert all((tmp_path / n).stat().st_mode & 0o777 == 0o644 for n in ("b.pt", "c.bin"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]

"""`python -m lungviz predict | bench`: JSON output, explanation files, and exit status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lungviz.__main__ import main
from tests.test_predict import weights  # noqa: F401  (module-scoped tiny bundles fixture)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def crop_png(tmp_path):
    from PIL import Image

    yy, xx = np.mgrid[:128, :128]
    img = (60 + 150 * (((yy - 64) ** 2 + (xx - 64) ** 2) < 100)).astype(np.uint8)
    path = tmp_path / "crop.png"
    Image.fromarray(img).save(path)
    return path


def test_predict_json_and_gradcam_files(weights, crop_png, tmp_path, capsys):  # noqa: F811
    code = main(["predict", "--slice", str(crop_png), "--weights", str(weights), "--json", "--explain", "gradcam",
                 "--out", str(tmp_path / "maps")])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["views"]) == {"slice", "nodule", "fused"}
    assert 0.0 <= out["malignant_probability"] <= 1.0 and out["flag"] in ("no uncertainty flag", "refer / uncertain")
    assert "Research and education use only" in out["notice"]
    files = out["explanations"]["files"]
    assert set(files) == {"slice", "nodule"} and all(Path(f).stat().st_size > 100 for f in files.values())


@pytest.mark.parametrize("content,name", [(b"", "empty.png"), (b"hello, not an image", "text.png"),
                                          (b"\x89PNG\r\n\x1a\n\x00\x00", "truncated.png")])
def test_bad_input_exits_2_with_one_line(tmp_path, weights, content, name, capsys):  # noqa: F811
    bad = tmp_path / name
    bad.write_bytes(content)
    assert main(["predict", "--slice", str(bad), "--weights", str(weights), "--json"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0]
    assert captured.out == ""


def test_bad_input_in_a_real_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"not a dicom at all" * 20)
    res = subprocess.run([sys.executable, "-m", "lungviz", "predict", "--slice", str(bad), "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "scan.dcm" in res.stderr and "Traceback" not in res.stderr


def test_explain_without_out_is_a_user_error(weights, crop_png, capsys):  # noqa: F811
    assert main(["predict", "--slice", str(crop_png), "--weights", str(weights), "--explain", "lime"]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("argv,says", [
    (["--explain", "gradcam", "--out", "{crop}"], "cannot be used as a folder"),  # --out names an existing file
    (["--centre", "nan,nan"], "finite"),
])
def test_unusable_options_are_user_errors(weights, crop_png, argv, says, capsys):  # noqa: F811
    argv = [a.replace("{crop}", str(crop_png)) for a in argv]
    assert main(["predict", "--slice", str(crop_png), "--weights", str(weights), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


def test_bench_needs_at_least_one_repeat_and_case(capsys):
    assert main(["bench", "--repeats", "0"]) == 2 and "at least 1" in capsys.readouterr().err


def test_plain_output_never_prints_a_certain_looking_percentage(weights, crop_png, capsys, monkeypatch):  # noqa: F811
    import lungviz.__main__ as cli

    real = cli.cmd_predict

    def extreme(args):
        out = real(args)
        out["views"]["fused"]["binary"]["probabilities"] = [0.998, 0.002]
        return out

    monkeypatch.setattr(cli, "cmd_predict", extreme)
    assert main(["predict", "--slice", str(crop_png), "--weights", str(weights)]) == 0
    text = capsys.readouterr().out
    assert "fused: malignant <1%" in text and " 0%" not in text and "100%" not in text

"""`python -m lungviz predict | bench`: JSON output, explanation files, and exit status 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lungviz.cli.main import main
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
    assert set(out["views"]) == {"slice", "nodule"}
    assert out["views"]["nodule"]["binary"]["model"] == "fused-binary"  # the headline keeps its outside name
    factors = out["nodule_model"]["factors"]
    assert set(factors) == {"size", "spiculation", "lobulation", "margin", "texture", "calcification", "image"}
    assert out["nodule_model"]["top_factors"] and "log-odds" in out["nodule_model"]["top_factors"][0]
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


def test_an_error_naming_a_file_with_a_line_break_is_still_one_line(tmp_path, weights, capsys):  # noqa: F811
    bad = tmp_path / "scan\nsecond line.png"
    bad.write_bytes(b"not an image" * 10)
    assert main(["predict", "--slice", str(bad), "--weights", str(weights), "--json"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scan second line.png" in err


def test_an_unexpected_fault_exits_1_with_one_line(crop_png, capsys, monkeypatch):
    import lungviz.cli.main as cli

    def broken(args):
        raise ValueError("a bug\nwith two lines")

    monkeypatch.setattr(cli, "cmd_predict", broken)
    assert main(["predict", "--slice", str(crop_png)]) == 1
    err = capsys.readouterr().err
    assert err == ("error: lungviz stopped on an unexpected problem (ValueError: a bug with two lines); please report "
                   "it.\n")


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
    import lungviz.cli.main as cli

    real = cli.cmd_predict

    def extreme(args):
        out = real(args)
        out["views"]["nodule"]["binary"]["probabilities"] = [0.998, 0.002]
        return out

    monkeypatch.setattr(cli, "cmd_predict", extreme)
    assert main(["predict", "--slice", str(crop_png), "--weights", str(weights)]) == 0
    text = capsys.readouterr().out
    assert "nodule: malignant <1%" in text and " 0%" not in text and "100%" not in text
    assert "What moved it from an average nodule's" in text  # the factors, in plain text too


def _series(folder: Path, n: int = 5, spacing: tuple[float, float] | None = (0.7, 0.7)) -> Path:
    """A small synthetic CT series on disk: n slices of 160 x 160 HU with a bright blob, inferior first."""
    from tests.conftest import make_dicom

    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:160, :160]
    blob = ((yy - 90) ** 2 + (xx - 70) ** 2) < 36
    for k in range(n):
        raw = np.where(blob, 1024 + 40, 1024 - 800).astype(np.int16)  # stored values; HU = raw - 1024
        (folder / f"s{k}.dcm").write_bytes(make_dicom(raw, z_mm=2.5 * k, instance=k + 1, spacing=spacing))
    return folder


def test_predict_reads_a_dicom_series_at_the_slice_asked_for(weights, tmp_path, capsys):  # noqa: F811
    series = _series(tmp_path / "series")
    code = main(["predict", "--slice", str(series), "--index", "1", "--centre", "90,70", "--weights", str(weights),
                 "--json"])
    assert code == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert any("Slice 2 of 5 of the series" in n for n in out["notes"])
    assert not any("image centre was used" in n for n in out["notes"])  # the centre given was used
    middle = main(["predict", "--slice", str(series), "--weights", str(weights), "--json"])
    assert middle == 0 and any("Slice 3 of 5" in n for n in json.loads(capsys.readouterr().out)["notes"])
    assert main(["predict", "--slice", str(series), "--index", "5", "--weights", str(weights)]) == 2
    assert "slice 5 does not exist" in capsys.readouterr().err


def test_options_that_do_not_apply_are_said_not_silently_dropped(weights, crop_png, capsys):  # noqa: F811
    # a centre on a crop: the crop is taken as centred on the nodule, and the output says the centre was not used
    assert main(["predict", "--slice", str(crop_png), "--centre", "10,10", "--weights", str(weights), "--json"]) == 0
    assert any("centre given was not used" in n for n in json.loads(capsys.readouterr().out)["notes"])
    assert main(["predict", "--slice", str(crop_png), "--index", "3", "--weights", str(weights)]) == 2
    assert "applies to a DICOM series" in capsys.readouterr().err
    assert main(["locate", str(crop_png), "--top-k", "0"]) == 2
    assert "--top-k must be at least 1" in capsys.readouterr().err


def test_locate_plain_output_names_the_slice_and_the_spacing_assumed(tmp_path, capsys):
    from tests.conftest import build_finder_weights

    finder = build_finder_weights(tmp_path / "w")
    series = _series(tmp_path / "series", spacing=None)
    assert main(["locate", str(series), "--slice", "3", "--weights", str(finder), "--top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert "series: slice 4 of 5 (--slice 3; 0 = most inferior)" in text
    assert "note: pixel spacing unknown" in text

"""Benchmark evaluation (dsclora.evaluation, ``dsclora eval``) reproduces the reference
PSNR/SSIM table of shared/README.md for all four released checkpoints."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dsclora
from dsclora import cli, metrics
from dsclora.data import save_image
from dsclora.evaluation import evaluate_folder, evaluate_pairs, load_pairs

FOLDERS = ("Set5", "Set14", "Urban100_10", "Manga109_10")
PSNR_TOL, SSIM_TOL = 0.0005, 0.00002


@pytest.fixture(scope="module")
def reference(shared) -> dict[str, dict[str, tuple[float, float]]]:
    """{weights: {folder: (psnr, ssim)}} parsed from the table in shared/README.md."""
    lines = (shared / "README.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"\|\s*weights\s*\|\s*Set5", line))
    folders = [c.strip() for c in lines[header].strip("|").split("|")][1:]
    table = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0].split()[0]] = {
            folder: tuple(float(v) for v in cell.split("/")) for folder, cell in zip(folders, cells[1:])
        }
    assert len(table) == 4 and all(set(row) == set(FOLDERS) for row in table.values()), table
    return table


@pytest.fixture(scope="module")
def models(shared, reference):
    return {name: dsclora.load_model(shared / "weights" / f"{name}.pth") for name in reference}


@pytest.mark.slow
@pytest.mark.parametrize("folder", FOLDERS)
def test_reference_numbers(shared, reference, models, folder):
    pairs = load_pairs(shared / "data" / folder, scale=4)  # LR made once, shared by the 4 models
    failures = []
    for name, model in models.items():
        result = evaluate_pairs(model, pairs, scale=4)
        want_psnr, want_ssim = reference[name][folder]
        assert result["n"] == len(pairs) == len(result["images"])
        if abs(result["psnr"] - want_psnr) > PSNR_TOL or abs(result["ssim"] - want_ssim) > SSIM_TOL:
            failures.append(f"{name}: {result['psnr']:.5f} / {result['ssim']:.7f}, want {want_psnr} / {want_ssim}")
    assert not failures, f"{folder}: " + "; ".join(failures)


def test_cli_json_on_set5(shared, reference, capsys):
    weights = shared / "weights" / "dscf_x4_team23.pth"
    code = cli.main(["eval", "--weights", str(weights), "--hr-dir", str(shared / "data" / "Set5"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    want_psnr, want_ssim = reference["dscf_x4_team23"]["Set5"]
    assert abs(result["psnr"] - want_psnr) <= PSNR_TOL and abs(result["ssim"] - want_ssim) <= SSIM_TOL
    assert result["n"] == 5 and [im["name"] for im in result["images"]][0] == "baby.png"
    assert result["psnr"] == pytest.approx(np.mean([im["psnr"] for im in result["images"]]))


def test_cli_table_with_golden_lr_folder(shared, reference, capsys):
    weights = shared / "weights" / "dscf_x4_team23.pth"
    hr, lr = shared / "data" / "Set5", shared / "data" / "Set5_LR_bicubic" / "X4"
    assert cli.main(["eval", "--weights", str(weights), "--hr-dir", str(hr), "--lr-dir", str(lr)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip()}
    assert list(rows) == ["baby.png", "bird.png", "butterfly.png", "head.png", "woman.png", "mean"]
    # MATLAB's LR files differ from ours by at most 2 grey levels: close, not equal.
    want_psnr = reference["dscf_x4_team23"]["Set5"][0]
    assert 0 < abs(float(rows["mean"][0]) - want_psnr) < 0.02


def test_cli_several_folders(shared, tmp_path, capsys):
    rng = np.random.default_rng(1)
    args = ["eval", "--weights", str(shared / "weights" / "dscf_x4_team23.pth"), "--channel", "rgb"]
    for name in ("one", "two"):
        save_image(tmp_path / name / "hr" / "img.png", rng.random((48, 44, 3)))
        save_image(tmp_path / name / "lr" / "img_x4.png", rng.random((12, 11, 3)))
        args += ["--hr-dir", str(tmp_path / name / "hr"), "--lr-dir", str(tmp_path / name / "lr")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("img.png") == 2 and "RGB channel" in out and out.splitlines()[-3].split()[0] == "benchmark"
    assert cli.main(args + ["--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["folder"] for r in results] == [args[6], args[10]] and all(r["n"] == 1 for r in results)


def test_cli_errors_name_the_path(shared, tmp_path, capsys):
    weights = str(shared / "weights" / "dscf_x4_team23.pth")
    assert cli.main(["eval", "--weights", weights, "--hr-dir", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such folder" in capsys.readouterr().err
    assert cli.main(["eval", "--weights", str(tmp_path / "w.pth"), "--hr-dir", str(tmp_path)]) == 1
    assert "w.pth" in capsys.readouterr().err
    assert cli.main(["eval", "--weights", weights, "--hr-dir", str(tmp_path), "--scale", "2"]) == 1
    assert "--scale" in capsys.readouterr().err
    hr = str(shared / "data" / "Set5")
    assert cli.main(["eval", "--weights", weights, "--hr-dir", hr, "--hr-dir", hr, "--lr-dir", hr]) == 2


def test_evaluate_folder_protocol_with_any_callable(tmp_path):
    """Mod-crop, grey expansion, LR generation, quantisation and border, checked step by step."""
    rng = np.random.default_rng(0)
    save_image(tmp_path / "a.png", rng.random((27, 30, 3)))
    save_image(tmp_path / "b.png", rng.random((25, 22)), gray=True)

    def upsample(x):
        return F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False) + 0.01

    result = evaluate_folder(upsample, tmp_path, scale=2, channel="rgb")
    pairs = load_pairs(tmp_path, scale=2)
    assert [p.hr.shape for p in pairs] == [(26, 30, 3), (24, 22, 3)]
    assert np.array_equal(pairs[1].hr[..., 0], pairs[1].hr[..., 2])
    for pair, image in zip(pairs, result["images"]):
        lr = torch.from_numpy(pair.lr / 255).float().permute(2, 0, 1)[None]
        sr = metrics.quantize(upsample(lr))[0].permute(1, 2, 0).double().numpy()
        assert image["psnr"] == metrics.psnr(sr, pair.hr, border=2, channel="rgb")
        assert image["ssim"] == metrics.ssim(sr, pair.hr, border=2, channel="rgb")
    assert result["n"] == 2 and result["psnr"] == pytest.approx((result["images"][0]["psnr"]
                                                                 + result["images"][1]["psnr"]) / 2)
    with pytest.raises(ValueError, match="a.png: model output has shape"):
        evaluate_folder(lambda x: x, tmp_path, scale=2)


def test_lr_folder_mismatch_names_the_file(shared, tmp_path):
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for src in (shared / "data" / "Set5_LR_bicubic" / "X2").iterdir():
        (lr_dir / src.name.replace("x2", "x4")).write_bytes(src.read_bytes())
    with pytest.raises(ValueError, match="babyx4.png: LR shape"):
        load_pairs(shared / "data" / "Set5", lr_dir, scale=4)

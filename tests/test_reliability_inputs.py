"""Bad and unusual inputs (tests/corpus.py): each gives a correct result or one clear error naming
the file and the reason; a batch goes on past bad files, ends with a summary and a non-zero exit
code, and never leaves a partial output file behind."""
from pathlib import Path

import numpy as np
import pytest
import torch

from corpus import (
    TILE, WRITE_FAILURES, api_cases, build_files, build_inputs, check_api, check_file, cli_batch, reason_matches,
    tiny_span, unwritable_folder, write_failures,
)
from dsclora.data import load_image
from dsclora.infer import Upscaler, merge_span
from dsclora.infer.batch import upscale_image
from dsclora_kernels import spab, spab_reference, spatial_affinity_loss, spatial_affinity_loss_reference


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(tiny_span().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def upscaler() -> Upscaler:
    return Upscaler(merge_span(tiny_span()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, build_files(folder / "files"), build_inputs(folder / "inputs")


def test_the_corpus_is_large_enough(corpus):
    _, files, inputs = corpus
    assert len(files) + len(inputs) + len(api_cases()) >= 40
    assert sum(c.error is not None for c in files) >= 15


def test_every_file_reads_correctly_or_fails_naming_file_and_reason(corpus):
    folder, files, _ = corpus
    outcomes = [check_file(folder / "files", case) for case in files]
    failed = [f"{o.name}: expected {o.expected}, got {o.got}" for o in outcomes if not o.passed]
    assert not failed, "\n".join(failed)


def test_batch_goes_on_past_bad_files_with_a_summary_and_exit_code_1(corpus, weights, upscaler, tmp_path):
    folder, files, inputs = corpus
    arguments = [str(folder / "files"), str(folder / "files" / "dangling.png"), *(c.argument for c in inputs)]
    run = cli_batch(arguments, tmp_path / "out", weights, "--ext", "png", "--tile", str(TILE))
    good = [c for c in files if c.error is None]
    assert run.code == 1
    assert f"{len(good)} of {len(files) + len(inputs)} inputs upscaled" in run.stderr
    expected_failures = {str(folder / "files" / c.name): c.error for c in files if c.error}
    expected_failures.update({c.argument: c.error for c in inputs})
    assert set(run.failures) == set(expected_failures)
    for name, reason in run.failures.items():
        assert reason_matches(reason, expected_failures[name]), (name, reason)
    assert run.outputs == sorted(f"{Path(c.name).stem}.png" for c in good)
    assert run.leftovers == []
    for case in good:  # tiled CLI output == untiled API output, bit depth, gray and alpha kept
        source = load_image(folder / "files" / case.name)
        written = load_image(tmp_path / "out" / f"{Path(case.name).stem}.png")
        rgb, alpha = upscale_image(upscaler, source)
        if source.gray:
            rgb = rgb.mean(axis=2, keepdims=True).repeat(3, axis=2)
        assert (written.bit_depth, written.gray) == (source.bit_depth, source.gray), case.name
        assert (written.alpha is None) == (alpha is None), case.name
        step = 0.5 / (2**source.bit_depth - 1) + 1e-6
        np.testing.assert_allclose(written.rgb, rgb, rtol=0, atol=step, err_msg=case.name)
        if alpha is not None:
            np.testing.assert_allclose(written.alpha, alpha, rtol=0, atol=step, err_msg=case.name)


def test_an_output_folder_that_cannot_exist_fails_at_once(tmp_path, weights):
    run, out = unwritable_folder(tmp_path, weights)
    assert run.code == 2
    assert f"cannot create the output folder {out}" in run.stderr and "Not a directory" in run.stderr
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_failed_writes_leave_no_partial_file_and_the_batch_goes_on(tmp_path, weights):
    run = write_failures(tmp_path, weights)
    assert run.code == 1
    assert "1 of 4 inputs upscaled" in run.stderr
    assert run.outputs == ["blocked_up.png", "fine_up.png"] and (tmp_path / "out" / "blocked_up.png").is_dir()
    assert run.leftovers == []
    reasons = {Path(name).name: reason for name, reason in run.failures.items()}
    assert reasons.keys() == WRITE_FAILURES.keys()
    for name, reason in WRITE_FAILURES.items():
        assert reason in reasons[name], (name, reasons[name])


@pytest.mark.parametrize("case", api_cases(), ids=lambda c: c.name)
def test_api_input(case, upscaler):
    outcome = check_api(upscaler, case)
    assert outcome.passed, f"expected {outcome.expected}, got {outcome.got}"


def test_fast_ops_name_bad_dtypes_and_propagate_nan_like_their_references():
    x = torch.randn(1, 4, 5, 6)
    weights = [torch.randn(4, 4, 3, 3) * 0.1, torch.randn(4) * 0.1] * 3
    with pytest.raises(ValueError, match="spab: x must be a float"):
        spab(x.long(), *(w.long() for w in weights))
    with pytest.raises(ValueError, match="f_teacher must be a non-empty float"):
        spatial_affinity_loss(x, x.int())
    holes = x.masked_fill(x > 1.5, float("nan"))
    for ours, reference in zip(spab(holes, *weights), spab_reference(holes, *weights)):
        assert torch.equal(ours.isnan(), reference.isnan())
    assert spatial_affinity_loss(holes, x).isnan() and spatial_affinity_loss_reference(holes, x).isnan()

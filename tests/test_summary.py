"""NTIRE efficiency numbers (params, FLOPs, activations, convs) and the bench command."""
import copy
import json
import mmap

import pytest
import torch

from dsclora import timing
from dsclora.benchmark import BenchResult, format_table
from dsclora.cli import main
from dsclora.export import export
from dsclora.lora import apply_dsclora
from dsclora.models import SPAN, load_model
from dsclora.summary import summarize


def closed_form(c: int, cc: int, s: int, h: int, w: int) -> dict[str, int]:
    """SPAN's cost written out layer by layer (SPEC §2): conv_1 3->C, 19 C->C 3x3 convs
    (18 in the blocks, conv_2), conv_cat 4C->Cc 1x1, upsampler Cc->3s² 3x3."""
    layers = [(3, c, 9)] + [(c, c, 9)] * 19 + [(4 * c, cc, 1), (cc, 3 * s * s, 9)]
    return {
        "params": sum(cin * cout * k + cout for cin, cout, k in layers),
        "flops": h * w * sum(cin * cout * k for cin, cout, k in layers),
        "activations": h * w * sum(cout for _, cout, _ in layers),
        "convs": len(layers),
    }


def test_dscf_prints_the_ntire_numbers(shared, capsys):
    assert main(["summary", "--weights", str(shared / "weights" / "dscf_x4_team23.pth")]) == 0
    out = capsys.readouterr().out
    for expected in ("0.131 M", "130,828", "8.54 G", "38.93 M", "1x3x256x256"):
        assert expected in out
    assert "convs        22" in out


@pytest.mark.parametrize("c, cc, s, size", [(26, 26, 4, (256, 256)), (8, 5, 3, (17, 23)), (4, 4, 2, (1, 1))])
def test_counts_match_the_closed_form(c, cc, s, size):
    summary = summarize(SPAN(c, cc, s, form="eval"), size)
    assert summary.as_dict() == {"input_shape": (1, 3, *size), **closed_form(c, cc, s, *size)}


def test_deployed_model_is_counted(tmp_path):
    """Training branches and unmerged adapters cost nothing at inference: the summary of the
    deployed network is the same, and so is that of the file exported from it."""
    train_form = SPAN(6, upscale=2, form="train")
    plain = summarize(copy.deepcopy(train_form).reparameterize(), 32)
    assert summarize(train_form, 32) == plain
    adapted = copy.deepcopy(train_form).reparameterize()
    apply_dsclora(adapted)
    assert summarize(adapted, 32) == plain
    assert summarize(load_model(export(adapted, "official", tmp_path / "m.pth")), 32) == plain


def test_summary_json(tmp_path, capsys):
    path = export(SPAN(4, upscale=2, form="eval"), "official", tmp_path / "m.safetensors")
    assert main(["summary", "--weights", str(path), "--size", "10", "12", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"input_shape": [1, 3, 10, 12], **closed_form(4, 4, 2, 10, 12)}


def test_timing_warms_up_then_interleaves_the_candidates():
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, repeats=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3} and all(t >= 0 for t in times["a"])
    assert len(timing.repeat(lambda: calls.append("c"), warmup=1, repeats=2)) == 2 and calls.count("c") == 3
    with pytest.raises(ValueError, match="repeats >= 1"):
        timing.repeat(lambda: None, repeats=0)


def test_rss_growth_sees_memory_touched_by_the_call():
    """Pages fresh from the kernel (an anonymous map, every page written): a heap allocation could
    reuse memory the process already holds, depending on what ran before in the same process."""
    size = 64 * 2**20

    def touch_fresh_pages():
        with mmap.mmap(-1, size) as pages:
            for offset in range(0, size, mmap.PAGESIZE):
                pages[offset] = 1

    assert timing.rss_growth(touch_fresh_pages) >= size // 2


def test_table_shows_the_ratio_and_missing_rows():
    table = format_table([
        BenchResult("eager", "cpu", "fp32", 30.0),
        BenchResult("fused", "cpu", "fp32", 12.0, max_abs_diff=2e-6),
        BenchResult("fused", "cuda", "fp16", None, note="unavailable: no kernel"),
    ])
    assert "2.50x" in table and "2.0e-06" in table and "unavailable: no kernel" in table


def test_bench_command_quick(tmp_path, capsys):
    model = SPAN(4, upscale=2, form="eval")
    path = export(model, "official", tmp_path / "m.pth")
    argv = ["bench", "--weights", str(path), "--size", "9", "11", "--warmup", "1", "--repeats", "2",
            "--device", "cpu"]
    assert main(argv + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == [[1, 3, 9, 11]] and report["summary"]["convs"] == 22
    rows = {r["path"]: r for r in report["results"]}
    assert set(rows) == {"eager", "fused"} and rows["eager"]["ms"] > 0
    assert rows["fused"]["ms"] is not None, rows["fused"]["note"]
    assert rows["fused"]["max_abs_diff"] < 1e-4  # the fused path computes the same network
    assert main(argv) == 0
    assert "speed-up" in capsys.readouterr().out


def test_bench_on_a_folder(shared, tmp_path, capsys):
    folder = shared / "data" / "Set5_LR_bicubic" / "X4"
    weights = export(SPAN(4, form="eval"), "official", tmp_path / "m.pth")
    assert main(["bench", "--weights", str(weights), "--input", str(folder), "--warmup", "0",
                 "--repeats", "1", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["inputs"]) == 5 and [1, 3, 128, 128] in report["inputs"]

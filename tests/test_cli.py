"""The CLI's one exit-code policy (dsclora.cli): 0 success, 1 runtime failure, 2 usage error."""
import pytest
import torch

from dsclora.cli import EXIT_FAILURE, EXIT_USAGE, build_parser, main
from dsclora.export import export
from dsclora.models import SPAN


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(export(SPAN(4, upscale=2, form="eval"), "official", tmp_path_factory.mktemp("cli") / "m.safetensors"))


@pytest.mark.parametrize("argv, message", [
    (["summary", "--size", "1", "2", "3"], "dsclora summary: --size takes one or two numbers"),
    (["bench", "--input", "somewhere", "--size", "4", "4"], "dsclora bench: give --input or --size, not both"),
    (["export", "--format", "official", "--dtype", "fp16", "-o", "x.pth"],
     "dsclora export: --dtype fp16 applies to --format onnx only"),
])
def test_usage_errors_exit_2_with_the_command_named(weights, capsys, argv, message):
    assert main([argv[0], "--weights", weights, *argv[1:]]) == EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert message in err and f"see dsclora {argv[0]} --help" in err and "Traceback" not in err


def test_argparse_usage_errors_and_no_command_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["summary"])  # --weights missing
    assert exc.value.code == EXIT_USAGE
    assert main([]) == EXIT_USAGE


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_runtime_failures_exit_1(weights, tmp_path, capsys):
    assert main(["bench", "--weights", weights, "--device", "cuda"]) == EXIT_FAILURE == 1
    assert "CUDA is not available" in capsys.readouterr().err
    narrow = export(SPAN(4, 3, form="eval"), "official", tmp_path / "narrow.pth")
    assert main(["export", "--weights", str(narrow), "--format", "spandrel", "-o", str(tmp_path / "n.pth")]) == 1


def test_help_documents_the_exit_codes():
    parser = build_parser()
    assert "2 usage error" in parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    assert all("1 runtime failure" in p.format_help() for p in sub.values())

"""How close the ONNX export (ONNX Runtime, fp32) is to PyTorch, on natural images and on noise.

For each input: max |ONNX Runtime - PyTorch fp32|, max |PyTorch fp32 - float64 PyTorch| and
max |ONNX Runtime - float64 PyTorch| (the float64 forward is the reference both round against).

    python bench/onnx_error.py            # DSCF x4: Set5 LR images, an Urban100 crop, noise
"""
import argparse
import tempfile
from pathlib import Path

import torch

from dsclora.data.io import image_to_tensor, list_images, load_image
from dsclora.export import export_onnx
from dsclora.models import load_model

from bench_infer import DEFAULT_WEIGHTS, SHARED
from bench_peers import DEFAULT_IMAGE, _onnx_runtime, crop


def inputs(size: int) -> dict[str, torch.Tensor]:
    """name -> (1, 3, H, W) in [0, 1]: the Set5 LR images, an Urban100 crop, uniform noise."""
    found = {f"Set5 LR {p.stem}": image_to_tensor(load_image(p).rgb)
             for p in list_images(SHARED / "data" / "Set5_LR_bicubic" / "X4")}
    found[f"Urban100 {DEFAULT_IMAGE.stem} crop {size}"] = crop(DEFAULT_IMAGE, size)
    found[f"uniform noise {size}"] = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    parser.add_argument("--size", type=int, default=256, help="side of the crop and of the noise")
    args = parser.parse_args()
    model = load_model(args.weights).eval()
    double = load_model(args.weights).double().eval()
    path = Path(tempfile.mkdtemp()) / "span.onnx"
    export_onnx(load_model(args.weights), path)
    session = _onnx_runtime(path, torch.get_num_threads())
    print(f"{Path(args.weights).name}, ONNX Runtime CPUExecutionProvider fp32, torch {torch.__version__}")
    print("| input | max abs ORT - PyTorch fp32 | max abs PyTorch fp32 - float64 | max abs ORT - float64 |")
    print("|---|---|---|---|")
    for name, x in inputs(args.size).items():
        with torch.no_grad():
            y32, y64 = model(x).double(), double(x.double())
        y_ort = session(x).double()
        print(f"| {name} {tuple(x.shape[2:])} | {(y_ort - y32).abs().max():.1e} | "
              f"{(y32 - y64).abs().max():.1e} | {(y_ort - y64).abs().max():.1e} |")


if __name__ == "__main__":
    main()

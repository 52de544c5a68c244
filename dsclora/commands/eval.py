"""``dsclora eval``: PSNR/SSIM of a checkpoint on benchmark folders of HR images."""
HELP = "evaluate a SPAN checkpoint (PSNR/SSIM, benchmark protocol) on folders of HR images"

JSON_HELP = (
    "print JSON instead of tables: for one --hr-dir one object {folder, psnr, ssim, n, images: "
    "[{name, psnr, ssim}]}; for several a list of such objects in --hr-dir order"
)


def add_arguments(parser) -> None:
    parser.add_argument("--weights", required=True, help="checkpoint (.pth or .safetensors)")
    parser.add_argument("--hr-dir", required=True, action="append", metavar="DIR",
                        help="folder of HR images; repeat for several benchmarks")
    parser.add_argument("--lr-dir", action="append", metavar="DIR",
                        help="folder of matching LR images (name or namex4), one per --hr-dir in the same "
                             "order; default: bicubic downscaling of the HR images")
    parser.add_argument("--scale", type=int, default=None,
                        help="SR scale; must match the checkpoint (default: the checkpoint's, 4 for SPAN x4)")
    parser.add_argument("--border", type=int, default=None, help="pixels cropped on every side (default: scale)")
    parser.add_argument("--channel", choices=("y", "rgb"), default="y", help="measure on Y (default) or RGB")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def _table(folder: str, result: dict, args) -> str:
    border = args.scale if args.border is None else args.border
    width = max([len(im["name"]) for im in result["images"]] + [4])
    lines = [f"{folder}: {result['n']} images, x{args.scale}, border {border}, {args.channel.upper()} channel",
             f"{'image':<{width}}  {'PSNR':>8}  {'SSIM':>7}"]
    lines += [f"{im['name']:<{width}}  {im['psnr']:8.4f}  {im['ssim']:7.5f}" for im in result["images"]]
    lines.append(f"{'mean':<{width}}  {result['psnr']:8.4f}  {result['ssim']:7.5f}")
    return "\n".join(lines)


def _summary(results: list[dict]) -> str:
    width = max(len(r["folder"]) for r in results)
    lines = [f"{'benchmark':<{width}}  {'n':>4}  {'PSNR':>8}  {'SSIM':>7}"]
    lines += [f"{r['folder']:<{width}}  {r['n']:4d}  {r['psnr']:8.4f}  {r['ssim']:7.5f}" for r in results]
    return "\n".join(lines)


def run(args) -> int:
    import json
    import sys


    from dsclora import load_model
    from dsclora.evaluation import evaluate_folder

    lr_dirs = args.lr_dir or [None] * len(args.hr_dir)
    if len(lr_dirs) != len(args.hr_dir):
        print(f"dsclora eval: error: {len(lr_dirs)} --lr-dir for {len(args.hr_dir)} --hr-dir "
              "(give one per HR folder, or none)", file=sys.stderr)
        return 2
    try:
        model = load_model(args.weights, device=args.device)
        args.scale = args.scale or model.upscale
        if model.upscale != args.scale:
            raise ValueError(f"{args.weights}: the model is x{model.upscale}, but --scale is {args.scale}")
        results = []
        for hr_dir, lr_dir in zip(args.hr_dir, lr_dirs):
            result = evaluate_folder(model, hr_dir, lr_dir, args.scale, args.border, args.channel,
                                     args.device, progress=True)
            results.append({"folder": hr_dir, **result})
            if not args.json:
                print(_table(hr_dir, result, args) + "\n", flush=True)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"dsclora eval: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    elif len(results) > 1:
        print(_summary(results))
    return 0

"""Write a finished TAB run's trunk at another WiSE alpha, for comparisons the rule did not pick.

    python -m train.tab_wise runs/tab runs/tab_alpha1 --alpha 1.0

A run with `--wise-alphas` saves (1 - a) * start + a * tuned at the alpha its validation rule chose; the
tuned weights themselves stay in its last checkpoint. This reads them from there (safetensors only),
interpolates with the start trunk (the run's --vision spec, built again) at `--alpha`, and writes a
complete artifact folder whose tab_config.json records the alpha and that it was set by hand.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from defectclip.tab import TABBackbone  # noqa: E402
from defectclip.tab_transfer import interpolated_trunk  # noqa: E402
from defectclip.towers import build_vision_tower  # noqa: E402
from train import checkpoints as ckpt  # noqa: E402
from train.common import find_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.tab_wise", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a finished train.tab_pretrain output folder (with checkpoints/)")
    parser.add_argument("out", type=Path, help="new artifact folder")
    parser.add_argument("--alpha", type=float, required=True, help="0 = the start trunk, 1 = the tuned trunk")
    return parser.parse_args(argv)


def tuned_model(run: Path) -> TABBackbone:
    """The run's model with the weights of its newest complete checkpoint (before any averaging)."""
    model = TABBackbone.from_pretrained(run)
    ckpt.load_models(find_checkpoint(run, "latest"), [model])
    return model.eval()


def main(argv=None) -> Path:
    args = parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        raise SystemExit(f"--alpha must be in [0, 1]; got {args.alpha}")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder.")
    model = tuned_model(args.run)
    start = build_vision_tower(model.config.vision)
    averaged = copy.deepcopy(model)
    averaged.trunk = interpolated_trunk(start, model.trunk, args.alpha)
    averaged.trunk.preprocess = model.trunk.preprocess
    wise = dict(model.config.recipe.get("wise", {}), alpha=args.alpha, chosen_by="hand (train.tab_wise), not the rule")
    averaged.config.recipe = {**model.config.recipe, "wise": wise}
    averaged.save_pretrained(args.out)
    print(f"wrote {args.out} at alpha {args.alpha}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])

"""``blindspot train ct``: train a CT denoiser (CNN-10, RED-CNN, WGAN-VGG) on paired full-/low-dose slices.

::

    blindspot data ct-phantoms --out data/ct --size 256
    blindspot train ct --model cnn10 --data data/ct --dose 0.25 --epochs 20 --out runs/cnn10
    blindspot train ct --model wganvgg --data data/ct --dose 0.25 --vgg-weights vgg16-397923af.pth --out runs/wgan
    torchrun --nproc_per_node 4 -m blindspot.cli train ct --model redcnn --data LDCT/ --batch-size 64 --out runs/red

``--data`` is the public *LDCT and Projection data* layout or the phantoms written by ``blindspot data ct-phantoms``.
Patients are split (seeded) into train / validation / test; training draws random patches with equal probability
per patient; CNN-10 and RED-CNN minimise the L2 loss, WGAN-VGG a Wasserstein GAN with gradient penalty plus a VGG16
perceptual loss (``--vgg-weights FILE``, or torchvision's file in the torch hub cache — nothing is downloaded;
``--lambda-vgg 0`` trains a plain WGAN). Validation each epoch reports RMSE in HU and PSNR / SSIM of windowed images
(``--eval-window``, default abdomen C 50 W 400) for the model and the low-dose input; ``best.pt`` has the best
validation PSNR. ``summary.json`` holds the split, the normalisation and the test-set metrics of ``best.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blindspot.commands.train import add_optimisation_arguments
from blindspot.validate import (check_output_folder, dose, hparam, non_negative_float, non_negative_int,
                                number, positive_float, positive_int, side, width)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ct",
        help="train a CT denoiser (cnn10, redcnn, wganvgg) on full-/low-dose pairs in the LDCT layout",
        description="Patch-based CT denoiser training (L2 for CNN-10 and RED-CNN, WGAN-GP + VGG perceptual loss for "
        "WGAN-VGG) with HU evaluation, best/last checkpoints, --resume and torchrun.",
    )
    p.add_argument("--model", required=True, choices=["cnn10", "redcnn", "wganvgg"])
    p.add_argument("--data", required=True, type=Path, help="LDCT-layout folder (real data or ct-phantoms output)")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR")
    p.add_argument("--dose", type=dose, help="low-dose series to train on (e.g. 0.25; needed when a study has several)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out unreadable series members (and their partner slices), each listed on stderr and "
                   "in summary.json, instead of stopping at the first")
    p.add_argument("--hparam", action="append", metavar="KEY=VALUE", type=hparam,
                   help="model hyper-parameter, repeatable (e.g. --hparam chans=48); values are JSON")
    d = p.add_argument_group("data")
    d.add_argument("--patch-size", type=side(8), default=64, help="training patch size in pixels (default 64)")
    d.add_argument("--samples-per-epoch", type=positive_int, default=2048, help="patches per epoch (default 2048)")
    d.add_argument("--val-fraction", type=number(0, 1, hi_open=True), default=0.2,
                   help="share of patients for validation (default 0.2)")
    d.add_argument("--test-fraction", type=number(0, 1, hi_open=True), default=0.2,
                   help="share of patients held out for testing")
    d.add_argument("--split-seed", type=non_negative_int, help="seed of the patient split (default --seed)")
    d.add_argument("--eval-window", default="abdomen", help="window of PSNR/SSIM: lung, abdomen or C,W (default abdomen)")
    d.add_argument("--val-batch-size", type=positive_int, default=1, help="slices per validation forward pass")
    add_optimisation_arguments(p, batch_size=16, lr=1e-4, lr_gamma=0.5, seed_help="weights, patches and split",
                               batch_help="global batch of patches (split over processes)")
    w = p.add_argument_group("WGAN-VGG")
    w.add_argument("--vgg-weights", type=Path, help="torchvision-format VGG16 weights (default: torch hub cache file)")
    w.add_argument("--vgg-layers", nargs="+", default=["relu5_3"], help="perceptual-loss layers (default relu5_3)")
    w.add_argument("--vgg-window", default="0,2000", help="HU window mapped to the VGG's [0, 1] input (default 0,2000)")
    w.add_argument("--lambda-vgg", type=non_negative_float, default=0.1,
                   help="perceptual-loss weight (default 0.1; 0: none)")
    w.add_argument("--lambda-adv", type=non_negative_float, default=1.0, help="adversarial-loss weight (default 1)")
    w.add_argument("--lambda-mse", type=non_negative_float, default=0.0, help="extra MSE weight (default 0)")
    w.add_argument("--n-critic", type=positive_int, default=4, help="critic updates per generator step (default 4)")
    w.add_argument("--gp-weight", type=non_negative_float, default=10.0, help="gradient-penalty weight (default 10)")
    w.add_argument("--critic-lr", type=positive_float, default=1e-4, help="critic Adam learning rate (default 1e-4)")
    w.add_argument("--critic-hidden", type=width, default=1024,
                   help="critic's fully connected width (default 1024)")
    w.add_argument("--critic-widths", type=width, nargs=3, default=[64, 128, 256], help="critic conv widths")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blindspot.commands.train_mri import check_hparams
    from blindspot.validate import hparam_dict
    from blindspot.models.vgg import load_vgg16
    from blindspot.physics.ct import parse_window
    from blindspot.training.ct import CTTrainSettings, train_ct
    from blindspot.training.distributed import DistContext
    from blindspot.training.engine import TrainConfig

    check_output_folder(args.out, "--out", inputs=[args.data])
    check_hparams(args.model, hparam_dict(args.hparam))
    parse_window(args.eval_window)
    parse_window(args.vgg_window)
    settings = CTTrainSettings(
        model=args.model, hparams=hparam_dict(args.hparam), dose=args.dose, patch_size=args.patch_size,
        samples_per_epoch=args.samples_per_epoch, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        split_seed=args.split_seed, eval_window=args.eval_window, val_batch_size=args.val_batch_size,
        vgg_layers=tuple(args.vgg_layers), vgg_window=args.vgg_window, n_critic=args.n_critic,
        gp_weight=args.gp_weight, lambda_adv=args.lambda_adv, lambda_vgg=args.lambda_vgg, lambda_mse=args.lambda_mse,
        critic_lr=args.critic_lr, critic_widths=tuple(args.critic_widths), critic_hidden=args.critic_hidden,
        skip_bad=args.skip_bad,
    )
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        weight_decay=args.weight_decay, lr_step_size=args.lr_step_size, lr_gamma=args.lr_gamma,
        grad_clip=args.grad_clip, seed=args.seed, num_workers=args.num_workers, progress=progress,
    )
    dist = DistContext.from_env(args.device)
    try:
        vgg = None
        if args.model == "wganvgg" and args.lambda_vgg > 0:
            vgg = load_vgg16(args.vgg_weights, device=dist.device)  # the hub cache file when no path is given
            if not vgg[1].imagenet and dist.is_main:
                print(f"blindspot train ct: note: {Path(vgg[1].path).name} is not torchvision's ImageNet VGG16 file; "
                      "the perceptual loss uses these weights as they are (recorded in the checkpoint)", file=sys.stderr)
        result, summary = train_ct(args.data, args.out, settings, config, resume=args.resume, dist=dist, vgg=vgg,
                                   progress=progress)
        if dist.is_main:
            best = summary.get("best_val") or {}
            test = summary.get("test") or {}
            line = f"trained {args.model} for {summary.get('epochs')} epochs; best epoch {result.best_epoch + 1}"
            if best:
                line += (f": val PSNR {best.get('psnr', float('nan')):.2f} dB (input {best.get('input_psnr', float('nan')):.2f}), "
                         f"SSIM {best.get('ssim', float('nan')):.4f}, RMSE {best.get('rmse_hu', float('nan')):.1f} HU")
            print(line)
            if test:
                print(f"test ({int(test.get('slices', 0))} slices): PSNR {test['psnr']:.2f} dB vs input "
                      f"{test['input_psnr']:.2f} dB (gain {test['psnr_gain']:+.2f}), SSIM {test['ssim']:.4f} vs "
                      f"{test['input_ssim']:.4f}, RMSE {test['rmse_hu']:.1f} vs {test['input_rmse_hu']:.1f} HU")
            print(f"checkpoints: {result.best_path} (best), {result.last_path} (last); summary: "
                  f"{Path(args.out) / 'summary.json'}")
    finally:
        dist.shutdown()
    return 0

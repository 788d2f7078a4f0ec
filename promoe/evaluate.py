"""FID, sFID, Inception Score, precision and recall of samples against a reference batch, with the definitions of
OpenAI's guided-diffusion evaluator and a local copy of pytorch-fid's FID Inception weights (nothing is downloaded).

    python -m promoe.evaluate SAMPLES --ref VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05.pth

SAMPLES: an .npz with arr_0 uint8 [N, H, W, 3] (arr_1 labels optional, unused), a folder holding samples.npz (as
`python -m promoe.sample` writes), or a folder of PNG files. REF: a reference batch .npz (mu, sigma, mu_s, sigma_s,
and arr_0 images for precision / recall), an .npz of images, or a folder of PNGs. The metrics are printed and
written to metrics.json beside the samples, with the content of a sampling.json found there under "sampling".
"""

import argparse
import json
import math
from pathlib import Path

import torch

from promoe.errors import Refusal, exits_with_message, one_line, parse_json, read_small_text, write_text_atomically
from promoe.eval.images import check_enough, open_images
from promoe.eval.inception import load_inception
from promoe.eval.metrics import inception_score, precision_recall
from promoe.eval.reference import inception_features, read_reference, save_reference

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def evaluate(samples, ref, inception, batch_size: int = 64, device="cpu", save_ref=None) -> dict:
    """The metrics of one sample set as a JSON-able dict (precision and recall None if the reference has neither
    images nor pool features)."""
    images = open_images(samples)  # fail on a bad sample file before the slow reference pass
    check_enough(images, str(images.path))
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False  # TF's graph convolves in full float32; TF32 would shift features
    net = load_inception(inception, device)
    reference = read_reference(ref, net, batch_size, device, need_pool=True)
    if save_ref is not None:
        save_reference(save_ref, reference)
    features = inception_features(images, net, batch_size, device, desc="samples")
    metrics = {
        "fid": features.pool_stats.frechet_distance(reference.pool_stats),
        "sfid": features.spatial_stats.frechet_distance(reference.spatial_stats),
        "inception_score": inception_score(features.logits),
        "precision": None,
        "recall": None,
    }
    if reference.pool is not None:
        metrics["precision"], metrics["recall"] = precision_recall(reference.pool, features.pool)
    else:
        print(f"note: {ref} has neither images (arr_0) nor pool features: no precision / recall")
    metrics.update(num_samples=len(images), samples=str(images.path), reference=str(ref), inception=str(inception))
    return metrics


def results_folder(samples) -> Path:
    samples = Path(samples)
    return samples if samples.is_dir() else samples.parent


@exits_with_message
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help=".npz (arr_0 uint8 NHWC) or folder of PNGs / samples.npz")
    parser.add_argument("--ref", required=True, help="reference batch .npz, .npz of images, or folder of PNGs")
    parser.add_argument("--inception", required=True, help="local pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save-ref", help="also write the reference statistics and pool features to this .npz")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")

    metrics = evaluate(args.samples, args.ref, args.inception, args.batch_size, args.device, args.save_ref)
    for name in METRICS:
        value = metrics[name]
        print(f"{name:>16}: {value:.4f}" if value is not None else f"{name:>16}: n/a")
    not_finite = [name for name in METRICS if metrics[name] is not None and not math.isfinite(metrics[name])]
    if not_finite:  # a NaN FID must never reach a results table as if it were one
        raise SystemExit(f"error: {', '.join(not_finite)} not finite: the samples or the reference hold NaN or "
                         "infinite features; metrics.json not written")
    folder = results_folder(args.samples)
    sampling = folder / "sampling.json"
    if sampling.is_file():
        try:
            metrics["sampling"] = parse_json(read_small_text(sampling, "the settings of a sampling job"))
        except ValueError as error:
            raise Refusal(f"{sampling} is unreadable ({one_line(str(error), 150)}): delete or fix it") from None
    write_text_atomically(folder / "metrics.json", json.dumps(metrics, indent=2))
    print(f"wrote {folder / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()

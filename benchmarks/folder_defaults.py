"""Defaults that hold: a folder case as a new user meets it, every sampler, an independent judge.

Builds one case from scikit-learn's digits: an unlabeled folder U (normal digits plus a share
``--beta`` of the sensitive classes), a folder S of ``--num-s`` other sensitive digits, and a
held-out folder of normal digits (the quality reference, never trained on). Each method is trained
with the folder preset and nothing but ``--image-size 8 --channels 1 --beta B`` (``pudm train``,
as a user runs it), then sampled with every sampler pudm offers at its default steps
(``pudm sample``) and with the saved pipeline's own scheduler in plain diffusers
(``DDPMPipeline.from_pretrained``, its default 1,000 steps). Samples are judged three ways:

- non-sensitive rate: an RBF SVM on all 1,797 digits (not pudm's classifier);
- FID on the features of pudm's evaluation CNN (``--judge``, trained on the real digit labels);
- Frechet distance in pixel space (no judge at all).

Prints one JSON line per (method, sampler) and a markdown table; ``--out`` keeps the runs::

    python benchmarks/folder_defaults.py --sensitive 3,8 --beta 0.2 --num-s 50 \\
        --judge runs/clf-digits --out runs/folder-3-8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLERS = ("ddpm", "ddim", "dpm", "dpm-sde")


def write_case(root: Path, sensitive: tuple[int, ...], beta: float, num_s: int, seed: int) -> np.ndarray:
    """U, S and the held-out normal reference as PNG folders; returns the reference images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    rng = np.random.default_rng(seed)
    is_sensitive = np.isin(digits.target, sensitive)
    normal, hidden = (
        rng.permutation(np.flatnonzero(~is_sensitive)),
        rng.permutation(np.flatnonzero(is_sensitive)),
    )
    num_test = len(normal) // 4
    test, u_normal = normal[:num_test], normal[num_test:]
    num_hidden = round(len(u_normal) * beta / (1.0 - beta))
    if num_hidden + num_s > len(hidden):
        sys.exit(f"{len(hidden)} sensitive digits cannot give {num_hidden} hidden in U and {num_s} in S")
    u_sensitive, s = hidden[:num_hidden], hidden[num_hidden : num_hidden + num_s]
    u = rng.permutation(np.concatenate([u_normal, u_sensitive]))
    for name, indices in (("U", u), ("S", s), ("test", test)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, index in enumerate(indices):  # file names reveal nothing of the hidden truth
            Image.fromarray(images[index]).save(folder / f"{k:05d}.png")
    return images[test][..., None]


def pudm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pudm", *args], check=True, stdout=subprocess.DEVNULL)


def plain_diffusers(pipeline: Path, num: int) -> np.ndarray:
    import torch
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(batch_size=num, generator=generator, output_type="np").images
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sensitive", default="3,8", help="sensitive digit classes")
    parser.add_argument("--beta", type=float, default=0.2, help="share of sensitive items in U")
    parser.add_argument("--num-s", type=int, default=50, help="labeled sensitive items in S")
    parser.add_argument("--methods", default="unsupervised,pu,filter")
    parser.add_argument("--num", type=int, default=500, help="samples per (method, sampler)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case's split")
    parser.add_argument("--judge", required=True, help="pudm classifier folder for the digits")
    parser.add_argument("--out", required=True)
    parser.add_argument("--extra", default="", help="more pudm train flags, e.g. '--steps 200'")
    args = parser.parse_args()

    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from pudm.classifier import Classifier
    from pudm.evaluation import classifier_fid, pixel_fid

    sensitive = tuple(int(c) for c in args.sensitive.split(","))
    out = Path(args.out)
    reference = write_case(out / "data", sensitive, args.beta, args.num_s, args.seed)
    digits = load_digits()
    svm = SVC(gamma=0.001, C=10.0, random_state=0).fit(digits.data, digits.target)
    judge = Classifier.load(Path(args.judge))
    rows = []
    for method in args.methods.split(","):
        run = out / method
        if not (run / "summary.json").is_file():
            started = time.perf_counter()
            pudm(
                "train",
                "--unlabeled",
                str(out / "data/U"),
                "--sensitive",
                str(out / "data/S"),
                "--image-size",
                "8",
                "--channels",
                "1",
                "--beta",
                str(args.beta),
                "--method",
                method,
                "--out",
                str(run),
                "--quiet",
                *args.extra.split(),
            )
            print(f"# trained {method} in {time.perf_counter() - started:.0f} s", flush=True)
        for sampler in (*SAMPLERS, "diffusers"):
            if sampler == "diffusers":
                images = plain_diffusers(run / "pipeline", args.num)
            else:
                file = run / f"samples-{sampler}.npz"
                if not file.is_file():
                    pudm("sample", str(run), "--sampler", sampler, "--num", str(args.num), "--out", str(file))
                images = np.load(file)["images"]
            grey = images[..., :1]
            predicted = svm.predict(grey[..., 0].reshape(len(grey), 64) / 255.0 * 16.0)
            row = {
                "method": method,
                "sampler": sampler,
                "non_sensitive_rate": float(np.mean(~np.isin(predicted, sensitive))),
                "fid_classifier": classifier_fid(judge, reference, grey),
                "fid_pixels": pixel_fid(reference, grey),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\ncase: sensitive {sensitive}, beta {args.beta}, |S| = {args.num_s}, {args.num} samples per cell\n"
    )
    print("| method | sampler | non-sensitive rate (SVM) | FID (CNN features) | Frechet (pixels) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['sampler']} | {row['non_sensitive_rate']:.3f} | "
            f"{row['fid_classifier']:.2f} | {row['fid_pixels']:.2f} |"
        )
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

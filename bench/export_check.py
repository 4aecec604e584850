"""How far a correct export's class probabilities are from evaluate's, and how far a wrong one's are:
`python -m bench.export_check` -> bench/results/export_check.md.

Each case is a small project on real CIFAR-10 test images: preprocess, a model saved as
models/finetuned without training (a fresh head: near chance), the real evaluate stage (fp32, as all
inference is), then the export check; then the export again with its image processor's mean/std or size
altered. The tests (tests/test_export.py) run the same project.
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
from contextlib import contextmanager
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / "data" / "cifar10-jpg.tgz"


@contextmanager
def working_directory(path: Path):
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def cifar_folder(target: Path, test_per_class: int, archive: Path = ARCHIVE, train_per_class: int = 10) -> Path:
    """`<split>/<class>/<image>` of real CIFAR-10 JPEGs, all 10 classes."""
    wanted, counts = {"train": train_per_class, "test": test_per_class}, {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in wanted:
                continue
            key = (parts[-3], parts[-2])
            if counts.get(key, 0) < wanted[key[0]]:
                counts[key] = counts.get(key, 0) + 1
                out = target / key[0] / key[1] / parts[-1]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
            if len(counts) == 20 and all(n >= wanted[k[0]] for k, n in counts.items()):
                break
    return target


def evaluated_project(root: Path, source: Path, model: str, image_size: int | None) -> Path:
    """A project at `root` whose models/finetuned is `model` with a fresh head, evaluated by the real stage."""
    from stages import evaluate, preprocess
    from stages.dataformat import FINETUNE_FILE, FINETUNED_DIR, load_split, read_classes
    from stages.download import resolve_source, write_raw
    from stages.modeling import load_pretrained, save_model

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fraction"], params["data"]["test_fraction"], params["data"]["source"] = 1.0, 1.0, str(source)
    params["model"] |= {"name": model, "image_size": image_size}
    params["train"]["mode"] = "full"
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with working_directory(root):
        write_raw(resolve_source(str(source)), str(source))
        preprocess.main()
        import torch

        torch.manual_seed(0)  # the fresh head's initialisation
        finetuned, processor = load_pretrained(model, read_classes(), image_size)
        save_model(finetuned, processor, FINETUNED_DIR, load_split("test").pixels.shape[-2:])
        # What finetune would have recorded for a model it did not train (the export's model card reads it).
        untrained = {"kept_epoch": 0, "kept_val_accuracy": 0.0, "kept_val_loss": 0.0, "train_images": 0, "val_images": 0, "temperature": 1.0, "epochs": 0, "lr": 0.0, "keep_epoch": "last"}
        FINETUNE_FILE.parent.mkdir(exist_ok=True)
        FINETUNE_FILE.write_text(json.dumps(untrained | {"device": "cpu", "precision": "fp32", "base_model_revision": None}))
        evaluate.main()
    return root


def alter_processor(export_dir: Path, **changes) -> None:
    path = export_dir / "preprocessor_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes, indent=2))


def export_checks(project: Path, n_images: int = 200) -> dict[str, dict]:
    """The export check of a correct export, and of exports with a wrong normalisation or input size."""
    from stages.dataformat import EXPORT_DIR, FINETUNED_DIR
    from stages.errors import PipelineError
    from stages.export import check_export, write_export

    out = {}
    with working_directory(project):
        config = json.loads((FINETUNED_DIR / "preprocessor_config.json").read_text())
        side = config["size"]["height"]
        cases = {
            "correct": {},
            "ImageNet mean/std instead": {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
            "not normalised (mean 0, std 1)": {"image_mean": [0.0] * 3, "image_std": [1.0] * 3},
            f"size {side * 2} instead of {side}": {"size": {"height": side * 2, "width": side * 2}},
        }
        for case, changes in cases.items():
            write_export(FINETUNED_DIR, EXPORT_DIR)
            alter_processor(EXPORT_DIR, **changes)
            try:
                out[case] = check_export(EXPORT_DIR, n_images, 64)
            except PipelineError as err:
                out[case] = {"error": str(err)}
    return out


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-per-class", type=int, default=20)
    args = parser.parse_args()
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = cifar_folder(tmp / "cifar", args.test_per_class)
        vit = tmp / "tiny-vit"
        ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)).save_pretrained(vit)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
        models = [("tiny ViT (random), 32 px", str(vit), None), ("EfficientNet-Lite0, fresh head, 64 px", "efficientnet-lite0", 64), ("EfficientNet-Lite0, fresh head, 224 px", "efficientnet-lite0", None)]
        for label, model, size in models:
            project = evaluated_project(tmp / f"{len(rows)}", source, model, size)
            for case, check in export_checks(project).items():
                rows.append((label, case, check))
                print(label, case, {k: check.get(k) for k in ("max_probability_diff", "mean_probability_diff", "agreement", "evaluated_accuracy", "error")}, flush=True)
    lines = [
        "# Export check: largest class-probability difference from evaluate",
        "",
        f"{args.test_per_class * 10} real CIFAR-10 test images (stored at their native 32 px), models with a fresh 10-way head (near chance);",
        "evaluate (PyTorch's resize, ONNX Runtime) and the export check (PIL's resize, ONNX Runtime) both in fp32, the check from the original files.",
        "",
        "| model | export | max abs diff | mean abs diff | label agreement | evaluated accuracy |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, case, c in rows:
        if "error" in c:
            lines.append(f"| {label} | {case} | fails: the runtime cannot run it | | | |")
            continue
        lines.append(f"| {label} | {case} | {c['max_probability_diff']:.2e} | {c['mean_probability_diff']:.2e} | {c['agreement']:.3f} | {c['evaluated_accuracy']:.3f} |")
    out = ROOT / "bench" / "results" / "export_check.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

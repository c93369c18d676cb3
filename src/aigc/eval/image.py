"""Image evaluation: FID, KID, precision/recall and conditional accuracy in a feature space of our own.

Inception-v3 weights cannot be fetched on an offline machine, and on 8-64 px vertical data an
ImageNet network is a poor judge anyway. So each dataset gets a small feature network
(``FeatureNet``), trained once on the dataset's training split and cached by the dataset's hash: a
CNN whose 128-d penultimate layer is the feature space. Its heads predict the class, the generator
attributes where the data has them (shapes: shape, colour, size, position) and the rotation of the
image (a self-supervised task, so datasets without labels still get a feature space). Its accuracy
on held-out real images is reported beside the scores: a feature network that cannot tell the
classes apart makes FID meaningless, and the report says so.

- FID and KID: torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with that
  network as ``feature``. Scores from different feature networks are not comparable; the report
  names the network's hash. The floor is the FID of held-out real images against the training set.
- Precision and recall (Kynkäänniemi et al. 2019): k-NN manifolds (k = 3) of real and of generated
  features; precision = share of generated samples inside the real manifold, recall = the converse.
- Conditional accuracy: how often the feature network's class head agrees with the requested class;
  on the built-in shapes, the exact checker (``data/shapes.check``) reads shape, colour, size and
  position off each generated image and compares them with the caption.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from aigc import threads
from aigc.errors import UserError

FEATURE_NET_VERSION = 1


class FeatureNet(nn.Module):
    """A small CNN classifier; ``forward`` returns the 128-d features torchmetrics compares."""

    num_features = 128

    def __init__(self, channels: int, heads: dict[str, int]):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True),
                    nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.body = nn.Sequential(*block(channels, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, self.num_features), nn.ReLU(True))
        self.heads = nn.ModuleDict({name: nn.Linear(self.num_features, n) for name, n in heads.items()})
        self.head_sizes = dict(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) in [-1, 1] -> (B, 128)
        return self.body(x)

    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        return {name: head(f) for name, head in self.heads.items()}


def _float(images: np.ndarray) -> torch.Tensor:
    from aigc.generate.image import from_uint8

    return from_uint8(images)


def _targets(split, manifest: dict) -> dict[str, np.ndarray]:
    """Per-image labels of each supervised head (class, attributes); -1 where unknown."""
    targets = {}
    if manifest.get("classes"):
        targets["class"] = split.labels
    for attr in manifest.get("attributes", []):
        values = sorted({r["attributes"][attr] for r in split.records})
        targets[attr] = np.asarray([values.index(r["attributes"][attr]) for r in split.records])
    return targets


def _rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, k)])


def train_feature_net(train, val, manifest: dict, steps: int = 400, seed: int = 0, batch: int = 64,
                      progress: Callable[[str, int, int], None] | None = None) -> tuple[FeatureNet, dict]:
    """Train the network on the training split; return it and its held-out accuracies."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    targets = _targets(train, manifest)
    vocab = {attr: sorted({r["attributes"][attr] for r in train.records}) for attr in manifest.get("attributes", [])}
    heads = {name: int(t.max()) + 1 for name, t in targets.items()}
    heads["rotation"] = 4
    net = FeatureNet(train.images.shape[3], heads)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    x_all = _float(train.images)
    t_all = {k: torch.from_numpy(v).long() for k, v in targets.items()}
    net.train()
    for step in range(steps):
        threads.adapt()
        if progress and step % 10 == 0:
            progress("training the feature network (once per dataset)", step, steps)
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x = x_all[idx]
        x = x + 0.03 * torch.randn(x.shape, generator=g)  # generated images are noisier than real ones
        rot = torch.randint(0, 4, (batch,), generator=g)
        out = net.predict(torch.cat([x, _rotate(x, rot)]))
        loss = sum(nn.functional.cross_entropy(out[k][:batch], t[idx]) for k, t in t_all.items())
        loss = loss + nn.functional.cross_entropy(out["rotation"][batch:], rot)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if progress:
        progress("training the feature network (once per dataset)", steps, steps)
    net.eval()
    val_targets = {}
    for k, v in _targets(val, manifest).items():  # val attribute values index the training vocabulary
        if k in vocab:
            v = np.asarray([vocab[k].index(r["attributes"][k]) if r["attributes"][k] in vocab[k] else -1 for r in val.records])
        val_targets[k] = v
    preds = predict(net, val.images)
    accuracy = {k: round(float((preds[k] == v).mean()), 4) for k, v in val_targets.items() if len(v)}
    return net, {"heads": heads, "attribute_values": vocab, "heldout_accuracy": accuracy, "steps": steps,
                 "heldout_images": int(len(val.images))}


@torch.no_grad()
def predict(net: FeatureNet, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for start in range(0, len(images), batch):
        for k, v in net.predict(_float(images[start:start + batch])).items():
            out.setdefault(k, []).append(v.argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


@torch.no_grad()
def features(net: FeatureNet, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    return torch.cat([net(_float(images[s:s + batch])) for s in range(0, len(images), batch)]) if len(images) else torch.zeros(0, net.num_features)


def cache_dir() -> Path:
    from aigc.settings import Settings

    return Settings().cache_dir or Path.home() / ".cache" / "aigc"


def get_feature_net(data_dir: Path, steps: int = 400, seed: int = 0,
                    progress: Callable[[str, int, int], None] | None = None) -> tuple[FeatureNet, dict]:
    """The dataset's feature network, from the cache or trained now (and cached)."""
    from aigc.data.images import load_prepared

    manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
    key = hashlib.sha256(json.dumps([FEATURE_NET_VERSION, manifest["files"], steps, seed], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "featnets" / f"{key}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        net = FeatureNet(blob["channels"], blob["info"]["heads"])
        net.load_state_dict(blob["state"])
        net.eval()
        return net, blob["info"]
    train, val, manifest = load_prepared(data_dir)
    started = time.time()
    net, info = train_feature_net(train, val, manifest, steps=steps, seed=seed, progress=progress)
    info.update({"id": key, "train_seconds": round(time.time() - started, 1)})
    path.parent.mkdir(parents=True, exist_ok=True)
    from aigc.train.common import atomic_torch_save

    atomic_torch_save({"channels": train.images.shape[3], "info": info, "state": net.state_dict()}, path)
    return net, info


# ---------------------------------------------------------------- scores

def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets (N, D) and (M, D)."""
    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # the 0th neighbour is the point itself

    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # (M, N)
    precision = (d <= r_real.unsqueeze(0)).any(dim=1).float().mean().item()
    recall = (d.t() <= r_fake.unsqueeze(0)).any(dim=1).float().mean().item()
    return precision, recall


def distribution_scores(net: FeatureNet, real: np.ndarray, fake: np.ndarray, kid_subsets: int = 50) -> dict:
    """FID, KID (mean, std), precision and recall of generated vs real images, all (N, H, W, C) uint8."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 4 or len(fake) < 4:
        raise UserError(f"FID/KID need at least 4 real and 4 generated images (got {len(real)} and {len(fake)})")
    fid = FrechetInceptionDistance(feature=net, normalize=True, input_img_size=(real.shape[3], real.shape[1], real.shape[2]))
    subset = min(1000, len(real), len(fake))
    with warnings.catch_warnings():  # "will save all extracted features": intended, a few thousand 128-d vectors
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=net, subsets=kid_subsets, subset_size=subset, normalize=True)
    for imgs, is_real in ((real, True), (fake, False)):
        for start in range(0, len(imgs), 256):
            x = _float(imgs[start:start + 256])
            fid.update(x, real=is_real)
            kid.update(x, real=is_real)
    kid_mean, kid_std = kid.compute()
    p, r = precision_recall(features(net, real), features(net, fake))
    return {"fid": round(float(fid.compute()), 4), "kid": round(float(kid_mean), 6), "kid_std": round(float(kid_std), 6),
            "precision": round(p, 4), "recall": round(r, 4), "real_images": int(len(real)), "generated_images": int(len(fake))}


def shapes_adherence(images: np.ndarray, captions: list[str]) -> dict:
    """The exact checker's verdict: per-attribute accuracy and the share right on shape+colour+position."""
    from aigc.data import shapes

    if images.shape[3] != 3 or images.shape[1] < 32:
        raise UserError("the shapes checker needs RGB images of at least 32x32")
    hits = {a: 0 for a in shapes.ATTRIBUTES}
    joint = every = found = 0
    for img, caption in zip(images, captions):
        want = shapes.parse_caption(caption)
        if want is None:
            raise UserError(f"not a shapes caption: {caption!r}")
        got = shapes.check(img)
        if got is None:
            continue
        found += 1
        ok = {a: got[a] == getattr(want, a) for a in shapes.ATTRIBUTES}
        for a in shapes.ATTRIBUTES:
            hits[a] += ok[a]
        joint += ok["shape"] and ok["colour"] and ok["position"]
        every += all(ok.values())
    n = len(captions)
    return {"accuracy": round(joint / n, 4), "all_attributes": round(every / n, 4), "shape_found": round(found / n, 4),
            **{a: round(hits[a] / n, 4) for a in shapes.ATTRIBUTES}, "images": n}


def conditional_accuracy(net: FeatureNet, info: dict, images: np.ndarray, requested: dict[str, list]) -> dict:
    """Agreement of the feature network's heads with the requested class / attributes."""
    preds = predict(net, images)
    out = {}
    for head, wanted in requested.items():
        if head not in preds:
            continue
        values = info.get("attribute_values", {}).get(head)
        ids = np.asarray([values.index(w) if values else int(w) for w in wanted])
        out[head] = round(float((preds[head] == ids).mean()), 4)
    return out


# ---------------------------------------------------------------- a run

def evaluate_run(run: str | Path, n: int = 1000, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 feature_steps: int = 400, progress: Callable[[str, int, int], None] | None = None, device: str = "cpu") -> dict:
    """Generate n images from the run and score them; writes eval/report.{json,md} and eval/samples.png.
    ``progress(stage, done, total)`` hears how each stage advances."""
    from aigc.data.images import load_prepared
    from aigc.generate.image import ImagePipeline, grid, save_png

    run = Path(run)
    if not (run / "data" / "manifest.json").is_file():
        raise UserError(f"{run}: not an image run directory (no data/manifest.json)")
    if n < 4:
        raise UserError(f"n must be >= 4 for FID/KID, got {n}")
    pipe = ImagePipeline.from_run(run, device=device)
    train, val, manifest = load_prepared(run / "data")
    net, info = get_feature_net(run / "data", steps=feature_steps, progress=progress)
    started = time.time()
    made = (lambda done: progress("generating images", done, n)) if progress else None
    meta = pipe.meta
    requested: dict[str, list] = {}
    if meta.condition == "class":
        classes = [meta.classes[i % len(meta.classes)] for i in range(n)]
        images, _ = pipe.generate(n=n, seed=seed, classes=classes, steps=steps, guidance=guidance, progress=made)
        requested["class"] = [meta.classes.index(c) for c in classes]
        labels = classes
    elif meta.condition == "caption":
        records = (val.records or train.records)
        picks = [records[i % len(records)] for i in range(n)]
        captions = [r["caption"] for r in picks]
        images, _ = pipe.generate(n=n, seed=seed, captions=captions, steps=steps, guidance=guidance, progress=made)
        if manifest.get("classes"):
            requested["class"] = [manifest["classes"].index(r["class"]) for r in picks]
        for attr in manifest.get("attributes", []):
            requested[attr] = [r["attributes"][attr] for r in picks]
        labels = captions
    else:
        images, labels = pipe.generate(n=n, seed=seed, steps=steps, guidance=guidance, progress=made)
    gen_seconds = time.time() - started
    if progress:
        progress("scoring: FID, KID, precision/recall, accuracy", 0, 1)
    report = {
        "run": str(run), "kind": meta.kind, "condition": meta.condition, "step": meta.step, "seed": seed,
        "size": meta.size, "sampling": {"steps": steps, "guidance": guidance} if meta.kind == "ddpm" else {},
        "images_per_s": round(n / max(gen_seconds, 1e-9), 2),
        "feature_net": {k: info[k] for k in ("id", "heldout_accuracy", "heldout_images", "steps") if k in info},
        "scores": distribution_scores(net, train.images, images),
        "real_floor": distribution_scores(net, train.images, val.images) if len(val.images) >= 4 else None,
        "conditional_accuracy": conditional_accuracy(net, info, images, requested) if requested else {},
    }
    if meta.condition == "caption" and manifest.get("attributes") and "builtin:shapes" in {s["path"] for s in manifest["sources"]}:
        if meta.size >= 32 and meta.channels == 3:
            report["shapes_checker"] = shapes_adherence(images, labels)
        else:
            report["shapes_checker_skipped"] = "the exact checker needs RGB images of at least 32x32"
    if progress:
        progress("scoring: FID, KID, precision/recall, accuracy", 1, 1)
    out = run / "eval"
    out.mkdir(exist_ok=True)
    save_png(grid(images[:64], ncol=8), out / "samples.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    return report


def report_markdown(r: dict) -> str:
    s, floor = r["scores"], r.get("real_floor")
    lines = [f"# Image evaluation: {r['run']}", "",
             f"Model: {r['kind']} ({r['condition']}-conditional), step {r['step']}, {s['generated_images']} images, seed {r['seed']}.",
             f"Sampling speed: {r['images_per_s']} images/s.", "",
             "| metric | generated | held-out real (floor) |", "| --- | --- | --- |"]
    for key in ("fid", "kid", "precision", "recall"):
        lines.append(f"| {key.upper() if key in ('fid', 'kid') else key} | {s[key]} | {floor[key] if floor else '-'} |")
    fn = r["feature_net"]
    lines += ["", f"Feature network `{fn.get('id')}` (project-trained, 128-d): held-out accuracy "
              + ", ".join(f"{k} {v:.1%}" for k, v in fn.get("heldout_accuracy", {}).items()) + "."]
    if r["conditional_accuracy"]:
        lines += ["", "Conditional accuracy (feature network agrees with the request): "
                  + ", ".join(f"{k} {v:.1%}" for k, v in r["conditional_accuracy"].items()) + "."]
    if "shapes_checker" in r:
        c = r["shapes_checker"]
        lines += ["", f"Shapes checker: shape+colour+position right in {c['accuracy']:.1%}; all four in {c['all_attributes']:.1%} "
                  f"(shape {c['shape']:.1%}, colour {c['colour']:.1%}, size {c['size']:.1%}, position {c['position']:.1%})."]
    lines += ["", "![samples](samples.png)", ""]
    return "\n".join(lines)

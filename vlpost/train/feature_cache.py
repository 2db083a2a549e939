"""Stage 1's frozen-feature cache: the ViT runs once per image, later epochs and runs read its features from disk.

An entry is one safetensors file holding the tower's output for one image (what the projector consumes, after
`feature_layer`), at `<dir>/<tower fingerprint>/<dd>/<sample id>-<pixel digest>.safetensors`. The fingerprint
hashes the tower's weights, modules, feature layer, dtype and preprocess transform, so another tower never reads
these entries; the pixel digest makes a different image under the same id (another data set, image size or
transform) a miss instead of a stale hit. Writes are atomic (temp file, then rename); an entry that cannot be
read back (truncated, corrupt, wrong shape) is recomputed and rewritten, and a failed write only logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,96}")
TENSOR = "features"


def tower_fingerprint(tower) -> str:
    """sha256 of everything that decides the tower's features: weights, modules, feature layer, dtype, transform."""
    hasher = hashlib.sha256()
    spec = {"modules": repr(tower.visual), "layer_index": tower.layer_index, "dtype": str(tower.dtype),
            "transform": repr(tower.transform)}
    hasher.update(json.dumps(spec, sort_keys=True).encode())
    for name, tensor in tower.visual.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        hasher.update(flat.view(torch.uint8).numpy())
    return hasher.hexdigest()


def pixel_digest(pixels: torch.Tensor) -> str:
    """Digest of one preprocessed image (3, H, W): the same id with other pixels is another entry."""
    return hashlib.blake2b(pixels.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                           digest_size=12).hexdigest()


class FeatureCache:
    """Per-image tower features on disk for one tower (`fingerprint`); counts hits, misses and bad entries."""

    def __init__(self, root: str | Path, fingerprint: str, feature_shape: tuple[int, int], dtype: torch.dtype):
        self.root, self.fingerprint = Path(root), fingerprint
        self.folder = self.root / fingerprint[:24]
        self.feature_shape, self.dtype = tuple(feature_shape), dtype
        self.counts: Counter = Counter()

    def path(self, sample_id: str, digest: str) -> Path:
        name = sample_id if SAFE_ID.fullmatch(sample_id) else hashlib.sha1(sample_id.encode()).hexdigest()
        return self.folder / digest[:2] / f"{name}-{digest}.safetensors"

    def load(self, sample_id: str, digest: str) -> torch.Tensor | None:
        """The stored (num_patches, D_v) features, or None when absent or unreadable (then it is recomputed)."""
        path = self.path(sample_id, digest)
        if not path.is_file():
            return None
        try:
            features = load_file(str(path))[TENSOR]
        except Exception as err:  # truncated / corrupt file: any reader error means "recompute"
            self.counts["corrupt"] += 1
            log.warning("feature cache entry %s unreadable (%s: %s); recomputing it", path, type(err).__name__, err)
            return None
        if tuple(features.shape) != self.feature_shape or features.dtype != self.dtype:
            self.counts["corrupt"] += 1
            log.warning("feature cache entry %s holds %s %s, expected %s %s; recomputing it", path,
                        tuple(features.shape), features.dtype, self.feature_shape, self.dtype)
            return None
        return features

    def save(self, sample_id: str, digest: str, features: torch.Tensor) -> None:
        """Write atomically (temp + rename); a full disk or a read-only dir costs speed, never the run."""
        path = self.path(sample_id, digest)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({TENSOR: features.detach().to("cpu", self.dtype).contiguous()}, str(temp),
                      metadata={"id": sample_id, "pixels": digest, "tower": self.fingerprint})
            os.replace(temp, path)
        except OSError as err:
            self.counts["write_errors"] += 1
            if self.counts["write_errors"] == 1:
                log.warning("feature cache: cannot write %s (%s); training goes on without caching", path, err)
            temp.unlink(missing_ok=True)


class CachedFeatureBatches:
    """Wraps a batch stream: `pixel_values` become `image_features`, read from the cache or computed once.

    The wrapped stream's order and resume position are untouched (state_dict / load_state_dict pass through);
    misses run the frozen tower on its device in one call per batch. A batch without images carries zero
    feature rows, so the model's forward never runs the tower.
    """

    def __init__(self, batches, tower, cache: FeatureCache, autocast: Callable = nullcontext):
        self.batches, self.tower, self.cache, self.autocast = batches, tower, cache, autocast

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            yield self._with_features(batch)

    def _with_features(self, batch: dict) -> dict:
        batch = dict(batch)
        pixels = batch.pop("pixel_values", None)  # (N_img, 3, H, W)
        if pixels is None:
            batch["image_features"] = torch.zeros(0, *self.cache.feature_shape, dtype=self.cache.dtype)
            return batch
        ids = batch.get("image_ids") or [f"row{i}" for i in range(pixels.shape[0])]
        digests = [pixel_digest(p) for p in pixels]
        rows = [self.cache.load(i, d) for i, d in zip(ids, digests, strict=True)]
        missing = [n for n, row in enumerate(rows) if row is None]
        self.cache.counts["hits"] += len(rows) - len(missing)
        self.cache.counts["misses"] += len(missing)
        if missing:
            for n, features in zip(missing, self._compute(pixels[missing]), strict=True):
                self.cache.save(ids[n], digests[n], features)
                rows[n] = features
        batch["image_features"] = torch.stack(rows)  # (N_img, num_patches, D_v)
        return batch

    @torch.no_grad()
    def _compute(self, pixels: torch.Tensor) -> torch.Tensor:
        device = next(self.tower.parameters()).device
        with self.autocast():  # as the tower runs inside the training forward without the cache
            features = self.tower(pixels.to(device, self.tower.dtype))
        return features.to("cpu", self.cache.dtype)

    # the wrapped stream's interface (resume, skip counters, reader stats)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    @property
    def skipped(self):
        return getattr(self.batches, "skipped", {})

    @property
    def source(self):
        return getattr(self.batches, "source", None)

    def summary(self, global_sums: Callable = lambda *values: list(values)) -> dict:
        """Hits / misses / unreadable entries over all ranks (pass the trainer's `global_sums`; collective)."""
        keys = ("hits", "misses", "corrupt", "write_errors")
        totals = global_sums(*(self.cache.counts[k] for k in keys))
        return {"dir": str(self.cache.root), "tower": self.cache.fingerprint[:24],
                **{k: int(v) for k, v in zip(keys, totals, strict=True)}}


def cache_tower_features(batches, model, directory: str | Path | None, accelerator=None):
    """`batches` with tower features from a disk cache at `directory`; unchanged when `directory` is None.

    Refuses a trainable tower (its features change every step) and ZeRO-3 (the partitioned tower would run
    outside the engine on only the ranks that miss).
    """
    if not directory:
        return batches
    tower = model.vision
    if not tower.frozen or any(p.requires_grad for p in tower.parameters()):
        raise ValueError(f"data.feature_cache={directory!r} needs a frozen vision tower, but the tower trains; "
                         "unset data.feature_cache (features of a training tower change every step)")
    if accelerator is not None:
        from vlpost.train.checkpointing import zero3

        if zero3(accelerator):
            raise ValueError("data.feature_cache is not supported under ZeRO-3 (the tower is partitioned); use DDP "
                             "or ZeRO-2 for stage 1, or unset data.feature_cache")
    cache = FeatureCache(directory, tower_fingerprint(tower), (tower.num_patches, tower.hidden_size), tower.dtype)
    log.info("feature cache %s (tower %s)", cache.folder, cache.fingerprint[:12])
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    return CachedFeatureBatches(batches, tower, cache, autocast)


def feature_cache_summary(batches, global_sums: Callable) -> dict:
    """{"feature_cache": {...}} for summary.json when `batches` reads a cache, else {} (collective)."""
    if isinstance(batches, CachedFeatureBatches):
        return {"feature_cache": batches.summary(global_sums)}
    return {}

"""Where DPO's reference log-probs come from, without a second full model when avoidable.

- adapter: a LoRA policy with its adapters disabled is the initial model (no second LM in memory); when the
  projector trains, a frozen copy of the initial projector (small) stands in for it.
- cache: full fine-tuning; the reference log-probs are computed in one pass before training and kept on disk
  at `<cache_dir>/<reference hash>/<data id>-r<rank>.jsonl`, one line per pair keyed by sample id and checked by
  a fingerprint of its tokens, so shuffling, epochs, restarts and later runs reuse them and a partial file
  is continued. The hash covers the reference weights, the image-token settings and the chat template.
- copy: a frozen deep copy of projector + LM (the tower is frozen and shared).
Every reference offers `logps(model, batch, features) -> (2B,)` summed completion log-probs, detached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch

from vlpost.train.logprobs import sequence_logprobs
from vlpost.train.preference import lm_logits, unwrap, vision_features
from vlpost.train.zero import plain_copy, whole_model

log = logging.getLogger(__name__)


class LiveReference:
    """Reference log-probs from a no-grad forward pass: the model itself, adapters off, or frozen copies."""

    def __init__(self, projector=None, lm=None, disable_adapters: bool = False):
        self.projector, self.lm, self.disable_adapters = projector, lm, disable_adapters

    def logps(self, model, batch: dict, features: torch.Tensor | None) -> torch.Tensor:
        core = unwrap(model)
        self._follow(batch["input_ids"].device)
        lm = self.lm if self.lm is not None else core.lm
        projector = self.projector if self.projector is not None else core.projector
        adapters_off = lm.disable_adapter() if self.disable_adapters else nullcontext()
        with torch.no_grad(), adapters_off:
            logits = lm_logits(core, lm, projector, batch, features)
            sums, _ = sequence_logprobs(logits, batch["labels"])
        return sums.detach()


    def _follow(self, device: torch.device) -> None:
        """Frozen copies made before accelerate moved the policy follow it to the batch's device (once)."""
        for module in (self.lm, self.projector):
            if module is not None and next(module.parameters()).device != device:
                module.to(device)


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy with ordinary parameters (under ZeRO-3: made inside whole_model, kept whole on each rank)."""
    clone = plain_copy(module)
    clone.requires_grad_(False)
    return clone.eval()


def adapter_reference(core, projector_trains: bool) -> LiveReference:
    """The policy's LM with LoRA disabled; a frozen copy of the projector only if the projector trains."""
    if not hasattr(core.lm, "disable_adapter"):
        raise ValueError("dpo.reference=adapter needs a LoRA policy (freeze.lm=lora); the LM has no adapters. "
                         "Use dpo.reference=cache (or copy) for full fine-tuning")
    return LiveReference(projector=frozen_copy(core.projector) if projector_trains else None, disable_adapters=True)


def copy_reference(core) -> LiveReference:
    """A frozen deep copy of projector + LM: simple, but a second model in memory."""
    return LiveReference(projector=frozen_copy(core.projector), lm=frozen_copy(core.lm))


# ----------------------------------------------------------------------------- disk cache


def reference_hash(core) -> str:
    """sha256 over the reference's weights (tower, projector, LM: names, dtypes, shapes, bytes) and encoding setup."""
    digest = hashlib.sha256()
    setup = {"tokens_per_image": core.tokens_per_image, "image_token_id": core.image_token_id,
             "chat_template": getattr(core.tokenizer, "chat_template", None), "vocab": len(core.tokenizer)}
    digest.update(json.dumps(setup, sort_keys=True).encode())
    for prefix in ("vision", "projector", "lm"):
        for name, tensor in sorted(getattr(core, prefix).state_dict().items()):
            tensor = tensor.detach().contiguous().cpu()
            digest.update(f"{prefix}.{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


def data_id(data) -> str:
    """A name for the data the cache covers: the shard index's hash, or the synthetic world's parameters."""
    if data.shards:
        index = Path(data.shards) / "index.json"
        content = index.read_bytes() if index.is_file() else str(Path(data.shards).resolve()).encode()
        return "shards-" + hashlib.sha256(content).hexdigest()[:16]
    return f"synthetic-seed{data.synthetic_seed}-n{data.synthetic_samples}-img{data.image_size}"


class ReferenceCache:
    """Reference log-probs on disk, keyed by sample id; also a reference (`logps`) for the DPO objective."""

    def __init__(self, directory: str | Path, data_name: str, rank: int = 0):
        self.dir, self.data_name, self.rank = Path(directory), data_name, rank
        self.entries: dict[str, tuple[str, float, float]] = {}  # id → (fingerprint, chosen, rejected)
        self.load()

    @property
    def path(self) -> Path:
        return self.dir / f"{self.data_name}-r{self.rank}.jsonl"

    def load(self) -> None:
        """Read every rank's file; a torn last line (killed mid-write) is ignored and recomputed."""
        self.entries = {}
        for path in sorted(self.dir.glob(f"{self.data_name}-r*.jsonl")):
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.entries[row["id"]] = (row["fp"], float(row["chosen"]), float(row["rejected"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("reference cache %s: ignoring an unreadable line (a torn write?)", path)

    def has(self, sample_id: str, fingerprint: str) -> bool:
        entry = self.entries.get(sample_id)
        return entry is not None and entry[0] == fingerprint

    def fill(self, model, batches: Iterable[dict], autocast: Callable = nullcontext, device=None) -> dict:
        """Compute the pairs not yet cached with `model` as the reference (call before training) and append them."""
        self.dir.mkdir(parents=True, exist_ok=True)
        live, computed, reused, started = LiveReference(), 0, 0, time.perf_counter()
        core = unwrap(model)
        was_training = core.training
        core.eval()
        with open(self.path, "a") as handle:
            if _torn(self.path):  # end a line torn by a kill so the next row starts on its own line
                handle.write("\n")
            for batch in batches:
                todo = [i for i, (sid, fp) in enumerate(zip(batch["ids"], batch["fingerprints"])) if not self.has(sid, fp)]
                reused += batch["pairs"] - len(todo)
                if not todo:
                    continue
                if device is not None:
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with autocast():
                    sums = live.logps(model, batch, vision_features(core, batch)).float().cpu().tolist()
                pairs = batch["pairs"]
                for i in todo:
                    row = {"id": batch["ids"][i], "fp": batch["fingerprints"][i], "chosen": sums[i],
                           "rejected": sums[pairs + i]}
                    handle.write(json.dumps(row) + "\n")
                    self.entries[row["id"]] = (row["fp"], row["chosen"], row["rejected"])
                handle.flush()
                computed += len(todo)
        core.train(was_training)
        return {"computed": computed, "reused": reused, "cache_seconds": round(time.perf_counter() - started, 2)}

    def logps(self, model, batch: dict, features=None) -> torch.Tensor:
        chosen, rejected = [], []
        for sample_id, fingerprint in zip(batch["ids"], batch["fingerprints"]):
            if not self.has(sample_id, fingerprint):
                state = "has a different encoding" if sample_id in self.entries else "is missing"
                raise KeyError(f"reference cache {self.dir}: pair {sample_id!r} {state} (duplicate sample ids, or "
                               "data changed after precompute); delete the cache dir or fix the ids")
            _, c, r = self.entries[sample_id]
            chosen.append(c)
            rejected.append(r)
        return torch.tensor(chosen + rejected, dtype=torch.float32, device=batch["input_ids"].device)


def _torn(path: Path) -> bool:
    """True when a non-empty file does not end with a newline (its last write was cut off)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) != b"\n"


# ----------------------------------------------------------------------------- choosing one


def resolve_mode(mode: str, lm_freeze: str) -> str:
    """auto → adapter for LoRA policies, else cache."""
    if mode == "auto":
        return "adapter" if lm_freeze == "lora" else "cache"
    if mode == "adapter" and lm_freeze != "lora":
        raise ValueError(f"dpo.reference=adapter needs freeze.lm=lora, got freeze.lm={lm_freeze!r}; "
                         "use dpo.reference=cache (or copy) for full fine-tuning")
    return mode


def build_reference(cfg, freeze, model, *, precompute_batches: Callable[[], Iterable[dict]] | None = None,
                    data_name: str = "data", accelerator=None):
    """The reference named by `cfg.reference` (DPOLossConfig) for a model already wrapped by apply_freeze.

    Call before training, on every rank: the cache pass and the copies read the model's current (initial)
    weights, whole even under ZeRO-3 (inside `whole_model`; each rank then computes only its own pairs).
    Returns (reference, info) where info says what was chosen and, for the cache, what was computed.
    """
    core = unwrap(model)
    mode = resolve_mode(cfg.reference, freeze.lm)
    if mode in ("adapter", "copy"):
        with whole_model(core, accelerator):
            if mode == "adapter":
                return adapter_reference(core, freeze.projector == "train"), {"reference": mode}
            return copy_reference(core), {"reference": mode}
    if precompute_batches is None:
        raise ValueError("dpo.reference=cache needs the pairs to precompute (precompute_batches)")
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else None
    if device is not None:
        core.to(device)
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    with whole_model(core, accelerator):  # the hash and the log-probs need the whole weights
        model_hash = reference_hash(core)
        cache = ReferenceCache(Path(cfg.cache_dir) / model_hash, data_name, rank=rank)
        about = cache.dir / "reference.json"  # for people: which model these log-probs belong to
        if rank == 0 and not about.is_file():
            cache.dir.mkdir(parents=True, exist_ok=True)
            about.write_text(json.dumps({"reference_hash": model_hash, "lm": core.spec.get("lm"),
                                         "lineage": core.spec.get("lineage", [])}, indent=2, default=str))
        stats = cache.fill(core, precompute_batches(), autocast=autocast, device=device)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    cache.load()  # every rank's lines, so any rank can look up any pair
    log.info("reference cache %s: %s", cache.dir, stats)
    return cache, {"reference": mode, "cache_dir": str(cache.dir), "reference_hash": model_hash, **stats}

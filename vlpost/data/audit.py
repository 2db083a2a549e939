"""Pre-flight audit of a shard set: read every sample once and report what would break or skew training.

No model weights are loaded. Token counts come from the same `ChatEncoder` a stage uses (tokenizer +
tokens_per_image), so "truncated" and "dropped" mean exactly what training would do with the sample.
Without a tokenizer only the structural checks run (decode failures, duplicates, balance, refusals,
per-kind checks). `audit_commands.py` turns the report into audit.json / audit.md and an exit code.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from vlpost.data.chat import ChatEncoder, SampleError
from vlpost.data.shard_schema import MESSAGE_FIELDS, MISSING_IMAGE, PLACEHOLDER_MISMATCH
from vlpost.data.shards import ShardStream, read_index, verify_shards
from vlpost.eval.safety import is_refusal

REPORT_VERSION = 1
UNLIMITED = 1 << 40  # max_length of the measuring encoder: it never truncates
READER_LOGGER = "vlpost.data.shards"
PLACEHOLDER_REASONS = (PLACEHOLDER_MISMATCH, MISSING_IMAGE)  # reader skips that are placeholder problems
IMAGE_SPAN_CUT = "image span beyond max_length"
NO_LABELS_LEFT = "no labels left"

# name: (blocks training?, what it means). decode_failures blocks only above max_decode_failure_share.
CHECKS: dict[str, tuple[bool, str]] = {
    "decode_failures": (True, "samples the reader skips (bad JSON, undecodable image, missing member, ...)"),
    "placeholder_mismatches": (True, "<image> placeholders that do not match the sample's images"),
    "dropped": (True, "samples training drops: image span ends beyond max_length, or no labels left"),
    "empty_label_masks": (True, "no assistant token gets a label (template/tokenizer mismatch): loss 0"),
    "encode_errors": (True, "other samples the chat encoder rejects"),
    "invalid_rewards": (True, "prompt samples whose reward lacks a field its type needs"),
    "truncated": (False, "text cut at max_length (image spans are never cut)"),
    "identical_pairs": (False, "preference pairs with chosen == rejected: no learning signal"),
    "duplicate_samples": (False, "same text and same image (or both text-only) as an earlier sample"),
    "duplicate_images": (False, "same decoded pixels as an earlier sample"),
    "duplicate_texts": (False, "same conversation text as an earlier sample"),
    "skipped_at_prepare": (False, "records `vlpost prepare` left out (index.json 'skipped')"),
    "checksum_mismatches": (False, "shards whose sha256 differs from index.json (or missing)"),
}
# Fields (and their types) each reward type needs to score a completion (docs/INTERFACES.md).
REWARD_FIELDS: dict[str, dict[str, type]] = {
    "vqa": {"answers": list},
    "refusal": {"sensitive": bool, "category": str},
    "math": {"answer": str},
    "code": {"tests": str, "entry_point": str},
}
BALANCE_FIELDS = ("category", "question_type", "source", "split")


@dataclass
class AuditOptions:
    """What the audit measures against; the defaults match ChatEncoder's."""

    max_length: int = 2048
    limit: int | None = None  # read at most this many samples
    examples: int = 5  # example ids kept per problem
    max_decode_failure_share: float = 0.01  # decode failures above this share of samples block training
    buckets: int = 8  # histogram buckets up to max_length (+ one beyond)


@dataclass
class Problem:
    count: int = 0
    examples: list[str] = field(default_factory=list)
    by_reason: Counter = field(default_factory=Counter)

    def add(self, example: str, keep: int, reason: str | None = None, count: int = 1) -> None:
        self.count += count
        if reason is not None:
            self.by_reason[reason] += count
        if len(self.examples) < keep:
            self.examples.append(example)


def audit_shards(path: str | Path, tokenizer: Any = None, tokens_per_image: int | None = None,
                 options: AuditOptions | None = None) -> dict:
    """Read the shard set once and return the JSON-able report (see `Auditor.report`)."""
    options = options or AuditOptions()
    path = Path(path)
    index = read_index(path)
    auditor = Auditor(tokenizer, tokens_per_image, options)
    stream = ShardStream(path, shuffle=False)
    with _skip_examples(options.examples) as skip_examples:
        for sample, image in islice(stream, options.limit):
            auditor.add(sample, image)
    checksums = [] if options.limit is not None else verify_shards(path)  # a full re-read: skipped with --limit
    return auditor.report(path, index, stream.stats, skip_examples, checksums)


@contextmanager
def _skip_examples(keep: int) -> Iterator[dict[str, list[str]]]:
    """Collect `shard/key` of samples the reader skips, by reason, from its one-line-per-skip log."""
    examples: dict[str, list[str]] = defaultdict(list)

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            args = record.args if isinstance(record.args, tuple) else ()
            if len(args) == 5:  # ("skipped sample %s in %s/%s: %s (%s)", key, root, shard, reason, detail)
                key, _root, shard, reason, _detail = args
                if len(examples[str(reason)]) < keep:
                    examples[str(reason)].append(f"{shard}/{key}")

    logger = logging.getLogger(READER_LOGGER)
    handler, propagate, level = Recorder(logging.WARNING), logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False  # the report lists them; no log line per bad sample on the console
    logger.setLevel(logging.WARNING)  # even when the root logger is quieter
    try:
        yield examples
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)


class Auditor:
    """Accumulates every check over a stream of (sample, image); `report()` gives the result."""

    def __init__(self, tokenizer: Any, tokens_per_image: int | None, options: AuditOptions) -> None:
        self.options = options
        self.encoder = self.full_encoder = None
        if tokenizer is not None:
            if tokens_per_image is None:
                raise ValueError("a tokenizer needs tokens_per_image (from the run dir or --tokens-per-image)")
            self.encoder = ChatEncoder(tokenizer, tokens_per_image, max_length=options.max_length)
            self.full_encoder = ChatEncoder(tokenizer, tokens_per_image, max_length=UNLIMITED)
        self.tokens_per_image = tokens_per_image
        self.problems = {name: Problem() for name in CHECKS}
        self.balance: dict[str, Counter] = defaultdict(Counter)
        self.lengths, self.image_tokens = array("q"), array("q")  # one entry per encoded sequence
        self.first_image: dict[int, str] = {}
        self.first_text: dict[int, str] = {}
        self.first_sample: dict[int, str] = {}
        self.refusals: dict[str, Counter] = defaultdict(Counter)
        self.refusal_examples: list[str] = []
        self.read = 0

    # ------------------------------------------------------------------ per sample

    def add(self, sample: dict, image: Any) -> None:
        """Run every check on one decoded sample."""
        self.read += 1
        sample_id = str(sample["meta"]["id"])
        num_images = int(image is not None)
        self._count_balance(sample, num_images)
        self._check_duplicates(sample, image, sample_id)
        self._count_refusals(sample, sample_id)
        if sample["kind"] == "preference" and _canonical(sample["chosen"]) == _canonical(sample["rejected"]):
            self._problem("identical_pairs", sample_id)
        if sample["kind"] == "prompt":
            reason = reward_problem(sample["reward"])
            if reason:
                self._problem("invalid_rewards", sample_id, reason)
        if self.encoder is not None:
            self._check_tokens(sample, sample_id, num_images)

    def _problem(self, name: str, example: str, reason: str | None = None) -> None:
        self.problems[name].add(example, self.options.examples, reason)

    def _count_balance(self, sample: dict, num_images: int) -> None:
        meta = sample.get("meta") or {}
        self.balance["kind"][sample["kind"]] += 1
        self.balance["image"]["with image" if num_images else "text-only"] += 1
        for name in BALANCE_FIELDS:
            value = meta.get(name)
            self.balance[name]["(none)" if value is None else str(value)] += 1
        if sample["kind"] == "prompt":
            self.balance["reward_type"][str(sample["reward"]["type"])] += 1

    def _check_duplicates(self, sample: dict, image: Any, sample_id: str) -> None:
        text_hash = _hash(_canonical_text(sample).encode("utf-8"))
        self._seen(self.first_text, text_hash, "duplicate_texts", sample_id)
        if image is not None:
            image_hash = _hash(f"{image.mode}{image.size}".encode(), image.tobytes())
            self._seen(self.first_image, image_hash, "duplicate_images", sample_id)
            text_hash = _hash(text_hash.to_bytes(8, "little"), image_hash.to_bytes(8, "little"))
        self._seen(self.first_sample, text_hash, "duplicate_samples", sample_id)

    def _seen(self, first: dict[int, str], digest: int, name: str, sample_id: str) -> None:
        if digest in first:
            self._problem(name, f"{sample_id} = {first[digest]}")
        else:
            first[digest] = sample_id

    def _count_refusals(self, sample: dict, sample_id: str) -> None:
        kind = sample["kind"]
        if kind in ("sft", "caption"):
            tally, category = self.refusals["sft"], str((sample.get("meta") or {}).get("category") or "(none)")
            refused = 0
            for message in sample["messages"]:
                if message["role"] == "assistant":
                    flagged = is_refusal(message["content"])
                    tally["turns"] += 1
                    tally[f"turns/{category}"] += 1
                    tally["refusals"] += flagged
                    tally[f"refusals/{category}"] += flagged
                    refused += flagged
            tally["samples_with_refusal"] += refused > 0
            if refused and len(self.refusal_examples) < self.options.examples:
                self.refusal_examples.append(sample_id)
        elif kind == "preference":
            tally = self.refusals["preference"]
            tally["pairs"] += 1
            for side in ("chosen", "rejected"):
                tally[side] += any(is_refusal(m["content"]) for m in sample[side] if m["role"] == "assistant")

    def _check_tokens(self, sample: dict, sample_id: str, num_images: int) -> None:
        try:
            full = _encode(self.full_encoder, sample, sample_id, num_images)
        except SampleError as err:
            name = {"empty assistant mask": "empty_label_masks", PLACEHOLDER_MISMATCH: "placeholder_mismatches"}
            self._problem(name.get(err.reason, "encode_errors"), sample_id, err.reason)
            return
        except ValueError as err:  # template-level inconsistencies chat.py raises as plain ValueError
            self._problem("encode_errors", f"{sample_id} ({err})", "template error")
            return
        image_tokens = num_images * self.tokens_per_image
        for ids in full:
            self.lengths.append(len(ids))
            self.image_tokens.append(image_tokens)
        if max(len(ids) for ids in full) <= self.options.max_length:
            return
        try:
            _encode(self.encoder, sample, sample_id, num_images)
            self._problem("truncated", sample_id)
        except SampleError:  # "too long": tell which of the two ways it cannot fit
            image_end = max(_last_image_end(ids, self.encoder.image_token_id) for ids in full)
            reason = IMAGE_SPAN_CUT if image_end > self.options.max_length else NO_LABELS_LEFT
            self._problem("dropped", sample_id, reason)

    # ------------------------------------------------------------------ report

    def report(self, path: Path, index: dict, reader_stats: dict, skip_examples: dict[str, list[str]],
               checksum_problems: list[str]) -> dict:
        """The whole audit as a JSON-able dict; `blocking` lists the checks that should stop training."""
        self._fold_reader_skips(reader_stats["skipped"], skip_examples)
        self._fold_index(index, checksum_problems)
        attempted = self.read + sum(reader_stats["skipped"].values())
        decode_share = self.problems["decode_failures"].count / max(attempted, 1)
        problems = {}
        for name, (blocks, what) in CHECKS.items():
            problem = self.problems[name]
            if name == "decode_failures":
                blocks = decode_share > self.options.max_decode_failure_share
            entry = {"count": problem.count, "blocking": bool(blocks and problem.count), "what": what,
                     "examples": problem.examples}
            if problem.by_reason:
                entry["by_reason"] = dict(problem.by_reason.most_common())
            problems[name] = entry
        blocking = [name for name, entry in problems.items() if entry["blocking"]]
        return {
            "version": REPORT_VERSION,
            "shards": str(path),
            "kind": index.get("kind"),
            "mode": "tokens" if self.encoder is not None else "structural",
            "settings": {"tokens_per_image": self.tokens_per_image, "max_length": self.options.max_length,
                         "limit": self.options.limit, "max_decode_failure_share": self.options.max_decode_failure_share},
            "samples": {"listed": index.get("num_samples"), "read": self.read, "attempted": attempted,
                        "decode_failure_share": round(decode_share, 6)},
            "reader_skipped_by_reason": reader_stats["skipped"],
            "problems": problems,
            "blocking": blocking,
            "ok": not blocking,
            "token_lengths": self._token_lengths() if self.encoder is not None else None,
            "balance": {name: dict(counts.most_common()) for name, counts in self.balance.items()
                        if set(counts) != {"(none)"}},
            "refusals": self._refusal_report(),
        }

    def _fold_reader_skips(self, skipped: dict[str, int], examples: dict[str, list[str]]) -> None:
        for reason, count in skipped.items():
            name = "placeholder_mismatches" if reason in PLACEHOLDER_REASONS else "decode_failures"
            problem = self.problems[name]
            problem.count += count
            problem.by_reason[reason] += count
            problem.examples.extend(examples.get(reason, [])[: self.options.examples - len(problem.examples)])

    def _fold_index(self, index: dict, checksum_problems: list[str]) -> None:
        for item in index.get("skipped") or []:
            self._problem("skipped_at_prepare", str(item.get("id")), str(item.get("reason")))
        for line in checksum_problems:
            self._problem("checksum_mismatches", line)

    def _token_lengths(self) -> dict:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        max_length = self.options.max_length
        summary = {"unit": "sequence (preference: chosen and rejected each; prompt: the prompt)",
                   "sequences": int(lengths.size), "max_length": max_length,
                   "over_max_length": int((lengths > max_length).sum()),
                   "buckets": length_histogram(lengths, max_length, self.options.buckets)}
        if lengths.size:
            image = np.asarray(self.image_tokens, dtype=np.int64)
            summary.update({
                "mean": round(float(lengths.mean()), 2), "p50": float(np.percentile(lengths, 50)),
                "p95": float(np.percentile(lengths, 95)), "p99": float(np.percentile(lengths, 99)),
                "max": int(lengths.max()), "image_tokens_mean": round(float(image.mean()), 2),
                "text_tokens_mean": round(float((lengths - image).mean()), 2),
            })  # fmt: skip
        return summary

    def _refusal_report(self) -> dict:
        out: dict[str, Any] = {}
        sft = self.refusals.get("sft")
        if sft and sft["turns"]:
            categories = sorted(key.split("/", 1)[1] for key in sft if key.startswith("turns/"))
            out["sft"] = {
                "assistant_turns": sft["turns"], "refusal_turns": sft["refusals"],
                "share": round(sft["refusals"] / sft["turns"], 6), "samples_with_refusal": sft["samples_with_refusal"],
                "by_category": {c: {"turns": sft[f"turns/{c}"], "refusals": sft[f"refusals/{c}"]} for c in categories},
                "examples": self.refusal_examples,
            }  # fmt: skip
        pref = self.refusals.get("preference")
        if pref and pref["pairs"]:
            out["preference"] = {"pairs": pref["pairs"], "chosen_refusals": pref["chosen"],
                                 "rejected_refusals": pref["rejected"]}  # fmt: skip
        return out


# ---------------------------------------------------------------------- pure helpers


def reward_problem(reward: dict) -> str | None:
    """Why a prompt's reward cannot score a completion (a short stable reason), or None when it can."""
    kind = reward.get("type")
    needed = dict(REWARD_FIELDS.get(kind, {}))
    if kind == "refusal" and reward.get("sensitive") is False:
        needed["answers"] = list  # a benign look-alike is scored against accepted answers
    for name, wanted in needed.items():
        value = reward.get(name)
        if not isinstance(value, wanted) or (wanted in (str, list) and not value):
            return f"{kind} reward without {name}"
        if wanted is list and not all(isinstance(answer, str) and answer.strip() for answer in value):
            return f"{kind} reward with a non-text {name} entry"
    return None


def length_histogram(lengths: np.ndarray, max_length: int, buckets: int = 8) -> list[dict]:
    """Counts in `buckets` equal ranges (lo, hi] up to max_length, plus one bucket beyond it (hi None)."""
    edges = np.array([round(i * max_length / buckets) for i in range(buckets + 1)])
    slots = np.clip(np.searchsorted(edges, np.asarray(lengths), side="left") - 1, 0, buckets)
    counts = np.bincount(slots, minlength=buckets + 1)
    out = [{"min": int(edges[i]) + 1, "max": int(edges[i + 1]), "count": int(counts[i])} for i in range(buckets)]
    out.append({"min": max_length + 1, "max": None, "count": int(counts[buckets])})
    return out


def _encode(encoder: ChatEncoder, sample: dict, sample_id: str, num_images: int) -> list[list[int]]:
    """Token ids of each sequence a stage builds from the sample (raises chat.SampleError)."""
    kind = sample["kind"]
    if kind in ("caption", "sft"):
        return [encoder.encode(sample["messages"], sample_id=sample_id, num_images=num_images).input_ids]
    if kind == "preference":
        return [encoder.encode_pair(sample["prompt"], sample[side], sample_id=sample_id,
                                    num_images=num_images).input_ids for side in ("chosen", "rejected")]  # fmt: skip
    return [encoder.encode_prompt(sample["prompt"], sample_id=sample_id, num_images=num_images)]


def _last_image_end(ids: list[int], image_token_id: int) -> int:
    """Position just after the last image token (0 when there is none)."""
    for position in range(len(ids) - 1, -1, -1):
        if ids[position] == image_token_id:
            return position + 1
    return 0


def _canonical(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["role"], " ".join(m["content"].split())) for m in messages]


def _canonical_text(sample: dict) -> str:
    """Every message field, whitespace collapsed: two samples with this equal say the same thing."""
    return "\n".join(f"{name}|{role}|{content}" for name in MESSAGE_FIELDS
                     for role, content in _canonical(sample.get(name) or []))  # fmt: skip


def _hash(*parts: bytes) -> int:
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(part)
    return int.from_bytes(digest.digest(), "little")

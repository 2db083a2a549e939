"""Running the model outside the training step under DeepSpeed ZeRO-3 (DPO's reference pass, GRPO's rollouts).

Under ZeRO-3 each rank holds a slice of every parameter: transformers builds the LM partitioned
(`deepspeed.zero.Init`) as soon as accelerate's DeepSpeed plugin is active, and `deepspeed.initialize` partitions
the rest. A forward outside the engine then sees empty weights (before `accelerator.prepare`: no hooks gather
them; after it: open_clip reads the class / positional embeddings outside any submodule's forward, which ZeRO-3
only catches inside the engine's forward), and with the hooks every forward is a collective, so ranks that run a
different number of forwards (their own prompts finish early, an eval on rank 0 only, a cache with other hits)
hang. `whole_model(model, accelerator)` is the one way such passes run: entered on every rank (one all-gather in,
a re-partition out), the model holds whole parameters and the engine's fetch / release / trace hooks are off,
so each rank runs whatever its own data needs with no collective inside (HF generate with `synced_gpus=False`).
Before `prepare` it also gives every rank rank 0's unpartitioned modules (`broadcast_unpartitioned`).
The cost is the whole model in each rank's memory while inside, as TRL's `ds3_gather_for_generation` does.
Everything here is a no-op without ZeRO-3 (one process, DDP, ZeRO-1/2).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from vlpost.train.checkpointing import zero3


def _engine(accelerator):
    """The DeepSpeed engine once `accelerator.prepare` made one, else None."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return getattr(wrapped, "engine", None)


def _parameter_offload(engine):
    """The object that owns ZeRO-3's module hooks (DeepSpeedZeRoOffload), or None before prepare."""
    optimizer = getattr(engine, "optimizer", None) if engine is not None else None
    if optimizer is None:
        return None
    return getattr(optimizer, "parameter_offload", optimizer)


@contextmanager
def _hooks_off(offload):
    """Remove the engine's per-module fetch / release hooks and its start-of-forward (trace) hook, then restore.

    Like deepspeed.runtime.zero.stage3.unwrap_model_for_generation, plus the top module's start-of-forward hook:
    it checks the recorded module order against the other ranks (a collective) whenever the trace is not
    complete, and a rank-local forward of the top module (DPO's pair eval, GRPO's old log-probs) would fire it.
    """
    module = offload.module
    start_hook = module._forward_pre_hooks.get(offload.fwd_pre_hook.id)
    for handle in [*offload.forward_hooks, *offload.backward_hooks, offload.fwd_pre_hook]:
        handle.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    for param in module.parameters():
        if hasattr(param, "ds_active_sub_modules"):
            param.ds_active_sub_modules.clear()
    try:
        yield
    finally:
        if start_hook is not None:
            offload.fwd_pre_hook = module.register_forward_pre_hook(start_hook, prepend=True)
        offload._register_deepspeed_module(module)  # also invalidates the recorded trace (re-recorded next step)


@contextmanager
def whole_model(model, accelerator):
    """Context entered on EVERY rank: under ZeRO-3 `model` (wrapped or not) has whole parameters and no engine
    hooks inside it, so rank-local inference (generation, reference / eval log-probs) runs without collectives.

    Outside ZeRO-3 (or with `accelerator` None) it does nothing. Parameters are read-only inside: they are
    re-partitioned on exit without writing changes back.
    """
    if accelerator is None or not zero3(accelerator):
        yield
        return
    import deepspeed

    core = getattr(model, "module", model)
    offload = _parameter_offload(_engine(accelerator))
    if offload is None:  # before prepare: the LM is partitioned (zero.Init), the rest is per rank, no hooks yet
        broadcast_unpartitioned(core, accelerator)
    with deepspeed.zero.GatheredParameters(list(core.parameters()), modifier_rank=None):
        if offload is None:
            yield
        else:
            with _hooks_off(offload):
                yield


def broadcast_unpartitioned(core, accelerator) -> None:
    """Give every rank rank 0's values of the parameters not yet partitioned (projector, tower), as
    deepspeed.initialize will when it partitions them.

    Before `prepare` they are per-rank copies, and they differ after a random init: transformers initialises the
    zero.Init LM on rank 0 only, so the ranks' RNG streams part and every module built after the LM (the
    projector) gets other weights on each rank — a reference pass there would hash and score other models.
    """
    import torch.distributed as dist

    if accelerator.num_processes == 1:
        return
    for param in core.parameters():
        if hasattr(param, "ds_id"):
            continue
        data = param.data.to(accelerator.device)  # NCCL broadcasts device tensors only
        dist.broadcast(data, src=0)
        if data is not param.data:
            param.data.copy_(data)


def is_partitioned(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose data is (currently) only this rank's slice."""
    return hasattr(param, "ds_id") and param.data.numel() != param.ds_numel


def plain_copy(module: torch.nn.Module, memo: dict | None = None) -> torch.nn.Module:
    """A deep copy whose parameters are ordinary tensors, also when `module` holds ZeRO-3 parameters (then call
    it inside `whole_model`): a frozen reference model that no DeepSpeed engine manages. `memo` as in deepcopy
    (e.g. modules to share instead of copy). Outside ZeRO-3 this is copy.deepcopy."""
    memo = dict(memo or {})
    shared = {id(p) for m in memo.values() if isinstance(m, torch.nn.Module) for p in m.parameters()}
    for name, param in module.named_parameters():
        if not hasattr(param, "ds_id") or id(param) in memo or id(param) in shared:
            continue
        if is_partitioned(param):
            raise RuntimeError(f"{name} is a ZeRO-3 partition; copy the model inside vlpost.train.zero.whole_model")
        memo[id(param)] = torch.nn.Parameter(param.data.detach().clone(), requires_grad=param.requires_grad)
    return copy.deepcopy(module, memo)


def mark_frozen_tower_leaf(model) -> None:
    """Under ZeRO-3: fetch the (frozen) vision tower whole when it runs instead of block by block.

    open_clip's VisionTransformer reads `class_embedding` / `positional_embedding` directly in
    `forward_intermediates`, which ZeRO-3 gathers only inside the engine's forward; DPO runs the tower once per
    pair batch outside it (its features are shared by policy and reference). As one leaf, the tower's
    pre-forward hook gathers all its parameters wherever it is called. Call before `accelerator.prepare`.
    """
    from deepspeed.utils import set_z3_leaf_modules

    vision = getattr(model, "vision", None)
    if vision is not None:
        set_z3_leaf_modules(model, [type(vision)])

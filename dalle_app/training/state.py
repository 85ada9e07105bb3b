"""One resumable training checkpoint: models, optimizers, step, phase, loss history and RNG states.

The checkpoint is a folder holding `state.pt`, or `state-00.pt`, `state-01.pt`, ... when it is saved in shards of
at most `shard_mib` MiB (files that must travel through size-limited channels). Optimizer moments are stored in
bfloat16 to halve the size; everything loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    """Python, NumPy and torch (CPU, CUDA) random states."""
    state = {"python": random.getstate(), "numpy_keys": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (the CUDA state only where CUDA exists)."""
    random.setstate(tuple(tuple(s) if isinstance(s, list) else s for s in state["python"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _flatten(tree: dict) -> tuple[dict, dict]:
    """Split a checkpoint tree into tensors {path: tensor} and a tensor-free skeleton."""
    tensors = {}

    def walk(node, path):
        if torch.is_tensor(node):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {k: walk(v, f"{path}/{k}") for k, v in node.items()}
        return node

    return tensors, walk(tree, "")


def _unflatten(node, tensors):
    if isinstance(node, dict):
        if set(node) == {"__tensor__"}:
            return tensors[node["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in node.items()}
    return node


def compact_optimizer(opt_state: dict) -> dict:
    """Optimizer state_dict with float32 moments stored as bfloat16 (step counters kept as they are)."""
    state = {str(k): {n: (t.to(torch.bfloat16) if torch.is_tensor(t) and t.dim() > 0 else t)
                      for n, t in v.items()} for k, v in opt_state["state"].items()}
    return {"state": state, "param_groups": opt_state["param_groups"]}


def expand_optimizer(opt_state: dict) -> dict:
    """Inverse of `compact_optimizer` (moments back to float32; the optimizer casts to the parameters' device)."""
    state = {int(k): {n: (t.float() if torch.is_tensor(t) and t.dim() > 0 else t) for n, t in v.items()}
             for k, v in opt_state["state"].items()}
    return {"state": state, "param_groups": opt_state["param_groups"]}


def save_state(tree: dict, folder: str | Path, shard_mib: float | None = None) -> list[Path]:
    """Write the checkpoint tree atomically into `folder` (one file, or shards of <= shard_mib MiB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, skeleton = _flatten(tree)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    groups: list[dict] = [{}]
    if shard_mib:
        limit, size = shard_mib * 2 ** 20, 0
        for k, v in tensors.items():
            n = v.numel() * v.element_size()
            if groups[-1] and size + n > limit:
                groups.append({})
                size = 0
            groups[-1][k] = v
            size += n
    else:
        groups[0] = tensors
    names = ["state.pt"] if len(groups) == 1 else [f"state-{i:02d}.pt" for i in range(len(groups))]
    for old in list(folder.glob("state*.pt")):
        old.unlink()
    paths = []
    for i, (name, group) in enumerate(zip(names, groups)):
        payload = {"tensors": group, "num_shards": len(groups)}
        if i == 0:
            payload["skeleton"] = skeleton
        tmp = folder / (name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(folder / name)
        paths.append(folder / name)
    return paths


def load_state(folder: str | Path) -> dict | None:
    """Read a checkpoint folder written by `save_state`; None when it holds none."""
    folder = Path(folder)
    files = sorted(folder.glob("state*.pt"))
    if not files:
        return None
    tensors, skeleton, num_shards = {}, None, None
    for f in files:
        payload = torch.load(f, map_location="cpu", weights_only=True)
        tensors.update(payload["tensors"])
        num_shards = payload["num_shards"]
        skeleton = payload.get("skeleton", skeleton)
    if skeleton is None or num_shards != len(files):
        raise ValueError(f"The checkpoint in {folder} is incomplete ({len(files)} of {num_shards} files); "
                         "copy all of its state*.pt files.")
    return _unflatten(skeleton, tensors)

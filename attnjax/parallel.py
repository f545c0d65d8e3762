"""Meshes, sharded parameters and the reductions a corpus profile needs across hosts.

Everything goes through jax.sharding: a batch is placed with NamedSharding over the
mesh's ``"data"`` axis and the jitted step lets XLA (GSPMD) partition the work; no pmap.

Parameters are replicated by default. With a ``"model"`` axis in the mesh they can be
split Megatron-style instead (Shoeybi et al. 2019): the query / key / value and MLP
up-projections are column-parallel (their output features, i.e. heads and MLP width,
are split over ``"model"``), the attention output and MLP down-projections are
row-parallel (their input features are split), and everything else (embeddings, norms,
the pooler, the LM head) is replicated. A weight whose split axis does not divide by
the model axis stays replicated. Sharding only changes where the numbers live: XLA
inserts the collectives, so results equal the replicated ones to float32 rounding.

Multi-host (after ``jax.distributed.initialize()``): each process computes on its own
devices (the mesh's ``local_mesh``) over its share of the corpus, and the sums are
summed across processes with ``allgather_sum``; every process then holds the same totals.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

# (module name, parameter) pairs by how Megatron splits them. The module name is the
# flax scope right above the kernel: "query" in BERT, "q_proj" in Llama, ...
COLUMN_PARALLEL = frozenset({
    "query", "key", "value",                       # BERT attention.self
    "c_attn", "c_fc",                              # GPT-2 attn / mlp
    "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",  # Llama-like
})
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})  # Llama-like; BERT / GPT-2 by path below


def data_mesh(devices: Optional[Sequence[jax.Device]] = None, *, model: int = 1) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: every device of every process).

    model: how many devices share one copy of the parameters (1: replicated params,
    pure data parallelism). The number of devices must divide by it.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"model={model} must be a positive divisor of the {len(devices)} devices.")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model, model)  # (data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def check_mesh(mesh) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. attnjax.data_mesh()); got {type(mesh).__name__}.")
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh has axes {mesh.axis_names}; it needs a {DATA_AXIS!r} axis to shard the batch "
                         f"over (e.g. Mesh(devices, ('data',)) or attnjax.data_mesh()).")
    unknown = set(mesh.axis_names) - {DATA_AXIS, MODEL_AXIS}
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not used by attnjax; name them "
                         f"{DATA_AXIS!r} and (optionally) {MODEL_AXIS!r}.")
    return mesh


def local_mesh(mesh: Mesh) -> Mesh:
    """The part of ``mesh`` on this process's devices (the whole mesh with one process)."""
    return mesh if jax.process_count() == 1 else mesh.local_mesh


def data_size(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else int(mesh.shape[DATA_AXIS])


def _path_names(path) -> tuple:
    return tuple(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)


def param_spec(path_names: tuple, shape: tuple, model_size: int) -> PartitionSpec:
    """Megatron PartitionSpec of one parameter (module docstring); P() replicates."""
    if model_size == 1 or len(path_names) < 2:
        return PartitionSpec()
    module, leaf = path_names[-2], path_names[-1]
    parents = path_names[:-2]
    row = module in ROW_PARALLEL or (module == "c_proj") or (
        module == "dense" and parents and parents[-1] == "output")  # BERT attention.output / output
    column = module in COLUMN_PARALLEL or (module == "dense" and parents and parents[-1] == "intermediate")
    if column:
        axis = len(shape) - 1  # kernel (in, out) and bias (out,): split the output features
    elif row and leaf == "kernel":
        axis = 0  # split the input features; the bias is added after the reduction: replicated
    else:
        return PartitionSpec()
    if shape[axis] % model_size:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[axis] = MODEL_AXIS
    return PartitionSpec(*spec)


def place_params(params, mesh: Mesh):
    """``params`` on ``mesh``: replicated, or Megatron-split over its "model" axis if it has one."""
    mesh = local_mesh(check_mesh(mesh))
    model_size = int(mesh.shape[MODEL_AXIS]) if MODEL_AXIS in mesh.axis_names else 1

    def place(path, leaf):
        spec = param_spec(_path_names(path), tuple(np.shape(leaf)), model_size)
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, params)


def params_on(params, mesh: Mesh) -> bool:
    """True when every parameter already lives on ``mesh`` (e.g. loaded with attnjax.load(mesh=...))."""
    target = local_mesh(mesh)
    for leaf in jax.tree_util.tree_leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding) or sharding.mesh != target:
            return False
    return True


def put_batch(arrays: Dict[str, np.ndarray], mesh: Optional[Mesh]) -> Dict[str, jax.Array]:
    """Host arrays with a leading batch axis -> device arrays split over the "data" axis."""
    if mesh is None:
        return {name: jax.device_put(value) for name, value in arrays.items()}
    mesh = local_mesh(mesh)
    return {name: jax.device_put(value, NamedSharding(mesh, PartitionSpec(DATA_AXIS)))
            for name, value in arrays.items()}


def allgather_sum(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Sum float64 / int64 host arrays over all processes (identity with one process).

    The arrays travel as their raw bytes (viewed as int32, so no float64 -> float32
    cast without jax_enable_x64), then each process sums the gathered copies in float64
    in process order: every process gets bit-identical totals."""
    if jax.process_count() == 1:
        return arrays
    from jax.experimental import multihost_utils

    names = sorted(arrays)
    flat = np.concatenate([np.ascontiguousarray(arrays[name], np.float64).ravel() for name in names])  # (N,)
    gathered = multihost_utils.process_allgather(flat.view(np.int32))  # (P, 2N) int32
    total = np.ascontiguousarray(gathered).view(np.float64).sum(0)  # (N,)
    out, start = {}, 0
    for name in names:
        size = int(np.size(arrays[name]))
        out[name] = total[start:start + size].reshape(np.shape(arrays[name]))
        start += size
    return out


def allgather_ints(values: np.ndarray) -> np.ndarray:
    """Concatenate a 1-D int64 array of any length from every process, in process order."""
    values = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([values.size], np.int32))).ravel()
    padded = np.zeros(int(lengths.max()) if lengths.size else 0, np.int64)
    padded[:values.size] = values
    if padded.size == 0:
        return values
    gathered = np.ascontiguousarray(multihost_utils.process_allgather(padded.view(np.int32)))  # (P, 2M)
    rows = gathered.reshape(len(lengths), -1).view(np.int64)  # (P, M)
    return np.concatenate([row[:n] for row, n in zip(rows, lengths)])

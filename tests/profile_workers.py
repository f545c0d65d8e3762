"""Subprocess bodies for tests/test_profile.py: each needs its own JAX start-up
(fake CPU devices, or jax.distributed), so it runs as ``python tests/profile_workers.py``.

    sharded MODEL OUT          4 fake devices: one device, a 4-way data mesh, and a 2x2
                               (data, model) mesh with Megatron-split params must agree;
                               writes the one-device frame to OUT (csv)
    process RANK PORT MODEL OUT   one of two jax.distributed processes (gloo CPU
                               collectives) over the same corpus; writes its frame to OUT
"""

from __future__ import annotations

import os
import sys

# Short texts (at most 16 tokens with [CLS] / [SEP]: one length bucket, one compile per
# mesh), with an empty text and an emoji-only one (only special tokens) to be skipped.
# Text 1 has 16 tokens and text 9 has 14: the only ones long enough for the jump (16) /
# concentrated (12) scores (attnjax.analysis.anomalies), which leave the others out.
CORPUS = [
    "The cat sat on the mat.", "It was warm, and the old dog slept by the front door.", "",
    "Heads look at the [SEP] token a lot.", "A B C D A B C D.", "\U0001F600",
    "Induction heads copy what came next.", "Short.", "One more, with a comma.",
    "The end of the corpus is near, so we stop.", "Heads look at the previous token.", "Last one.",
]


def assert_same(a, b, what: str) -> None:
    import numpy as np

    floats = [c for c in a.columns if a[c].dtype.kind == "f"]
    # float32 rounding: the device sums differ only in reduction order across shards
    np.testing.assert_allclose(a[floats].to_numpy(), b[floats].to_numpy(), rtol=2e-5, atol=2e-6,
                               err_msg=what)
    for column in ("category", "concentrated_on", "n_texts", "n_tokens", "n_queries"):
        assert (a[column] == b[column]).all(), (what, column)
    assert a.attrs["skipped"] == b.attrs["skipped"], what


def sharded(model_path: str, out: str) -> None:
    import jax
    import numpy as np

    import attnjax
    from attnjax.parallel import DATA_AXIS, MODEL_AXIS

    assert jax.device_count() == 4, jax.devices()
    model = attnjax.load(model_path)
    single = attnjax.profile(model, CORPUS, batch_size=4, progress=False)
    data = attnjax.profile(model, iter(CORPUS), batch_size=4, progress=False, mesh=attnjax.data_mesh())
    assert_same(single, data, "data mesh")
    mesh = attnjax.data_mesh(model=2)
    split = attnjax.load(model_path, mesh=mesh)
    query = split.params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
    assert query.sharding.spec == jax.sharding.PartitionSpec(None, MODEL_AXIS), query.sharding
    assert len({shard.device for shard in query.addressable_shards}) == 4
    assert query.addressable_shards[0].data.shape[1] == query.shape[1] // 2
    both = attnjax.profile(split, CORPUS, batch_size=4, progress=False, mesh=mesh)
    assert_same(single, both, "2x2 (data, model) mesh")
    assert mesh.axis_names == (DATA_AXIS, MODEL_AXIS) and np.isfinite(single["entropy"]).all()
    single.to_csv(out, index=False)
    print("sharded ok")


def process(rank: int, port: int, model_path: str, out: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=rank)
    import attnjax

    model = attnjax.load(model_path)
    taken = []

    def texts():  # every process reads the whole stream and keeps its half
        for index, text in enumerate(CORPUS):
            taken.append(index)
            yield text

    frame = attnjax.profile(model, texts(), batch_size=2, progress=False, mesh=attnjax.data_mesh())
    frame.to_csv(out, index=False)
    import json

    with open(out + ".skipped.json", "w") as handle:
        json.dump(frame.attrs["skipped"], handle)
    print(f"process {rank} ok")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "sharded":
        sharded(sys.argv[2], sys.argv[3])
    else:
        process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])

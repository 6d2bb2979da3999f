"""Runtime: control block layout, command queues, checkpoint mapping and restore checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import REPO
from rkckpt import container
from rkckpt.delta import apply_delta
from rkckpt.model import ChunkType
from rkckpt.siphash import region_id
from rkkernel.control import CONTROL_BLOCK_DTYPE, MESSAGE_DTYPE, Command, Reply
from rkkernel.runtime import FINGERPRINT_KEY, PersistentKernel, RestoreMismatch
from rkkernel.spec import CONTROL, KERNELS_DIR, KernelSpec, Launch, RegionSpec
from rkkernel.wavesim import WaveParams, current_field, make_spec

P = WaveParams(20, 18, 22)


def wave(kernel_backend: str = "numpy", params: WaveParams = P) -> PersistentKernel:
    return PersistentKernel(make_spec(params), kernel_backend)


def inject(k: PersistentKernel, step: int, region: str, index: int, value: float) -> None:
    """Queue a command adding ``value`` to cell ``index`` (flat) of float32 ``region`` at ``step``'s boundary."""
    slot = [r.name for r in k.spec.regions].index(region)
    bits = int(np.array([value], dtype="<f4").view("<u4")[0])
    k.send(Command.INJECT, step, arg=slot, a=index, b=bits)


def fields(k: PersistentKernel) -> bytes:
    return current_field({n: k.region(n) for n in ("pressure_a", "pressure_b")}, k.step).tobytes()


def test_control_block_layout_matches_device(opencl_backend: str) -> None:
    """The C struct the device uses has exactly the numpy dtype's offsets (asked from the compiler)."""
    import pyopencl as cl

    names = [n for n in CONTROL_BLOCK_DTYPE.names if n != "_reserved"]
    body = "\n".join(f"out[{i}] = (uint)offsetof(rk_control, {n});" for i, n in enumerate(names))
    src = (
        (KERNELS_DIR / "rk_runtime_cl.h").read_text()
        + f"""
    #define offsetof(t, m) ((size_t)&(((t *)0)->m))
    __kernel void layout(__global uint *out) {{ {body}
      out[{len(names)}] = (uint)sizeof(rk_control); out[{len(names) + 1}] = (uint)sizeof(rk_message); }}"""
    )
    ctx = cl.create_some_context(interactive=False)
    q = cl.CommandQueue(ctx)
    prg = cl.Program(ctx, src).build()
    out = np.zeros(len(names) + 2, np.uint32)
    buf = cl.Buffer(ctx, cl.mem_flags.WRITE_ONLY, out.nbytes)
    cl.Kernel(prg, "layout")(q, (1,), None, buf)
    cl.enqueue_copy(q, out, buf)
    assert out[-2] == 128 and out[-1] == MESSAGE_DTYPE.itemsize == 32
    assert list(out[:-2]) == [CONTROL_BLOCK_DTYPE.fields[n][1] for n in names]


def test_snapshot_command_pauses_at_its_step(kernel_backend: str) -> None:
    k = wave(kernel_backend)
    seen = []
    k.on_event = lambda ev, kern: seen.append((ev.kind, ev.step, ev.a, kern.step, fields(kern)))
    k.send(Command.SNAPSHOT, 5, a=77)
    k.send(Command.SNAPSHOT, 9, a=78)
    events = k.run(12)
    assert [(e.kind, e.step, e.a) for e in events] == [(Reply.SNAPSHOT_READY, 5, 77), (Reply.SNAPSHOT_READY, 9, 78)]
    assert [(s[0], s[1], s[2], s[3]) for s in seen] == [(Reply.SNAPSHOT_READY, 5, 77, 5), (Reply.SNAPSHOT_READY, 9, 78, 9)]
    assert k.step == 12
    # the state seen at the pause is the state of that step
    ref = wave("numpy")
    ref.run(5)
    assert seen[0][4] == fields(ref)
    cb = k.control()[0]
    assert cb["messages_processed"] == 2 and cb["input_head"] == cb["input_tail"] == 2 and cb["output_tail"] == 2


def test_terminate_command(kernel_backend: str) -> None:
    k = wave(kernel_backend)
    k.send(Command.TERMINATE, 7)
    events = k.run(20)
    assert [e.kind for e in events] == [Reply.TERMINATED]
    assert k.step == 7 and k.terminated
    cb = k.control()[0]
    assert cb["should_terminate"] == 1 and cb["has_terminated"] == 1 and cb["is_active"] == 0
    assert k.run(5) == [] and k.step == 7


def test_inject_is_identical_on_backends(opencl_backend: str) -> None:
    out = []
    for be in ("numpy", opencl_backend):
        k = wave(be)
        idx = 5 + 6 * 20 + 7 * 20 * 18
        inject(k, 3, "pressure_a", idx, 0.25)  # step 3: pressure_b is current, pressure_a previous
        inject(k, 4, "pressure_a", idx, -0.5)
        k.run(30)
        out.append(fields(k))
    plain = wave("numpy")
    plain.run(30)
    assert out[0] == out[1]
    assert out[0] != fields(plain)


def test_control_and_queues_round_trip_through_checkpoint(kernel_backend: str) -> None:
    k = wave(kernel_backend)
    k.send(Command.SNAPSHOT, 4, a=1)
    k.run(10)
    k.send(Command.SNAPSHOT, 13, a=2)  # pending across the checkpoint
    k.send(Command.SNAPSHOT, 15, a=3)
    ckpt = k.create_checkpoint()
    data = container.encode(ckpt)
    back = container.read(data, "mem").checkpoint

    cb = np.frombuffer(bytes(back.find(ChunkType.CONTROL_BLOCK).data), CONTROL_BLOCK_DTYPE)[0]
    assert cb["current_step"] == 10 and cb["input_tail"] - cb["input_head"] == 2 and cb["output_tail"] == 1
    assert back.metadata.current_step == 10 and back.metadata.kernel_type == "fdtd_3d"
    assert tuple(back.metadata.grid_size) == (20, 18, 22)
    assert back.metadata.hlc[1] == int(cb["hlc_logical"])
    assert back.find(ChunkType.H2K_QUEUE).size == 64 * 32 and back.find(ChunkType.K2H_QUEUE).size == 64 * 32
    assert back.find(ChunkType.HLC_STATE).size == 24
    assert back.find(ChunkType.DEVICE_MEMORY, region_id("pressure_a")) is not None
    assert back.metadata.custom[FINGERPRINT_KEY] == make_spec(P).fingerprint()

    for be in ("numpy", kernel_backend):
        r = wave(be)
        assert r.restore_from_checkpoint(back) == 10
        assert r.control().tobytes() == k.control().tobytes()
        assert r.backend.read_queue("h2k").tobytes() == k.backend.read_queue("h2k").tobytes()
        assert r.backend.read_queue("k2h").tobytes() == k.backend.read_queue("k2h").tobytes()
        events = r.run(10)
        assert [(e.step, e.a) for e in events] == [(13, 2), (15, 3)]
        assert r.step == 20
    k.run(10)
    assert fields(r) == fields(k)


def test_checkpoint_reuses_the_buffers_it_is_given(kernel_backend: str) -> None:
    """create_checkpoint(reuse=old) writes the new state into old's region arrays, and nothing else."""
    k = wave(kernel_backend)
    k.run(3)
    old = k.create_checkpoint()
    old_a = old.region("pressure_a")
    k.run(4)
    want = k.create_checkpoint().content_digest()
    new = k.create_checkpoint(reuse=old)
    assert new.content_digest() == want
    for name in ("pressure_a", "pressure_b", "velocity"):
        assert np.shares_memory(new.region(name), old.region(name)), name
    assert np.shares_memory(new.region("pressure_a"), old_a)
    # read-only buffers (a checkpoint parsed from bytes) and other shapes are never written
    parsed = container.read(container.encode(k.create_checkpoint()), "mem").checkpoint
    before = parsed.content_digest()
    k.run(2)
    fresh = k.create_checkpoint(reuse=parsed)
    assert parsed.content_digest() == before and fresh.content_digest() != before
    other = wave(kernel_backend, WaveParams(12, 10, 14)).create_checkpoint()
    assert k.create_checkpoint(reuse=other).content_digest() == fresh.content_digest()
    with pytest.raises(ValueError, match="pressure_a"):
        k.backend.read_region("pressure_a", np.empty((3, 3), "<f4"))


def test_incremental_checkpoint_is_a_delta() -> None:
    k = wave()
    k.run(6)
    base = k.create_checkpoint()
    k.run(3)
    delta = k.create_incremental_checkpoint(base)
    ids = {(c.chunk_type, c.chunk_id) for c in delta.chunks}
    assert (int(ChunkType.DEVICE_MEMORY), region_id("velocity")) not in ids  # static, unchanged
    assert (int(ChunkType.DEVICE_MEMORY), region_id("pressure_a")) in ids
    assert (int(ChunkType.CONTROL_BLOCK), 0) in ids
    full = k.create_checkpoint()
    assert apply_delta(base, delta).content_digest() == full.content_digest()


def test_restore_refuses_other_simulations() -> None:
    k = wave()
    k.run(3)
    ckpt = k.create_checkpoint()
    with pytest.raises(RestoreMismatch, match="grid"):
        wave(params=WaveParams(20, 18, 24)).restore_from_checkpoint(ckpt, "x.rkcp")
    with pytest.raises(RestoreMismatch, match="fingerprint"):
        wave(params=WaveParams(20, 18, 22, dx=5.0)).restore_from_checkpoint(ckpt, "x.rkcp")
    other = container.read(container.encode(ckpt)).checkpoint
    other.metadata = type(other.metadata)(**{**other.metadata.__dict__, "kernel_type": "heat_2d"})
    with pytest.raises(RestoreMismatch, match="kernel type 'heat_2d'") as ei:
        wave().restore_from_checkpoint(other, "y.rkcp")
    assert ei.value.source == "y.rkcp"


@pytest.mark.parametrize(("field", "value"), [("input_tail", 1 << 62), ("output_head", 5), ("input_mask", 7)])
def test_restore_refuses_an_inconsistent_queue(field: str, value: int) -> None:
    """A control block whose ring indices cannot be right is a clear error, not a hang or a wild read."""
    from rkckpt.errors import CheckpointError
    from rkckpt.model import Chunk

    k = wave()
    k.run(2)
    ckpt = k.create_checkpoint()
    cb = k.control().copy()
    cb[0][field] = value
    i = next(n for n, c in enumerate(ckpt.chunks) if c.chunk_type == int(ChunkType.CONTROL_BLOCK))
    ckpt.chunks[i] = Chunk(int(ChunkType.CONTROL_BLOCK), 0, cb.tobytes())
    with pytest.raises(CheckpointError, match="queue is inconsistent") as ei:
        wave().restore_from_checkpoint(ckpt, "bad.rkcp")
    assert ei.value.source == "bad.rkcp"


# --------------------------------------------------------------------- bring your own kernel
TOY_CL = """
__kernel void toy_step(__global const rk_control *ctl, __global float *a, __global float *halo, const float inc, const int n)
{
    RK_BEGIN(ctl);
    const int i = (int)get_global_id(0);
    const float v = rk_ftz(a[i] * 0.5f + inc);
    a[i] = v;
    if (i == n - 1) halo[0] = v;  /* each edge cell publishes itself */
    if (i == 0) halo[1] = v;
}
"""


def toy_spec(tmp: Path) -> KernelSpec:
    src = tmp / "toy.cl"
    src.write_text(TOY_CL)
    n = 16

    def step(regions, s):
        a = regions["a"]
        np.multiply(a, np.float32(0.5), out=a)
        np.add(a, np.float32(1.5), out=a)
        regions["halo"][0] = a[n - 1]
        regions["halo"][1] = a[0]

    return KernelSpec(
        kernel_type="toy",
        grid=(n, 1, 1),
        regions=[RegionSpec("a", "<f4", (n,)), RegionSpec("halo", "<f4", (2,), "halo")],
        launches=[Launch("toy_step", (n,), (CONTROL, "a", "halo", np.float32(1.5), np.int32(n)))],
        sources={"opencl": str(src)},
        numpy_step=step,
        initial=lambda: {"a": np.arange(n, dtype="<f4"), "halo": np.zeros(2, "<f4")},
        params={"inc": 1.5},
    )


def test_bring_your_own_kernel_with_halos(kernel_backend: str, tmp_path: Path) -> None:
    k = PersistentKernel(toy_spec(tmp_path), kernel_backend, kernel_id="toy-0")
    k.run(4)
    ckpt = container.read(container.encode(k.create_checkpoint())).checkpoint
    halo = ckpt.find(ChunkType.HALO_BUFFERS)
    assert halo is not None and halo.size == 8
    assert "halo" not in ckpt.regions() and "a" in ckpt.regions()
    ref = PersistentKernel(toy_spec(tmp_path), "numpy")
    ref.run(4)
    assert k.region("a").tobytes() == ref.region("a").tobytes()
    assert bytes(halo.data) == ref.region("halo").tobytes()
    r = PersistentKernel(toy_spec(tmp_path), kernel_backend)
    assert r.restore_from_checkpoint(ckpt) == 4
    assert r.region("halo").tobytes() == bytes(halo.data)
    r.run(2)
    ref.run(2)
    assert r.region("a").tobytes() == ref.region("a").tobytes()


def test_unknown_command_sets_error(kernel_backend: str) -> None:
    k = wave(kernel_backend)
    k.send(Command.SNAPSHOT, 0)  # a valid one alongside
    k.backend.write_message(1, np.array([(99, 0, 0, 0, 0)], dtype=MESSAGE_DTYPE))
    k.backend.write_control("input_tail", 2)
    k._h2k_tail = 2
    k.run(1)
    cb = k.control()[0]
    assert cb["error_count"] == 1 and cb["last_error"] == 2 and cb["messages_processed"] == 2


def test_readme_example_runs_and_matches(opencl_backend: str, tmp_path: Path) -> None:
    """The bring-your-own-kernel example in README.md works as written."""
    import re

    text = (REPO / "README.md").read_text()
    section = text[text.index("### Bringing your own kernel") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    src = tmp_path / "diffuse.cl"
    code = code.replace('"/path/to/diffuse.cl"', repr(str(src)))
    code = code.replace("k = PersistentKernel(spec, ", "src.write_text(SRC)\nk = PersistentKernel(spec, ")
    ns: dict = {"src": src}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own docs
    k = ns["k"]
    assert k.backend_name.partition(":")[0] in ("opencl", "cuda") and k.step == 500
    ref = PersistentKernel(ns["spec"], "numpy")
    ref.run(500)
    for name in ("a", "b"):
        assert k.region(name).tobytes() == ref.region(name).tobytes()
    assert float(ref.region("a").sum()) > 0.5


def test_cuda_path_without_gpu_is_a_clear_error() -> None:
    from rkkernel.backends import BackendUnavailable, available, select_backend
    from rkkernel.backends.cuda_backend import _geometry

    assert _geometry((254, 254, 254), None) == ((128, 1, 1), (2, 254, 254))
    assert _geometry((30, 4, 5), (32, 1, 1)) == ((32, 1, 1), (1, 4, 5))
    ok, why = available("cuda")
    if ok:
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailable, match="cuda"):
        select_backend("cuda")
    assert select_backend("auto") in ("opencl", "numpy")

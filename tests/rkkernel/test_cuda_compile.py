"""The CUDA back end's sources compile with NVRTC and agree with the wave spec, without a GPU.

CI has neither a GPU nor cupy, so nothing else builds kernels/fdtd3d.cu: a
syntax error, a kernel that lost ``extern "C"``, or an argument added to the
spec but not to the kernel would only show on a GPU machine (as a launch
failure or, worse, as garbage arguments). Here NVRTC from the
``nvidia-cuda-nvrtc-cu12`` wheel compiles exactly what the back end compiles
(``cuda_program``) to PTX, and each ``.entry``'s parameter list is checked
against the launch's arguments: same count, and the PTX type the back end's
argument needs (a device pointer is ``.u64``, an ``np.int32`` is a 32-bit
integer, an ``np.float32`` is ``.f32``).

The CUDA headers cupy adds on a GPU machine (``cooperative_groups.h`` and the
CCCL headers it includes) come from the ``nvidia-cuda-runtime-cu12`` and
``nvidia-cuda-cccl-cu12`` wheels; NVRTC has no built-in copy.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from rkkernel.backends.cuda_backend import cuda_program
from rkkernel.spec import CONTROL, H2K, K2H, STEPS, Launch, Swap
from rkkernel.wavesim import WaveParams, make_spec

ARCHS = ("compute_90", "compute_80")
SPEC = make_spec(WaveParams(26, 22, 30))
#: What ``CudaBackend.enqueue_steps`` passes to the runtime's ``rk_advance``.
RK_ADVANCE = Launch("rk_advance", (1,), (CONTROL, H2K, K2H, np.uint32(0)))

_POINTERS = (CONTROL, H2K, K2H)
_INT32 = frozenset({".u32", ".s32", ".b32"})


def _wheel_dir(package: str) -> Path | None:
    """Directory of an ``nvidia.*`` wheel package (a namespace package: no ``__file__``)."""
    try:
        found = importlib.util.find_spec(package)
    except ModuleNotFoundError:
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


class Nvrtc:
    """The few NVRTC calls needed to turn CUDA source into PTX, through ctypes."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        handle, p_handle, size_p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)
        strings = ctypes.POINTER(ctypes.c_char_p)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        lib.nvrtcCreateProgram.argtypes = [p_handle, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, strings, strings]
        lib.nvrtcCompileProgram.argtypes = [handle, ctypes.c_int, strings]
        lib.nvrtcDestroyProgram.argtypes = [p_handle]
        for name in ("nvrtcGetProgramLogSize", "nvrtcGetPTXSize"):
            getattr(lib, name).argtypes = [handle, size_p]
        for name in ("nvrtcGetProgramLog", "nvrtcGetPTX"):
            getattr(lib, name).argtypes = [handle, ctypes.c_char_p]
        self.lib = lib
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def _text(self, prog: ctypes.c_void_p, size_fn: str, get_fn: str) -> str:
        n = ctypes.c_size_t()
        self._check(getattr(self.lib, size_fn)(prog, ctypes.byref(n)), size_fn)
        buf = ctypes.create_string_buffer(max(1, n.value))
        self._check(getattr(self.lib, get_fn)(prog, buf), get_fn)
        return buf.value.decode(errors="replace")

    def compile(self, source: str, options: tuple[str, ...], name: str = "rkkernel.cu") -> tuple[int, str, str]:
        """(NVRTC result code, compile log, PTX or "" when the compile failed)."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None), "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            rc = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            log = self._text(prog, "nvrtcGetProgramLogSize", "nvrtcGetProgramLog")
            ptx = self._text(prog, "nvrtcGetPTXSize", "nvrtcGetPTX") if rc == 0 else ""
            return rc, log, ptx
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def _load_nvrtc() -> Nvrtc | str:
    """The NVRTC wrapper, or why there is none (cached: one load per session)."""
    root = _wheel_dir("nvidia.cuda_nvrtc")
    if root is None:
        return "NVRTC is not installed (nvidia-cuda-nvrtc-cu12, in the test extra on Linux x86_64)"
    libs = sorted(p for p in (root / "lib").glob("libnvrtc.so*") if "builtins" not in p.name and ".alt." not in p.name)
    if not libs:
        return f"no libnvrtc.so* under {root / 'lib'}"
    try:
        return Nvrtc(libs[0])
    except (OSError, AttributeError, RuntimeError) as exc:
        return f"{libs[0]} is not loadable: {exc}"


@pytest.fixture(scope="module")
def nvrtc() -> Nvrtc:
    found = _load_nvrtc()
    if isinstance(found, str):
        pytest.skip(found)
    return found


def _cuda_include_options() -> tuple[str, ...] | str:
    """``-I`` options for the CUDA headers cupy would supply, or why they are missing."""
    dirs = []
    for package, header in (("nvidia.cuda_runtime", "cooperative_groups.h"), ("nvidia.cuda_cccl", "nv/target")):
        root = _wheel_dir(package)
        if root is None or not (root / "include" / header).is_file():
            return f"{header} not found: install {package.replace('.', '-').replace('_', '-')}-cu12 (test extra)"
        dirs.append(f"-I{root / 'include'}")
    return tuple(dirs)


@functools.cache
def _compiled(persistent: bool, arch: str) -> tuple[int, str, str]:
    nv = _load_nvrtc()
    assert isinstance(nv, Nvrtc)
    source, options = cuda_program(SPEC, persistent=persistent)
    includes = _cuda_include_options()
    assert isinstance(includes, tuple)
    return nv.compile(source, (*options, f"--gpu-architecture={arch}", *includes))


def ptx_for(persistent: bool, arch: str) -> str:
    includes = _cuda_include_options()
    if isinstance(includes, str):
        pytest.skip(includes)
    rc, log, ptx = _compiled(persistent, arch)
    kind = "persistent (-DRK_PERSISTENT)" if persistent else "per-step"
    if rc != 0:
        pytest.fail(f"NVRTC could not compile the {kind} CUDA program for {arch} (result {rc}):\n{log}", pytrace=False)
    return ptx


_ENTRY = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(([^)]*)\)")
_PTX_TYPE = re.compile(r"^\.[usbf]\d+$")


def ptx_entries(ptx: str) -> dict[str, list[str]]:
    """Kernel name → the PTX type of each parameter (``.u64``, ``.u32``, ``.f32``, ...).

    A parameter PTX passes as bytes (a struct by value) reads as ``.b8[N]``.
    """
    entries = {}
    for m in _ENTRY.finditer(ptx):
        types = []
        for param in filter(None, (p.strip() for p in m.group(2).split(","))):
            words = param.split()
            assert words[0] == ".param", param
            ptx_type = next((w for w in words[1:] if _PTX_TYPE.match(w)), "?")
            types.append(ptx_type + ("[]" if "[" in words[-1] else ""))
        entries[m.group(1)] = types
    return entries


def expected_types(arg: object) -> frozenset[str]:
    """The PTX parameter types that can receive ``arg`` as the CUDA back end passes it."""
    if any(arg is p for p in _POINTERS) or isinstance(arg, str | Swap):
        return frozenset({".u64"})  # a device pointer (cupy array)
    if arg is STEPS:
        return _INT32  # np.int32(batch size)
    if isinstance(arg, np.generic):
        dt = arg.dtype
        if dt.kind == "f" and dt.itemsize in (4, 8):
            return frozenset({f".f{dt.itemsize * 8}"})
        if dt.kind in "iu" and dt.itemsize in (4, 8):
            bits = dt.itemsize * 8
            return frozenset({f".u{bits}", f".s{bits}", f".b{bits}"})
    raise AssertionError(f"no PTX type known for launch argument {arg!r} ({type(arg).__name__}); teach expected_types")


def signature_problems(entries: dict[str, list[str]], launch: Launch) -> list[str]:
    """Why ``launch`` would not match its kernel in the PTX; empty when it does."""
    params = entries.get(launch.function)
    if params is None:
        return [f'no kernel .entry {launch.function!r} (is it extern "C" and compiled in?); entries: {sorted(entries)}']
    if len(params) != len(launch.args):
        return [f"{launch.function}: the kernel has {len(params)} parameters, the spec passes {len(launch.args)} arguments {launch.args!r}"]
    return [
        f"{launch.function}: parameter {i} is {ptx}, argument {arg!r} needs one of {sorted(expected_types(arg))}"
        for i, (ptx, arg) in enumerate(zip(params, launch.args, strict=True))
        if ptx not in expected_types(arg)
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_per_step_program_matches_the_spec(nvrtc: Nvrtc, arch: str) -> None:
    entries = ptx_entries(ptx_for(False, arch))
    assert SPEC.launches, "the wave spec has no launches"
    problems = [p for launch in [*SPEC.launches, RK_ADVANCE] for p in signature_problems(entries, launch)]
    assert problems == []


@pytest.mark.parametrize("arch", ARCHS)
def test_persistent_program_matches_the_spec(nvrtc: Nvrtc, arch: str) -> None:
    launch = SPEC.persistent["cuda"]
    entries = ptx_entries(ptx_for(True, arch))
    assert signature_problems(entries, launch) == []
    # The persistent module is built from the same source, so it still has the per-step kernels.
    assert {x.function for x in SPEC.launches} | {"rk_advance"} <= set(entries)


def test_persistent_kernel_is_only_in_the_persistent_program(nvrtc: Nvrtc) -> None:
    """Without -DRK_PERSISTENT the cooperative-groups code stays out (toolchains without CG still build)."""
    assert SPEC.persistent["cuda"].function not in ptx_entries(ptx_for(False, ARCHS[0]))


def test_checker_catches_a_spec_argument_the_kernel_lacks(nvrtc: Nvrtc) -> None:
    """The comparison above would fail if the spec and a kernel drifted apart."""
    entries = ptx_entries(ptx_for(False, ARCHS[0]))
    step = SPEC.launches[0]
    assert signature_problems(entries, step) == []
    extra = dataclasses.replace(step, args=(*step.args, np.int32(7)))
    assert "parameters" in " ".join(signature_problems(entries, extra))
    floats = [i for i, a in enumerate(step.args) if isinstance(a, np.float32)]
    swapped = list(step.args)
    swapped[floats[0]] = np.int32(1)
    assert signature_problems(entries, dataclasses.replace(step, args=tuple(swapped)))
    renamed = dataclasses.replace(step, function=step.function + "_gone")
    assert "extern" in " ".join(signature_problems(entries, renamed))


def test_compile_errors_come_back_with_the_log(nvrtc: Nvrtc) -> None:
    rc, log, ptx = nvrtc.compile('extern "C" __global__ void k(int *p) { p[0] = undeclared_name; }', ("--gpu-architecture=compute_90",))
    assert rc != 0 and ptx == ""
    assert "undeclared_name" in log

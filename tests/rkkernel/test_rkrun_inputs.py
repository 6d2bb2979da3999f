"""rkrun's inputs (issue 18 item 5): values, config files, kernel modules and input files.

Every bad input ends in exit 2 and one line naming the option or file and
the problem: no traceback, no hang (FIFOs, /dev/zero), no unbounded read,
no pickle, and never a run that computes with a value the device cannot hold.
All cases run the real ``rkrun`` in a subprocess on real files.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fixtures_kernel import rkrun_env
from rkkernel.inputs import InputFileError, read_bounded, read_npy
from rkstep.protocol import EVENTS_FILE

WAVE = ("wavesim", "--grid", "12", "10", "14", "--steps", "4", "--backend", "numpy", "--batch", "2")
#: A wait this long means rkrun blocked: every case here must end at once.
QUICK = 60


def run(rkrun, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    p = rkrun(*args, env=env)
    return p.wait(QUICK), p.log()


def error_lines(log: str) -> list[str]:
    """The log's lines that are not click's usage preamble."""
    return [ln for ln in log.splitlines() if ln.strip() and not ln.startswith(("Usage:", "Try '"))]


def assert_refused(rc: int, log: str, *needles: str) -> None:
    assert rc == 2, log
    assert "Traceback" not in log, log
    lines = error_lines(log)
    assert len(lines) == 1, lines  # one line says what is wrong
    for n in needles:
        assert n in lines[0], lines[0]


def nothing_written(tmp_path: Path) -> None:
    left = sorted(p.name for p in (tmp_path / "ck").iterdir()) if (tmp_path / "ck").exists() else []
    assert left in ([], [EVENTS_FILE]) and not (tmp_path / "r.h5").exists(), left


# ------------------------------------------------------------------ values in the dtype they are used in
@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        # finite as float64, inf as the float32 the velocity model is: was rc 0 with NaN fields
        (("--v-top", "1e39"), ("'--v-top'", "1e+39 is out of range for float32")),
        (("--v-bottom", "-3.5e38"), ("'--v-bottom'", "out of range for float32")),
        (("--dx", "1e39"), ("'--dx'", "out of range for float32")),
        # a float32 subnormal is flushed to zero by the kernels; 1e-50 is 0 in float32
        (("--v-bottom", "1e-39"), ("'--v-bottom'", "below float32's smallest normal number")),
        (("--dx", "1e-50"), ("'--dx'", "1e-50 (float32: 0.0) must be > 0")),
        # each value fits float32, but (v*v)*(dt/dx)^2 does not: checked on what the kernels compute
        (("--v-top", "1e20"), ("(dt/dx)^2 = ", "outside float32's normal range")),
        (("--v-bottom", "1e-20"), ("v_min^2 = ", "outside float32's normal range")),
        # int32 kernel arguments
        (("--grid", "3", "3", "2147483648"), ("'--grid'", "2147483648 is out of range for int32")),
        (("--batch", "2147483648"), ("'--batch'", "out of range for int32")),
        (("--steps", "9007199254740993"), ("'--steps'", "9007199254740993")),
        (("--checkpoint-every", "9223372036854775808"), ("'--checkpoint-every'", "out of range for int64")),
    ],
)
def test_values_out_of_range_for_their_dtype(rkrun, tmp_path: Path, extra: tuple[str, ...], needles: tuple[str, ...]) -> None:
    rc, log = run(rkrun, *WAVE, "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "r.h5"), *extra)
    assert_refused(rc, log, *needles)
    nothing_written(tmp_path)


def test_float32_limits_in_a_config_file(rkrun, tmp_path: Path) -> None:
    """The same check for a config file's value (JSON has no float32: 1e39 is a fine double)."""
    cfg = {"kernel": "traveltime", "grid": [12, 10, 14], "steps": 4, "checkpoint_dir": str(tmp_path / "ck"), "out": str(tmp_path / "r.h5")}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**cfg, "v_top": 1e39}))
    rc, log = run(rkrun, "--config", str(path))
    assert_refused(rc, log, str(path), "v_top: 1e+39 is out of range for float32")
    nothing_written(tmp_path)


def test_largest_float32_normal_values_still_run(rkrun, tmp_path: Path) -> None:
    """The range checks refuse only what the kernels cannot hold: a model at 1e6..1e7 m/s runs."""
    out = tmp_path / "r.h5"
    rc, log = run(rkrun, *WAVE, "--v-top", "1e6", "--v-bottom", "1e7", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(out))
    assert rc == 0, log
    import h5py

    with h5py.File(out) as f:
        assert np.isfinite(f["pressure"][()]).all() and f.attrs["step"] == 4


# ------------------------------------------------------------------ config files
def _config_cases(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    d = tmp_path / "cfg"
    d.mkdir()
    cases: dict[str, tuple[Path, tuple[str, ...]]] = {}

    def put(name: str, data: bytes, *needles: str) -> None:
        (d / name).write_bytes(data)
        cases[name] = (d / name, needles)

    put("binary.yaml", b"grid: [8, 8, 8]\n\x00\x01\x02\xff" * 4, "binary file (NUL byte at offset 16)")
    put("latin1.json", '{"out": "r\xe9sultat.h5"}'.encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 10)")
    put("list.yaml", b"- grid\n- steps\n", "config must be a mapping", "not a list")
    put("scalar.json", b"42", "config must be a mapping", "not an int")
    put("empty.yaml", b"", "config must be a mapping", "nothing (empty file)")
    put("unknown.json", json.dumps({"grid": [8, 8, 8], "no_such_option": 1}).encode(), "unknown keys ['no_such_option']")
    put("badyaml.yaml", b"grid: [1, 2\nsteps: 3\n", "not valid YAML: ")
    put("badjson.json", b'{"grid": [8, 8, 8],}', "not valid JSON: ")
    put("deep.json", b"[" * 100_000 + b"]" * 100_000, "not valid JSON: ")
    # libyaml (CSafeLoader) recursed on the C stack and died with SIGSEGV on this
    put("deep.yaml", b"a: " + b"[" * 30_000 + b"]" * 30_000, "not valid YAML: ")
    put("nested.yaml", b"steps: {a: 1}\n", "steps: must be a number, a string or a list of them, not a dict")
    put("intkey.yaml", b"1: 2\n", "key 1 is not a string")
    # a YAML alias bomb: 9^6 leaves if anything ever walked or printed it
    bomb = "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]\n" for p, k in zip("abcde", "bcdef", strict=True)
    )
    put("bomb.yaml", (bomb + "steps: *f\n").encode(), "b: must be a value or a short list of plain values, not a nested list")
    put("big.json", b"{" + b" " * (1 << 20) + b"}", "config file is 1048578 bytes, more than the 1048576 allowed")
    put("nul.json", json.dumps({"out": "r\x00.h5"}).encode(), "out: 'r\\x00.h5': must not contain a NUL character")
    put("kernel.json", json.dumps({"kernel": ["wavesim"]}).encode(), "kernel: must be a kernel name")
    os.mkfifo(d / "fifo.yaml")
    cases["fifo.yaml"] = (d / "fifo.yaml", ("config file is a FIFO (named pipe), not a regular file",))
    (d / "zero.yaml").symlink_to("/dev/zero")
    cases["zero.yaml"] = (d / "zero.yaml", ("config file is a character device, not a regular file",))
    return cases


CONFIG_CASES = [
    "binary.yaml",
    "latin1.json",
    "list.yaml",
    "scalar.json",
    "empty.yaml",
    "unknown.json",
    "badyaml.yaml",
    "badjson.json",
    "deep.json",
    "deep.yaml",
    "nested.yaml",
    "intkey.yaml",
    "bomb.yaml",
    "big.json",
    "nul.json",
    "kernel.json",
    "fifo.yaml",
    "zero.yaml",
]


SUBCOMMAND_CASES = ("binary.yaml", "unknown.json", "bomb.yaml", "fifo.yaml", "zero.yaml")


@pytest.mark.parametrize("how", ["top", "subcommand"])
def test_bad_config_files_are_one_line_exit_2(rkrun, tmp_path: Path, how: str) -> None:
    """Binary, non-UTF-8, non-mapping, unknown keys, too large, FIFO, /dev/zero: exit 2 at once, one line naming the file."""
    cases = _config_cases(tmp_path)
    assert sorted(cases) == sorted(CONFIG_CASES)
    for name, (path, needles) in cases.items():
        if how == "subcommand" and name not in SUBCOMMAND_CASES:
            continue  # the same loader: the ways in that differ are enough
        args = ("--config", str(path)) if how == "top" else ("traveltime", "--config", str(path))
        rc, log = run(rkrun, *args)  # a FIFO or /dev/zero would block here: wait() times out
        assert_refused(rc, log, f"Error: {path}: ", *needles)


def test_yaml_config_without_pyyaml_says_so(rkrun, tmp_path: Path) -> None:
    """A YAML config where PyYAML cannot be imported: one line naming the file and what to install."""
    blocker = tmp_path / "noyaml" / "yaml"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('PyYAML is blocked in this test')\n")
    env = rkrun_env()
    env["PYTHONPATH"] = f"{blocker.parent}:{env.get('PYTHONPATH', '')}"
    path = tmp_path / "run.yaml"
    path.write_text("grid: [8, 8, 8]\n")
    rc, log = run(rkrun, "--config", str(path), env=env)
    assert_refused(rc, log, str(path), "a YAML config needs PyYAML, which is not installed")


# ------------------------------------------------------------------ kernel modules
@pytest.mark.parametrize(
    ("source", "needles"),
    [
        ("def broken(:\n    pass\n", ("cannot import 'rk_bad_mod': syntax error (", "rk_bad_mod.py, line 1)")),
        ("raise RuntimeError('no GPU here\\nsecond line')\n", ("importing 'rk_bad_mod' raised RuntimeError: no GPU here second line",)),
        ("import sys\nsys.exit(0)\n", ("importing 'rk_bad_mod' called sys.exit(0); a kernel module must not exit",)),
        ("raise SystemExit('bye')\n", ("importing 'rk_bad_mod' called sys.exit('bye')",)),
        (
            "import rk_no_such_dependency_q\n",
            ("cannot import 'rk_bad_mod': ModuleNotFoundError: No module named 'rk_no_such_dependency_q'",),
        ),
        ("def __getattr__(name):\n    raise ValueError(name)\n", ("rk_bad_mod:PLUGIN: looking up 'PLUGIN' raised ValueError: PLUGIN",)),
        ("PLUGIN = 3\n", ("rk_bad_mod:PLUGIN is a int, not a rkkernel.plugin.KernelPlugin",)),
    ],
)
def test_bad_kernel_module_is_one_line_exit_2(rkrun, tmp_path: Path, source: str, needles: tuple[str, ...]) -> None:
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "rk_bad_mod.py").write_text(source)
    env = rkrun_env()
    env["PYTHONPATH"] = f"{mods}:{env.get('PYTHONPATH', '')}"
    rc, log = run(
        rkrun,
        "--kernel",
        "rk_bad_mod:PLUGIN",
        *WAVE[1:],
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--out",
        str(tmp_path / "r.h5"),
        env=env,
    )
    assert_refused(rc, log, "--kernel: ", *needles)
    nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("sys.exit(0)", "kernel 'bad_build': building the run called sys.exit(0); a kernel plugin must not exit"),
        ("{}['grid_missing']", "kernel 'bad_build': building the run raised KeyError: 'grid_missing'"),
    ],
)
def test_plugin_build_that_exits_or_raises_is_one_line_exit_2(rkrun, tmp_path: Path, body: str, needle: str) -> None:
    """A plugin's build is user code too: ``sys.exit(0)`` in it must not be rc 0 having run nothing."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "rk_bad_build.py").write_text(
        "import sys\nfrom rkkernel.plugin import KernelPlugin\n\n\n"
        f"def build(values):\n    {body}\n\n\nPLUGIN = KernelPlugin(name='bad_build', build=build)\n"
    )
    env = rkrun_env()
    env["PYTHONPATH"] = f"{mods}:{env.get('PYTHONPATH', '')}"
    args = ("--kernel", "rk_bad_build:PLUGIN", *WAVE[1:7], "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "r.h5"))
    rc, log = run(rkrun, *args, env=env)
    assert_refused(rc, log, needle)
    nothing_written(tmp_path)


# ------------------------------------------------------------------ --velocity
def test_velocity_fifo_and_device_refused_without_blocking(rkrun, tmp_path: Path) -> None:
    fifo = tmp_path / "model.npy"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO (named pipe)"), (Path("/dev/zero"), "a character device"), (tmp_path, "a directory")):
        rc, log = run(rkrun, *WAVE, "--velocity", str(path), "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "r.h5"))
        if path == tmp_path:  # click refuses a directory itself
            assert rc == 2 and "is a directory" in log and "Traceback" not in log, log
            continue
        assert_refused(rc, log, f"{path}: velocity model is {kind}, not a regular file")


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_velocity_npy_checked_before_allocation_and_never_unpickled(rkrun, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204 - what a hostile pickle does when loaded
            return (open, (str(marker), "w"))

    cases: list[tuple[str, bytes, str]] = [
        # an object array's data is a pickle: refused from the header, never loaded
        (
            "pickle.npy",
            _npy_header((14, 12), "|O") + pickle.dumps(np.array([Evil()] * 168, dtype=object)),
            "must be numeric (int or float), got object",
        ),
        # the header promises the grid's shape but the data is not there: refused before allocating
        ("short.npy", _npy_header((14, 12)) + b"\x00" * 100, "is truncated: its header promises 672 bytes of data, the file holds 100"),
        # a header claiming 10^12 cells: refused on the shape, nothing allocated
        ("huge.npy", _npy_header((10**6, 10**6)), "must have shape (nz, nx) = (14, 12), got (1000000, 1000000)"),
        ("garbage.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': (((\n", "is not a readable .npy array ("),
        ("notnpy.npy", b"hello world, not an array", "is not a readable .npy array ("),
        (
            "f64inf.npy",
            _npy_header((14, 12), "<f8") + np.full((14, 12), 1e39).tobytes(),
            "velocities must be finite and positive (as float32",
        ),
        (
            "subnormal.npy",
            _npy_header((14, 12)) + np.full((14, 12), 1e-40, "<f4").tobytes(),
            "velocities must be finite and positive (as float32",
        ),
    ]
    from rkkernel.wavesim import load_velocity

    for i, (name, data, needle) in enumerate(cases):
        path = tmp_path / name
        path.write_bytes(data)
        if i < 2:  # end to end through rkrun
            rc, log = run(rkrun, *WAVE, "--velocity", str(path), "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "r.h5"))
            assert_refused(rc, log, f"{path}: ", needle)
        else:  # the same reader in this process (a numpy import per case is slow on 2 cores)
            with pytest.raises(ValueError) as exc:
                load_velocity(str(path), 12, 14)
            assert str(exc.value).startswith(f"{path}: ") and needle in str(exc.value) and "\n" not in str(exc.value), exc.value
    assert not marker.exists()
    nothing_written(tmp_path)


def test_read_npy_matches_numpy_for_c_and_fortran_order(tmp_path: Path) -> None:
    """The safe reader gives np.load's array (both orders, v1 and v2 headers) and refuses what np.load would trust."""
    a = np.arange(14 * 12, dtype="<f8").reshape(14, 12) * 1.5
    for order in ("C", "F"):
        for version in ((1, 0), (2, 0)):
            p = tmp_path / f"m{order}{version[0]}.npy"
            with open(p, "wb") as f:
                np.lib.format.write_array(f, np.asarray(a, order=order), version=version)
            got = read_npy(p, (14, 12), "model")
            assert got.dtype == a.dtype and np.array_equal(got, np.load(p, allow_pickle=False))
    with pytest.raises(InputFileError, match=r"m.*must have shape \(12, 14\), got \(14, 12\)"):
        read_npy(tmp_path / "mC1.npy", (12, 14), "model")


def test_read_bounded_caps_before_and_while_reading(tmp_path: Path) -> None:
    """The cap is checked on fstat's size and again while reading (a /proc file says 0 bytes and has more)."""
    p = tmp_path / "c.json"
    p.write_bytes(b"x" * 5000)
    assert read_bounded(p, "config file", 5000) == b"x" * 5000
    with pytest.raises(InputFileError, match=r"c.json: config file is 5000 bytes, more than the 4999 allowed"):
        read_bounded(p, "config file", 4999)
    # /proc files report size 0 and are regular: only the read-time cap stops them
    with pytest.raises(InputFileError, match=r"more than the 16 bytes allowed"):
        read_bounded("/proc/self/maps", "config file", 16)

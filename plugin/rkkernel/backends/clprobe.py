"""Which OpenCL devices can really run our kernels: probe each by building the real program.

An OpenCL platform that lists a device is no promise that it can compile for
it: the pocl wheel's LLVM 14 rejects CPUs newer than itself ("unknown target
CPU 'generic'"), and a broken driver may abort the process inside the build.
So every candidate (platform, device) is probed by building the actual
program in a child process, and the verdict is cached on disk keyed by
platform, device, driver version, program source and options, so only the
first start on a machine pays for it.

Environment:

* ``RKKERNEL_OPENCL_DEVICE``: only consider matching devices. ``P:D`` or ``P``
  (indices), or ``PLATFORM[:DEVICE]`` substrings, case-insensitive;
  PLATFORM matches the platform's name, vendor or version (``pocl``,
  ``intel``, ``nvidia``), DEVICE the device's name.
* ``RKKERNEL_OPENCL_EXCLUDE``: comma-separated platform substrings never
  probed (``pocl``, ``intel``; ``all`` or ``*`` for every platform). This is
  how the fallback paths are tested on machines where everything works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rkckpt.atomic import atomic_open

from ..cache import cache_root

log = logging.getLogger("rkkernel")

PROBE_VERSION = 1
PROBE_TIMEOUT_S = 300.0

#: CPU platforms in order of preference, best first, by measurement (bench/stencil.py,
#: one row per CPU platform): see README "Back ends". Platforms not listed come after.
CPU_PLATFORM_PREFERENCE = ("intel", "pocl")


@dataclass(frozen=True)
class Candidate:
    """One OpenCL device as the ICD loader lists it."""

    platform_index: int
    device_index: int
    platform: str
    platform_vendor: str
    platform_version: str
    device: str
    driver_version: str
    is_gpu: bool
    is_cpu: bool

    @property
    def alias(self) -> str:
        """Short platform name used in selectors, logs and test ids: pocl, intel, nvidia, ..."""
        text = f"{self.platform} {self.platform_vendor} {self.platform_version}".lower()
        for known in ("pocl", "nvidia", "intel", "amd", "apple"):
            if known in text:
                return known
        return self.platform.split()[0].lower() if self.platform.split() else f"p{self.platform_index}"

    @property
    def label(self) -> str:
        return f"{self.platform.strip()} / {self.device.strip()} ({self.alias}, {self.platform_index}:{self.device_index})"

    def matches_platform(self, pattern: str) -> bool:
        return pattern.lower() in f"{self.platform} {self.platform_vendor} {self.platform_version} {self.alias}".lower()

    def matches(self, selector: str) -> bool:
        """Whether ``selector`` (``P:D``, ``P``, ``PLATFORM[:DEVICE]``) names this device."""
        plat, _, dev = selector.strip().partition(":")
        if plat.isdigit():
            if int(plat) != self.platform_index:
                return False
        elif plat and not self.matches_platform(plat):
            return False
        if dev.isdigit():
            return int(dev) == self.device_index
        return not dev or dev.lower() in self.device.lower()


@dataclass(frozen=True)
class Verdict:
    candidate: Candidate
    ok: bool
    reason: str


def _excluded(c: Candidate) -> str | None:
    spec = os.environ.get("RKKERNEL_OPENCL_EXCLUDE", "")
    for pat in (p.strip() for p in spec.split(",")):
        if pat and (pat in ("all", "*") or c.matches_platform(pat)):
            return f"excluded by RKKERNEL_OPENCL_EXCLUDE={spec}"
    return None


def list_candidates(cl) -> tuple[list[Candidate], list[str]]:
    """Every device of every platform, and one line per platform that could not be asked."""
    out: list[Candidate] = []
    problems: list[str] = []
    try:
        platforms = cl.get_platforms()
    except Exception as exc:  # noqa: BLE001 - no ICD at all raises here
        return [], [f"no OpenCL platform: {type(exc).__name__}: {exc}"]
    for pi, p in enumerate(platforms):
        try:
            devices = p.get_devices()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{p.name.strip()}: cannot list devices: {exc}")
            continue
        for di, d in enumerate(devices):
            out.append(
                Candidate(
                    pi,
                    di,
                    p.name.strip(),
                    p.vendor.strip(),
                    p.version.strip(),
                    d.name.strip(),
                    d.driver_version.strip(),
                    bool(d.type & cl.device_type.GPU),
                    bool(d.type & cl.device_type.CPU),
                )
            )
    return out, problems


def rank(c: Candidate) -> tuple[int, int, int, int]:
    """Sort key, best first: GPUs, then CPUs in measured platform order, then anything else."""
    kind = 0 if c.is_gpu else 1 if c.is_cpu else 2
    pref = CPU_PLATFORM_PREFERENCE.index(c.alias) if c.alias in CPU_PLATFORM_PREFERENCE else len(CPU_PLATFORM_PREFERENCE)
    return (kind, pref, c.platform_index, c.device_index)


def build_environment() -> list[tuple[str, str]]:
    """Environment variables that change what a build does (pocl's flags, the ICD list)."""
    return sorted((k, v) for k, v in os.environ.items() if (k.startswith("POCL_") and k != "POCL_CACHE_DIR") or k == "OCL_ICD_VENDORS")


def _cache_file(c: Candidate, source: str, options: list[str]) -> Path:
    digest = hashlib.sha256(source.encode()).hexdigest()
    key = json.dumps([PROBE_VERSION, asdict(c), digest, options, build_environment(), sys.version_info[:2]])
    return cache_root() / "probe" / f"opencl-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _read_cached(path: Path) -> tuple[bool, str] | None:
    try:
        if path.stat().st_size > 1 << 20:
            return None
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("ok"), bool) and isinstance(data.get("reason"), str):
            return data["ok"], data["reason"]
    except (OSError, ValueError, RecursionError):
        pass
    return None


def _build_in_child(c: Candidate, source: str, options: list[str]) -> tuple[bool, str]:
    job = json.dumps(
        {"platform": c.platform_index, "device": c.device_index, "device_name": c.device, "source": source, "options": options}
    )
    try:
        r = subprocess.run(
            [sys.executable, "-m", "rkkernel.backends.clprobe"],
            input=job,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired:
        return False, f"program build did not finish in {PROBE_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return False, f"cannot start the probe: {exc}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode == 0 and lines:
        try:
            data = json.loads(lines[-1])
            return bool(data["ok"]), str(data["reason"])
        except (ValueError, KeyError, TypeError):
            pass
    tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-3:])[-400:]
    how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
    return False, f"the probe process died ({how}) while building the program: {tail or 'no output'}"


def probe_candidates(cl, source: str, options: list[str], selector: str | None = None) -> list[Verdict]:
    """Verdicts for every candidate, best first. ``selector`` (else ``$RKKERNEL_OPENCL_DEVICE``)
    narrows the choice; ``$RKKERNEL_OPENCL_EXCLUDE`` removes platforms."""
    cands, problems = list_candidates(cl)
    verdicts: list[Verdict] = []
    selector = (selector or os.environ.get("RKKERNEL_OPENCL_DEVICE", "")).strip()
    for c in sorted(cands, key=rank):
        if selector and not c.matches(selector):
            verdicts.append(Verdict(c, False, f"not selected by {selector!r}"))
            continue
        why = _excluded(c)
        if why:
            verdicts.append(Verdict(c, False, why))
            continue
        path = _cache_file(c, source, options)
        cached = _read_cached(path)
        if cached is None:
            ok, reason = _build_in_child(c, source, options)
            try:
                with atomic_open(path, mkdir=True) as fh:
                    fh.write(json.dumps({"ok": ok, "reason": reason, "candidate": asdict(c)}).encode())
            except OSError as exc:  # a read-only cache only costs start-up time
                log.debug("cannot cache the OpenCL probe in %s: %s", path, exc)
        else:
            ok, reason = cached
        verdicts.append(Verdict(c, ok, reason))
    for p in problems:
        log.warning("OpenCL: %s", p)
    return verdicts


def explain(verdicts: list[Verdict]) -> str:
    """One line per rejected candidate, for errors."""
    if not verdicts:
        return "no OpenCL platform or device is installed"
    return "; ".join(f"{v.candidate.label}: {v.reason}" for v in verdicts if not v.ok)


def _child_main() -> int:
    """Build the program on one device; print ``{"ok": ..., "reason": ...}``. Run by ``_build_in_child``."""
    from .icd import register_pip_runtimes  # the parent's environment already names the folder

    register_pip_runtimes()
    job = json.loads(sys.stdin.read())
    import pyopencl as cl

    try:
        dev = cl.get_platforms()[job["platform"]].get_devices()[job["device"]]
        if dev.name.strip() != job["device_name"]:
            raise RuntimeError(f"device order changed: expected {job['device_name']!r}, found {dev.name.strip()!r}")
        ctx = cl.Context([dev])
        prog = cl.Program(ctx, job["source"])
        try:
            prog.build(options=job["options"])
        except cl.RuntimeError as exc:
            msg = " ".join(str(exc).split())
            print(json.dumps({"ok": False, "reason": f"program build failed: {msg[-600:]}"}))
            return 0
        print(json.dumps({"ok": True, "reason": f"{dev.platform.name.strip()} / {dev.name.strip()} builds the program"}))
    except Exception as exc:  # noqa: BLE001 - every failure is a verdict
        print(json.dumps({"ok": False, "reason": f"{type(exc).__name__}: {' '.join(str(exc).split())[-600:]}"}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())

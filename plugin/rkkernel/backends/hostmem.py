"""Host memory for CPU devices, backed by transparent huge pages where the kernel allows.

pocl's CPU device runs kernels straight on host memory. With 4 KiB pages a
stencil sweeping 64 MiB fields pays a TLB miss every few rows (each z
neighbour is a different page), and its memory throughput falls well below
what a plain stream reaches; NumPy madvises its own big arrays for huge
pages for the same reason. Measured on the 256^3 wave (pocl 3, Zen 4,
2 cores, interleaved runs): 2.8-2.9 Gcells/s on pocl's own allocations,
3.6-3.8 Gcells/s on these. Bits are unaffected: only the page size changes.

The mapping is private and anonymous (a shared one would be shmem, which
THP ignores unless ``shmem_enabled`` says otherwise) and 2 MiB aligned so
every whole 2 MiB of it can be a huge page. Where madvise or THP is
missing the memory is ordinary pages and everything still works.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

HUGE_PAGE = 2 << 20
#: Below this a region is a handful of pages; not worth a mapping of its own.
HUGE_PAGE_MIN_BYTES = 4 << 20


def huge_page_array(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """A zeroed array on its own 2 MiB-aligned anonymous mapping, madvised MADV_HUGEPAGE.

    The array keeps the mapping alive (numpy holds the buffer's exporter),
    so the memory lives exactly as long as the array and its views.
    """
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            m.madvise(advice)
        except OSError:  # THP compiled out or disabled: ordinary pages
            pass
    raw = np.frombuffer(m, dtype=np.uint8)
    off = (-raw.ctypes.data) % HUGE_PAGE
    return raw[off : off + nbytes].view(dt).reshape(shape)


def cpu_device_buffer(cl: Any, ctx: Any, array: np.ndarray) -> tuple[Any, np.ndarray]:
    """An OpenCL buffer for a CPU device that works on a huge-page copy of ``array`` in place.

    Returns the buffer and the host array behind it; the caller keeps the
    array alive as long as the buffer (``USE_HOST_PTR``: the device reads
    and writes that memory directly).
    """
    host = huge_page_array(array.shape, array.dtype)
    host[...] = array
    return cl.Buffer(ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=host), host

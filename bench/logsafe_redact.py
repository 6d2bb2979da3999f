#!/usr/bin/env python3
"""What ``rkckpt.logsafe.redact`` costs per log message: a signed-request header line, a big -vv listing body.

At ``-vv`` botocore logs whole response bodies (an S3 listing of thousands
of checkpoints is most of a megabyte) and every record goes through
``redact``. Prints the median of ``--rounds`` timings per message kind.
Figures only; nothing here is asserted. Compare two trees by running it
with each on ``PYTHONPATH``, interleaved:

    for i in 1 2 3; do for t in main h3; do PYTHONPATH=/work/$t/plugin python3 bench/logsafe_redact.py; done; done
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from rkckpt.logsafe import redact

HEADER = (
    "Sending http request: <AWSPreparedRequest stream_output=False, method=GET, url=http://127.0.0.1:8333/rktest?list-type=2"
    "&prefix=t%2F, headers={'User-Agent': b'aiobotocore/3.10.0', 'X-Amz-Date': b'20261207T055851Z', 'Authorization': "
    "b'AWS4-HMAC-SHA256 Credential=AKID/2026/s3, Signature=ab12', 'amz-sdk-invocation-id': b'803c3ee4'}>"
)


def messages(objects: int) -> dict[str, str]:
    rng = random.Random(1)
    listing = (
        "<ListBucketResult>"
        + "".join(f"<Contents><Key>prefix/wavesim-{i:012d}-delta.rk.h5</Key><Size>{i}</Size></Contents>" for i in range(objects))
        + "</ListBucketResult>"
    )
    words = " ".join("_".join(rng.choice(["abc", "def_ghi", "x1", "tok", "sec"]) for _ in range(30)) for _ in range(objects // 3))
    return {"header line": HEADER, f"listing of {objects}": listing, "identifier soup": words}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=8000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    for name, text in messages(args.objects).items():
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            redact(text)
            times.append(time.perf_counter() - t)
        print(f"{name:20s} {len(text):>9d} chars  median {statistics.median(times) * 1e3:9.2f} ms")


if __name__ == "__main__":
    main()

"""Cost of voucher tokens on this machine: signing (per issued voucher) and verifying.

    .venv/bin/python -m loadtest.bench_vouchers [--n 20000]

Prints a table; not a test. Signing runs only for claims that issue or return a voucher.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jwt

from engine.claims import Voucher
from engine.vouchers import VoucherSigner


def _per_op_us(fn: object, n: int) -> float:
    assert callable(fn)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    n = parser.parse_args().n
    now = int(time.time() * 1000)
    voucher = Voucher(
        "v0123456789abcdef.d_0123456789abcdef",
        "d_0123456789abcdef",
        "u-123456",
        "m-42",
        1,
        now,
        now + 86_400_000,
    )
    with tempfile.TemporaryDirectory() as tmp:
        signer = VoucherSigner(Path(tmp))
        token = signer.sign(voucher)
        key = signer.ring.signing.private
        payload = jwt.decode(token, options={"verify_signature": False})
        headers = {"kid": signer.kid, "typ": "vch+jwt"}
        rows = [
            ("sign (engine, hand-built JWS)", _per_op_us(lambda: signer.sign(voucher), n)),
            (
                "sign (jwt.encode, for comparison)",
                _per_op_us(lambda: jwt.encode(payload, key, "ES256", headers=headers), n),
            ),
            ("verify (engine, server side)", _per_op_us(lambda: signer.verify(token), n)),
        ]
    print(f"{'operation':<36} {'us/op':>8} {'ops/s/core':>11}")
    for name, us in rows:
        print(f"{name:<36} {us:8.1f} {1e6 / us:11.0f}")


if __name__ == "__main__":
    main()

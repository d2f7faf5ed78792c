"""Bytes and seconds of CKKS aggregation: n clients encrypt D floats, the server sums, the key holder decrypts.

Clients are simulated one after the other, each encrypting a fresh random
vector (uniform in ``[-max_abs_value, max_abs_value]``) that the server adds at
once, so memory stays at a few uploads whatever n is. Printed: upload bytes per
client and per value, the ratio to the ``4 * D`` bytes of float32, the context
each client downloads, the encrypted sum's bytes, client encryption seconds
(mean), server seconds (total and per added client), decryption seconds, and the
largest absolute error of the decrypted sum against the numpy float64 sum, next
to the error model's per-value standard deviation and tolerance.

Scaling to the realistic round (n = 943, D = 280,000): bytes per client and
encryption seconds per client do not depend on n (clients encrypt in parallel
on their own machines); the server's time grows linearly in n (multiply the
per-client figure by 943); decryption does not depend on n; the error's
standard deviation grows as ``sqrt(n)`` (``--n-clients 943`` runs the full round:
several minutes on two cores, dominated by encryption, which here is serial).

Usage::

    python benchmarks/bench_ckks.py                       # n = 20, D = 280,000, default parameters
    python benchmarks/bench_ckks.py --params compact --custody shared-clients --wire seeded
    python benchmarks/bench_ckks.py --n-clients 943 --json out.json
    python benchmarks/bench_ckks.py --params packed --wire packed --dim 579850   # the backend's format
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from gfmfr_secure.rng import numpy_rng
from gfmfr_secure.secagg.ckks import PACKING, PRESETS, CKKSAggregator, Encryptor, KeyHolder


def run(n_clients: int, dim: int, params_name: str, custody: str, wire: str | None, seed: int, n_threads: int) -> dict:
    """One simulated round; returns the measurements as a dict."""
    params = PRESETS[params_name]
    t0 = time.perf_counter()
    holder = KeyHolder(params, custody=custody, n_threads=n_threads)  # type: ignore[arg-type]
    keygen_s = time.perf_counter() - t0
    w = holder.default_wire if wire is None else wire
    client_ctx = holder.client_context_bytes()
    public_ctx = holder.public_context_bytes()
    encryptor = Encryptor(client_ctx, params, dim, wire=w, n_threads=n_threads)  # type: ignore[arg-type]
    server = CKKSAggregator(public_ctx, params, dim, wire=w, n_threads=n_threads)  # type: ignore[arg-type]
    decryptor = holder.decryptor(dim, wire=w)  # type: ignore[arg-type]

    rng = numpy_rng(seed, "bench-ckks")
    b = params.max_abs_value
    exact = np.zeros(dim)
    enc_s, agg_s, up_bytes = [], 0.0, []
    for _ in range(n_clients):
        x = rng.uniform(-b, b, size=dim)
        exact += x
        t0 = time.perf_counter()
        upload = encryptor.encrypt(x)
        enc_s.append(time.perf_counter() - t0)
        up_bytes.append(sum(len(c) for c in upload))
        t0 = time.perf_counter()
        server.add(upload)
        agg_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    enc_sum = server.result()
    agg_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    total = decryptor.decrypt(enc_sum)
    dec_s = time.perf_counter() - t0

    symmetric = custody == "shared-clients"
    packing = PACKING[w]
    per_client = float(np.mean(up_bytes))
    return {
        "params": params_name,
        **params.to_dict(),
        "custody": custody,
        "wire": w,
        "n_clients": n_clients,
        "dim": dim,
        "n_ciphertexts": encryptor.n_ciphertexts,
        "bytes_up_per_client": per_client,
        "bytes_per_value": per_client / dim,
        "ratio_to_float32": per_client / (4.0 * dim),
        "bytes_down_per_client": len(client_ctx),
        "bytes_public_context": len(public_ctx),
        "bytes_encrypted_sum": sum(len(c) for c in enc_sum),
        "keygen_s": keygen_s,
        "encrypt_s_mean": float(np.mean(enc_s)),
        "encrypt_s_max": float(np.max(enc_s)),
        "aggregate_s": agg_s,
        "aggregate_s_per_client": agg_s / n_clients,
        "decrypt_s": dec_s,
        "max_abs_error": float(np.max(np.abs(total - exact))),
        "error_std": float(np.std(total - exact)),
        "model_error_std": params.error_std(n_clients, symmetric=symmetric, packing=packing),
        "model_tolerance": params.release_tolerance(n_clients, dim, symmetric=symmetric, packing=packing),
        "flooding_std": decryptor.flooding_std,
        "model_error_std_943": params.error_std(943, symmetric=symmetric, packing=packing),
        "server_s_943_estimate": agg_s / n_clients * 943,
        "load_avg_1min": os.getloadavg()[0],
    }


def report(r: dict) -> str:
    """Human-readable lines for one run."""
    return "\n".join(
        [
            (
                f"params {r['params']}: N={r['poly_modulus_degree']} primes={r['coeff_mod_bit_sizes']} "
                f"scale=2^{r['global_scale_bits']}  custody={r['custody']} wire={r['wire']}"
            ),
            (
                f"n={r['n_clients']} D={r['dim']} ciphertexts/client={r['n_ciphertexts']}  "
                f"(load average {r['load_avg_1min']:.2f})"
            ),
            (
                f"upload bytes/client      {r['bytes_up_per_client']:,.0f}  ({r['bytes_per_value']:.2f} B/value, "
                f"{r['ratio_to_float32']:.2f}x float32)"
            ),
            (
                f"download (context)       {r['bytes_down_per_client']:,} bytes/client once; aggregator context "
                f"{r['bytes_public_context']:,}; encrypted sum {r['bytes_encrypted_sum']:,}"
            ),
            f"encrypt s/client         {r['encrypt_s_mean']:.3f} (max {r['encrypt_s_max']:.3f})",
            (
                f"server aggregate s       {r['aggregate_s']:.3f} total, {r['aggregate_s_per_client']:.4f} per client "
                f"(-> ~{r['server_s_943_estimate']:.1f} s for 943 clients)"
            ),
            f"decrypt s                {r['decrypt_s']:.3f}",
            (
                f"max |error| of the sum   {r['max_abs_error']:.2e}  (std {r['error_std']:.2e}; model std "
                f"{r['model_error_std']:.2e} plus flooding {r['flooding_std']:.2e}, tolerance {r['model_tolerance']:.2e}; "
                f"model std at n=943 "
                f"{r['model_error_std_943']:.2e})"
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-clients", type=int, default=20, help="clients in the round (default 20; realistic 943)")
    ap.add_argument("--dim", type=int, default=280_000, help="floats per client (default 280,000)")
    ap.add_argument("--params", choices=sorted(PRESETS), default="default", help="parameter preset")
    ap.add_argument("--custody", choices=["authority", "shared-clients"], default="authority")
    ap.add_argument("--wire", choices=sorted(PACKING), default=None, help="default: the custody's slot format (the backend uses packed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the plaintext vectors (encryption is not seeded)")
    ap.add_argument("--n-threads", type=int, default=1, help="threads of the TenSEAL contexts")
    ap.add_argument("--json", default=None, help="also write the measurements to this file")
    args = ap.parse_args(argv)
    if args.n_clients < 1 or args.dim < 1:
        ap.error("--n-clients and --dim must be >= 1")
    r = run(args.n_clients, args.dim, args.params, args.custody, args.wire, args.seed, args.n_threads)
    print(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

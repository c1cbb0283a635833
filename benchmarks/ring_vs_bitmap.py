"""Where does the dirty ring stop paying off against the dirty bitmap?

Sweeps the guest's dirty rate (uniformly random 4 KiB writes over 5/6 of RAM, as in Peter Xu's
measurement, docs/reference/migration.md s3) and the guest memory size, migrates each VM once
with each collector (QEMU defaults otherwise: 4096-entry rings, a 1 s reaper; the bitmap with
manual protect and 1 GiB lazy CLEARs) and prints a Markdown table: total migration time,
downtime and the vCPU time lost to dirty tracking (write-protect faults, ring-full exits, big-lock
stalls) for both, and which collector wins. The ring's costs follow the dirty rate, the
bitmap's the memory size (kvm-dirty-ring.md s8); the summary gives, per memory size, the dirty
rates at which the ring still migrates faster.

    python benchmarks/ring_vs_bitmap.py [--rates 5,25,100,400,800] [--memories 4,16,64,256] [--host arm64-4k]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringenv.vmm import MigrationRun  # noqa: E402


def scenario(mem_gib: int, rate_mbps: float, args) -> dict:
    return {
        "name": f"sweep-{mem_gib}g-{rate_mbps:g}",
        "host": args.host,
        "vm": {"memory": f"{mem_gib}GiB", "vcpus": args.vcpus},
        "workload": {"name": f"uniform-{rate_mbps:g}",
                     "regions": [{"name": "random", "fraction": 0.8333, "rate_mbps": rate_mbps,
                                  "layout": "scattered"}]},
        "link": {"gbps": args.gbps, "max_bandwidth_mibps": "link", "downtime_limit_ms": 300,
                 "device_state_bytes": "2MiB", "give_up_s": args.give_up_s},
        "ring_entries": args.ring_entries, "interval_ms": 1000, "seed": args.seed,
    }


def lost_vcpu_s(m) -> float:
    return m.vcpu_fault_s + m.vcpu_exit_s + m.vcpu_stall_s + m.vcpu_throttle_s


def fmt_time(m) -> str:
    return f"{m.total_s:.1f}" if m.converged else f">{m.total_s:.0f} (forced)"


def sweep(args) -> list[dict]:
    rows = []
    for mem in args.memories:
        for rate in args.rates:
            res = {}
            for coll in ("ring", "bitmap"):
                t0 = time.perf_counter()
                res[coll] = MigrationRun(scenario(mem, rate, args), collector=coll).run()
                if not res[coll].verified:
                    raise SystemExit(f"lost writes in {mem} GiB / {rate} MB/s / {coll}: a bug")
                print(f"  {mem:4d} GiB {rate:6g} MB/s {coll:6s}: {res[coll].total_s:7.1f} s "
                      f"({time.perf_counter() - t0:.1f} s wall)", file=sys.stderr, flush=True)
            rows.append({"mem": mem, "rate": rate, **res})
    return rows


def winner(r, b) -> str:
    if r.converged != b.converged:
        return "ring" if r.converged else "bitmap"
    if not r.converged:
        return "neither converges"
    d = (r.total_s - b.total_s) / b.total_s
    if abs(d) < 0.01:
        return "tie (<1%)"
    return f"ring ({-100 * d:.0f}% faster)" if d < 0 else f"bitmap ({100 * d:.0f}% faster)"


def table(rows, args) -> str:
    out = [f"Migration over {args.gbps:g} Gb/s, {args.vcpus} vCPUs, host {args.host}, uniform random writes over 5/6 "
           f"of RAM; ring {args.ring_entries} entries reaped every 1 s vs dirty bitmap (manual protect, 1 GiB CLEARs); "
           f"vCPU overhead = write-protect faults + ring-full exits + big-lock stalls, summed over vCPUs.",
           "",
           "| RAM | dirty rate | total ring (s) | total bitmap (s) | downtime ring / bitmap (ms) | "
           "vCPU overhead ring / bitmap (s) | faster |",
           "|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        r, b = row["ring"], row["bitmap"]
        out.append(f"| {row['mem']} GiB | {row['rate']:g} MB/s | {fmt_time(r)} | {fmt_time(b)} | "
                   f"{1000 * r.downtime_s:.0f} / {1000 * b.downtime_s:.0f} | "
                   f"{lost_vcpu_s(r):.2f} / {lost_vcpu_s(b):.2f} | {winner(r, b)} |")
    out += ["", "Where the ring stops paying off (total migration time; within 1% counts as a tie):", ""]
    for mem in args.memories:
        mine = [row for row in rows if row["mem"] == mem]
        def ring_ok(row):
            r, b = row["ring"], row["bitmap"]
            return r.converged and (not b.converged or r.total_s <= 1.01 * b.total_s)
        good = [row["rate"] for row in mine if ring_ok(row)]
        bad = [row["rate"] for row in mine if not ring_ok(row)]
        if not good:
            verdict = "the bitmap is faster at every dirty rate tried"
        elif not bad:
            verdict = f"the ring is as fast or faster at every dirty rate tried (up to {max(good):g} MB/s)"
        elif max(good) < min(bad):
            verdict = (f"the ring is as fast or faster up to {max(good):g} MB/s, "
                       f"the bitmap faster from {min(bad):g} MB/s")
        else:
            verdict = (f"ring as fast or faster at {', '.join(f'{x:g}' for x in good)} MB/s; "
                       f"bitmap faster at {', '.join(f'{x:g}' for x in bad)} MB/s")
        out.append(f"- {mem} GiB: {verdict}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="5,25,100,400,800", help="dirty rates in MB/s, comma-separated")
    ap.add_argument("--memories", default="4,16,64,256", help="guest memory sizes in GiB, comma-separated")
    ap.add_argument("--host", default="arm64-4k")
    ap.add_argument("--vcpus", type=int, default=8)
    ap.add_argument("--gbps", type=float, default=10.0)
    ap.add_argument("--ring-entries", type=int, default=4096)
    ap.add_argument("--give-up-s", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",")]
    args.memories = [int(x) for x in args.memories.split(",")]
    t0 = time.perf_counter()
    rows = sweep(args)
    print(table(rows, args))
    print(f"\n({time.perf_counter() - t0:.0f} s wall)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

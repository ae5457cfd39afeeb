"""Turns bench/out/results.jsonl into the Markdown tables of BENCHMARKS.md."""
import json
import os
import sys

HZ = os.sysconf("SC_CLK_TCK")
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
storms = [r for r in rows if r["proxy"] == "storm"]
rows = [r for r in rows if r["proxy"] != "storm"]
direct_p99 = {}
for r in rows:
    if r["proxy"] == "direct" and r["mode"] == "rate":
        direct_p99.setdefault(r["protocol"], []).append(r["result"]["p99_us"])

print("| proxy | protocol | mode | run | req/s | p50 µs | p99 µs | p99.9 µs | added p99 µs | proxy CPU s | req per CPU-s | peak RSS MiB | errors |")
print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    res = r["result"]
    cpu = r["cpu_ticks"] / HZ
    eff = f"{res['ok'] / cpu:,.0f}" if cpu > 0 else "-"
    added = "-"
    # Over TLS the load generator cannot go direct: the added p99 is then
    # against the plaintext direct run, so it includes the TLS the proxy adds.
    plain = r["protocol"].removesuffix("-tls")
    if r["mode"] == "rate" and r["proxy"] != "direct" and plain in direct_p99:
        base = min(direct_p99[plain])
        added = f"{res['p99_us'] - base:+d}"
    rss = f"{r['peak_rss_kib'] / 1024:.1f}" if r["peak_rss_kib"] else "-"
    print(
        f"| {r['proxy']} | {r['protocol']} | {r['mode']} | {r['run']} | {res['rps']:,} | {res['p50_us']} | "
        f"{res['p99_us']} | {res['p999_us']} | {added} | {cpu:.2f} | {eff} | {rss} | {res['errors']} |"
    )

for r in storms:
    res = r["result"]
    calls = res["ok"] + res["errors"]
    extra = r["served"] - calls
    seconds = float(sys.argv[2].rstrip("s"))
    allowed = 0.2 * calls + 10 * min(seconds, 10)
    print()
    print("Retry storm (upstream failing 50%, retries on, breaker off):")
    print(f"- caller requests: {calls:,} ({res['ok']:,} answered 200, {res['errors']:,} failed)")
    print(f"- upstream requests: {r['served']:,}; extra load from retries: {extra:,} ({extra / calls:.1%})")
    print(f"- the budget allows 20% of requests + 10/s over its 10 s window: {allowed:,.0f}")

#!/usr/bin/env python3
"""Turns the measurements of scripts/bench-peers into docs/BENCHMARKS.md and the chart's data.

usage: bench-peers-report.py RESULTS VERSIONS COMMANDS RUNS QUICK OUT_MD OUT_RATIOS

RESULTS is tab-separated: workload, system, value (a number, or "failed: why").
"""

import statistics
import sys

# workload -> (title, unit, higher is better)
WORKLOADS = {
    "write": ("Sequential write of the big file (cp, to the end of close)", "MiB/s", True),
    "read": ("Sequential read of the big file (cat, cold)", "MiB/s", True),
    "fio-4k": ("fio random 4 KiB reads", "MiB/s", True),
    "fio-256k": ("fio random 256 KiB reads", "MiB/s", True),
    "create-small": ("Creating 4 KiB files (cp -r)", "files/s", True),
    "create-small-wb": (
        "Creating 4 KiB files with write-back (cp -r, until it returns; S3 then gets them all)",
        "files/s",
        True,
    ),
    "read-small": ("Reading the 4 KiB files back (cat, 4 readers at a time, cold)", "files/s", True),
    "ls": ("ls -l of a directory", "s", False),
    "find": ("find over a tree", "s", False),
    "rsync": ("rsync -a of a tree", "s", False),
    "rsync-again": ("second rsync -a, nothing changed", "s", False),
    "first-byte": ("First byte of a small file (head -c 1, fresh mount)", "ms", False),
    "write-rss": ("Peak RSS of the mount process during the write", "MiB", False),
    "read-rss": ("Peak RSS of the mount process during the read", "MiB", False),
    "write-cpu": ("CPU-seconds per GiB written (mount process, plus cp's system time)", "s/GiB", False),
    "read-cpu": ("CPU-seconds per GiB read (mount process, plus cat's system time)", "s/GiB", False),
    "read-par": ("4 different files read at once (cat, cold, aggregate)", "MiB/s", True),
    "write-par": ("8 files written at once (cp, to the end of every close, aggregate)", "MiB/s", True),
    "read-cached": (
        "Repeated read of the big file from the mount's disk cache (fresh mount, page cache dropped)",
        "MiB/s",
        True,
    ),
}
SYSTEMS = [
    "s3mount", "s3mount-pt", "s3mount-wb", "s3fs", "rclone-writes", "rclone-off", "direct", "rclone-direct", "local-disk",
    "local-disk-again", "local-disk-copy", "local-disk-twin",
]
NAMES = {
    "s3mount": "s3mount",
    "s3mount-pt": "s3mount --cache-passthrough",
    "s3mount-wb": "s3mount --write-back",
    "s3fs": "s3fs-fuse",
    "rclone-writes": "rclone mount (writes)",
    "rclone-off": "rclone mount (off)",
    "direct": "direct: our client",
    "rclone-direct": "direct: rclone copyto/cat",
    "local-disk": "local disk (dd, a new file of new bytes)",
    "local-disk-again": "local disk (dd, the file read before)",
    "local-disk-copy": "local disk (dd, a copy of a file just read)",
    "local-disk-twin": "local disk (dd, the cache's file of the twin object)",
}
PEERS = ["s3fs", "rclone-writes", "rclone-off"]
WRITES = {
    "write", "write-rss", "write-cpu", "write-par", "create-small", "create-small-wb", "read-small", "rsync",
    "rsync-again",
}
# Which s3mount a workload measures: write-back's own workload is its mode's.
OURS = {"create-small-wb": "s3mount-wb"}
DIRECT_ONLY = {"write", "read", "first-byte", "read-par", "write-par"}
# The VFS cache mode changes how rclone reads and writes file data, not how it lists.
LISTINGS = {"ls", "find"}
# rclone reads a file opened read-only the same way in both modes.
READS = {"read", "read-rss", "read-cpu", "read-par", "fio-4k", "fio-256k"}


def why_missing(workload, system):
    if system in ("local-disk", "local-disk-again", "local-disk-copy", "local-disk-twin", "s3mount-pt"):
        return "only for the repeated read"
    if workload == "read-cached" and system == "rclone-writes":
        return "see rclone mount (off): measured with --vfs-cache-mode full"
    if system == "s3mount-wb":
        return "not run: write-back changes only how closes wait (see its own workload)"
    if workload == "create-small-wb" and system in ("s3mount", "s3fs"):
        return "no write-back mode" if system == "s3fs" else "see create-small (closes wait for S3)"
    if system in ("direct", "rclone-direct"):
        if workload in DIRECT_ONLY:
            return "not measured"
        return "no mount: does not apply"
    if system == "rclone-off" and workload in WRITES:
        return "not run: rclone needs --vfs-cache-mode writes for these"
    if system == "rclone-writes" and workload in READS:
        return "not run: rclone reads files opened read-only the same way in both modes (see off)"
    if system == "rclone-off" and workload in LISTINGS:
        return "not run: the cache mode does not change listings (see writes mode)"
    return "no result"


def main():
    results_path, versions_path, commands_path, runs, quick, out_md, out_ratios = sys.argv[1:8]
    values = {}
    failures = {}
    for line in open(results_path):
        workload, system, value = line.rstrip("\n").split("\t", 2)
        try:
            values.setdefault((workload, system), []).append(float(value))
        except ValueError:
            failures.setdefault((workload, system), []).append(value)
    resends = {
        s: values.get(("rsync-again-files", s)) for s in SYSTEMS if ("rsync-again-files", s) in values
    }

    def median(w, s):
        v = values.get((w, s))
        return statistics.median(v) if v else None

    def failed(w, s):
        reasons = failures[(w, s)]
        count = len(reasons) + len(values.get((w, s), []))
        return reasons[0] if len(reasons) == count else f"{reasons[0]} in {len(reasons)} of {count} runs"

    def advantage(w, peer):
        """How many times better s3mount is than `peer` (> 1: s3mount is better)."""
        # A system that failed in any run failed the workload.
        us = OURS.get(w, "s3mount")
        if (w, us) in failures or (w, peer) in failures:
            return None
        ours, theirs = median(w, us), median(w, peer)
        if not ours or not theirs:
            return None
        higher = WORKLOADS[w][2]
        return ours / theirs if higher else theirs / ours

    out = []
    out.append("# Benchmarks: s3mount and its peers\n")
    out.append(
        "Generated by `scripts/bench-peers%s`; do not edit by hand. Every system ran against the\n"
        "same local Garage server on the same machine in the same run; each measurement had a fresh\n"
        "mount and dropped page caches; the order of the systems turns by one each run. Values\n"
        "are the median of %s run(s), with min and max; ls and find, which take the peers minutes\n"
        "at 100,000 and 200,000 keys, ran in the first run only.\n"
        "The last column is s3mount's advantage over that system: its rate divided by theirs, or\n"
        "their time (or memory) divided by s3mount's, so above 1 means s3mount is better.\n"
        % (" --quick" if quick == "1" else "", runs)
    )
    out.append("## Machine and versions\n")
    out.append(open(versions_path).read())
    out.append("## Commands\n")
    out.append(open(commands_path).read())
    if quick == "1":
        out.append(
            "\nThis is a --quick run: smaller files and trees (see the script), one run; the full\n"
            "run uses a 2 GiB file, a 1 GiB fio file, 1,000 small files, 100,000 and 200,000 keys.\n"
        )
    out.append("\n## Targets\n")
    targets = []
    for w in WORKLOADS:
        for peer, need in (("s3fs", 1.5), ("rclone-writes", 1.0), ("rclone-off", 1.0)):
            a = advantage(w, peer)
            if a is None:
                if median(w, "s3mount") and (w, "s3mount") not in failures and (w, peer) in failures:
                    targets.append((f"{w}: vs {NAMES[peer]} at least {need}x", True,
                                    f"{NAMES[peer]} {failed(w, peer)}"))
                continue
            targets.append((f"{w}: vs {NAMES[peer]} at least {need}x", a >= need, f"{a:.2f}x"))
    wb, sync = median("create-small-wb", "s3mount-wb"), median("create-small", "s3mount")
    if wb and sync:
        targets.append(("create-small: write-back at least 3x the synchronous mode", wb >= 3 * sync,
                        f"{wb / sync:.2f}x"))
    for w, share in (("read", 0.9), ("write", 0.95)):
        ours, direct = median(w, "s3mount"), median(w, "direct")
        if ours and direct:
            targets.append(
                (f"{w}: at least {share:.0%} of our direct client", ours >= share * direct,
                 f"{100 * ours / direct:.0f}%")
            )
    for w in ("write-cpu", "read-cpu"):
        cpu = {s: median(w, s) for s in ("s3mount", "s3fs", "rclone-writes" if w == "write-cpu" else "rclone-off")}
        if all(cpu.values()):
            lowest = min(cpu, key=cpu.get)
            targets.append((f"{w}: the lowest of the three mounts", lowest == "s3mount",
                            ", ".join(f"{NAMES[s]} {v:.2f}" for s, v in cpu.items())))
    for w in ("write-rss", "read-rss"):
        ours = median(w, "s3mount")
        if ours:
            targets.append((f"{w}: under 48 MiB", ours < 48, f"{ours:.0f} MiB"))
    # The local disk reading a file in the state of the cached one: the cache's own file of
    # another object, cached in the same minute the same way.
    disk = median("read-cached", "local-disk-twin")
    for system in ("s3mount", "s3mount-pt"):
        cached = median("read-cached", system)
        if cached and disk:
            targets.append((f"read-cached: {NAMES[system]} at least 90% of the local disk",
                            cached >= 0.9 * disk, f"{100 * cached / disk:.0f}%"))
    a = advantage("first-byte", "s3fs")
    if a:
        targets.append(("first-byte: at most 0.7x s3fs's", 1 / a <= 0.7, f"{1 / a:.2f}x"))
    for w, need in (("ls", 2.0), ("find", 2.0), ("read-par", 1.5), ("write-par", 1.5)):
        peers = [p for p in PEERS if median(w, p) and (w, p) not in failures]
        if not peers or not median(w, "s3mount"):
            continue
        best = max(peers, key=lambda p: median(w, p) if WORKLOADS[w][2] else -median(w, p))
        a = advantage(w, best)
        if a is not None:
            targets.append((f"{w}: at least {need}x the faster peer ({NAMES[best]})", a >= need, f"{a:.2f}x"))
    rss = {s: median("write-rss", s) for s in ("s3mount", "s3fs", "rclone-writes")}
    if all(rss.values()):
        lowest = min(rss, key=rss.get)
        targets.append(
            ("lowest peak RSS during the write", lowest == "s3mount",
             ", ".join(f"{NAMES[s]} {v:.0f} MiB" for s, v in rss.items()))
        )
    met = sum(1 for _, ok, _ in targets if ok)
    out.append(f"{met} of {len(targets)} met.\n")
    out.append("| target | met | measured |\n| --- | --- | --- |")
    for name, ok, measured in targets:
        out.append(f"| {name} | {'yes' if ok else '**no**'} | {measured} |")
    out.append("")

    ratio_rows = []
    for w, (title, unit, higher) in WORKLOADS.items():
        out.append(f"## {title}\n")
        out.append(f"{'Higher' if higher else 'Lower'} is better. Unit: {unit}.\n")
        out.append("| system | median | min | max | s3mount advantage |")
        out.append("| --- | --- | --- | --- | --- |")
        for s in SYSTEMS:
            v = values.get((w, s))
            if v:
                a = advantage(w, s) if s != OURS.get(w, "s3mount") else None
                extra = f" ({failed(w, s)})" if (w, s) in failures else ""
                if w == "rsync-again" and resends.get(s):
                    extra = f" ({statistics.median(resends[s]):.0f} files sent)"
                out.append(
                    f"| {NAMES[s]} | {statistics.median(v):.2f}{extra} | {min(v):.2f} | {max(v):.2f} | "
                    f"{'' if a is None else f'{a:.2f}x'} |"
                )
            else:
                reason = failed(w, s) if (w, s) in failures else why_missing(w, s)
                out.append(f"| {NAMES[s]} | {reason} | | | |")
        out.append("")
        ratio_rows.append(
            (w, [advantage(w, p) for p in PEERS])
        )
    with open(out_md, "w") as f:
        f.write("\n".join(out).rstrip() + "\n\n![s3mount's advantage over each peer](benchmarks.png)\n")
    with open(out_ratios, "w") as f:
        f.write("workload " + " ".join(f'"{NAMES[p]}"' for p in PEERS) + "\n")
        for w, ratios in ratio_rows:
            f.write(w + " " + " ".join("?" if r is None else f"{r:.3f}" for r in ratios) + "\n")


if __name__ == "__main__":
    main()

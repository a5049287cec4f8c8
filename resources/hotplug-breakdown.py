#!/usr/bin/env python3
"""Where the time of each hotplug step goes: the breakdown of a resources/bench-hotplug.sh run.

Reads the bench's console log (default build/logs/bench-hotplug.log): its "HOST stamped MODE MS
LINE" lines are every console line of the guest and every log line of rvmm (RUST_LOG debug for
hotplug) with the test host's uptime when they arrived, and the bench's own "bench STEP" notes
(when it started a step, when the command returned). The guest's kernel log (GUEST klog, from
rvmm.klog=1) is put on the same clock through the "rvmm klog_clock" line the guest wrote into it
and the arrival of the guest's markers that carry its uptime (GUEST klog_clock, monitor done,
up: the earliest-arriving); rvmm's log through its own timestamps and their lines' arrival.

Prints, per kind of step and mode, the median time from the bench's command to each milestone
(and how many of the step's samples had it, when not all) as a Markdown table, milestones in the
order they happen. Resolution: 10 ms (the test host's /proc/uptime); rvmm's own lines
are placed to the millisecond.

Usage: hotplug-breakdown.py [LOG]
"""

import re
import statistics
import sys
from datetime import datetime

STAMPED = re.compile(r"^HOST stamped (\S+) (\d+) (.*)$")
RVMM_LOG = re.compile(r"^rvmm_log \[(\S+) +\S+ +.*? \S+\] (.*)$")
SLOT_CONTROL = re.compile(r"guest slot control (0x[0-9a-f]+) -> (0x[0-9a-f]+)")
# Slot Control: Power Controller Control (1: off), Power Indicator Control (1 on, 2 blink, 3 off).
PCC = 0x400
PIC_SHIFT = 8
KLOG = re.compile(r"^GUEST klog \[ *(\d+\.\d+)\] (.*)$")
KLOG_CLOCK_LINE = re.compile(r"rvmm klog_clock (\d+\.\d+)")
# Guest markers that carry the guest's uptime when printed: their arrival ties the two clocks
# (the earliest-arriving one best: a marker behind a burst of console output arrives late).
CLOCK_MARKER = re.compile(r"^GUEST (?:klog_clock|monitor done|up) (\d+\.\d+)$")
STEP = re.compile(r"^bench (\S+)$")

# (milestone, source, pattern): the first line of the step that matches names the milestone.
# Sources: rvmm (its log), klog (guest kernel), guest (the guest's console markers), bench.
MILESTONES = [
    ("rvmm: request taken by the controller", "rvmm", r"hot-add of .* asked|removal of .* asked"),
    ("rvmm: device announced in its slot while it opens", "rvmm", r"announced in slot \d+ while"),
    ("rvmm: device opened and mapped (VFIO, DMA)", "rvmm",
     r"open in \d+ ms, (waiting for its slot|in slot \d+ since)"),
    ("rvmm: device in its slot, guest notified", "rvmm", r"in slot \d+$"),
    ("rvmm: GED interrupt raised", "rvmm", r"raising the GED"),
    ("guest: GED _EVT read the event", "rvmm", r"ged: the guest read events"),
    ("guest: PCNT read the slot notifications", "rvmm", r"the guest read notifications"),
    ("guest kernel: pciehp slot event", "klog",
     r"pciehp: Slot\(\d+\): (Card present|Link Up|Attention button pressed|Link Down|Card not present)"),
    ("guest kernel: pciehp powering off (after 5 s)", "klog", r"Powering off due to button press"),
    ("guest kernel: PCI device found", "klog", r"pci 0000:0\d:00\.0: \[1b36:0010\]"),
    ("guest kernel: nvme probe", "klog", r"nvme nvme\d+: pci function"),
    ("guest: _OST", "rvmm", r"guest Ost"),
    ("guest kernel: nvme queues up", "klog", r"nvme nvme\d+: \d+/\d+/\d+ default/read/poll queues"),
    ("guest: power indicator blinks (pciehp took the event)", "slot", r"^indicator blinks$"),
    ("guest: slot power on", "slot", r"^power on$"),
    ("guest: power indicator on", "slot", r"^indicator on$"),
    ("guest: slot power off", "slot", r"^power off$"),
    ("guest: power indicator off (a removal's end, 1 s after power off)", "slot", r"^indicator off$"),
    ("guest: _EJ0", "rvmm", r"guest Ejected"),
    ("rvmm: done (device added / released)", "rvmm", r"device \S+ added at|removed: "),
    ("bench: command returned", "bench", r"^answered$"),
    ("guest kernel: the disk's uevent reached user space", "klog", r"rvmm uwake block:(add|remove) "),
    ("guest monitor: printing its block device marker", "klog",
     r"rvmm monitor block-(added|removed) "),
    ("guest monitor: block device present", "guest", r"^GUEST block-added "),
    ("guest monitor: block device gone", "guest", r"^GUEST block-removed "),
]


def parse(path):
    """Events per mode: (host ms, source, text), and the klog clock ties."""
    modes = {}
    for raw in open(path, encoding="utf-8", errors="replace"):
        m = STAMPED.match(raw.rstrip("\n").rstrip("\r"))
        if not m:
            continue
        mode, ms, line = m.group(1), int(m.group(2)), m.group(3)
        modes.setdefault(mode, []).append((ms, line))
    return modes


def slot_changes(text):
    """What a guest Slot Control write of rvmm's log changed: power on/off, power indicator."""
    m = SLOT_CONTROL.search(text)
    if not m:
        return []
    old, new = int(m.group(1), 16), int(m.group(2), 16)
    out = []
    if old & PCC and not new & PCC:
        out.append("power on")
    if new & PCC and not old & PCC:
        out.append("power off")
    names = {1: "indicator on", 2: "indicator blinks", 3: "indicator off"}
    pic_old, pic_new = (old >> PIC_SHIFT) & 3, (new >> PIC_SHIFT) & 3
    if pic_new != pic_old and pic_new in names:
        out.append(names[pic_new])
    return out


def timeline(lines):
    """The mode's events on the test host's clock, sorted: (ms, source, text)."""
    events = []
    rvmm_offsets = []
    klog = []
    kmsg_tie = None
    clock_offsets = []
    for ms, line in lines:
        m = RVMM_LOG.match(line)
        if m:
            try:
                wall = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
            rvmm_offsets.append(ms - wall * 1000)
            events.append((wall * 1000, "rvmm", m.group(2)))
            for change in slot_changes(m.group(2)):
                events.append((wall * 1000, "slot", change))
            continue
        m = KLOG.match(line)
        if m:
            tie = KLOG_CLOCK_LINE.search(m.group(2))
            if tie:
                kmsg_tie = (float(m.group(1)), float(tie.group(1)))
            klog.append((float(m.group(1)), m.group(2)))
            continue
        m = CLOCK_MARKER.match(line)
        if m:
            clock_offsets.append(ms - float(m.group(1)) * 1000)
            continue
        m = STEP.match(line)
        if m:
            events.append((ms, "bench", m.group(1)))
            continue
        if line.startswith("GUEST "):
            events.append((ms, "guest", line))
    # rvmm's wall clock onto the uptime clock: a line arrives at most a stamp's rounding late.
    if rvmm_offsets:
        off = min(rvmm_offsets)
        events = [(t + off, s, x) if s in ("rvmm", "slot") else (t, s, x) for t, s, x in events]
    else:
        events = [e for e in events if e[1] not in ("rvmm", "slot")]
    if kmsg_tie and clock_offsets:
        # kernel time -> guest uptime -> test host uptime (ms)
        k_to_up = kmsg_tie[1] - kmsg_tie[0]
        up_to_host = min(clock_offsets)
        events += [((k + k_to_up) * 1000 + up_to_host, "klog", text) for k, text in klog]
    events.sort(key=lambda e: e[0])
    return events


def steps(events):
    """Splits the timeline at each bench step: (kind, start ms, events of the step)."""
    out = []
    current = None
    for t, source, text in events:
        if source == "bench" and text != "answered":
            current = (text, t, [])
            out.append(current)
        elif current is not None:
            current[2].append((t, source, text))
    return out


def milestones(start, events):
    """The first time (ms after start) of each milestone within one step."""
    found = {}
    for name, source, pattern in MILESTONES:
        rx = re.compile(pattern)
        for t, s, text in events:
            if s == source and rx.search(text):
                found[name] = t - start
                break
    return found


def medians(samples):
    """Milestone -> (median ms, samples that had it)."""
    out = {}
    for name, _, _ in MILESTONES:
        values = [s[name] for s in samples if name in s]
        if values:
            out[name] = (statistics.median(values), len(values))
    return out


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "build/logs/bench-hotplug.log"
    modes = parse(path)
    if not modes:
        sys.exit(f"{path}: no 'HOST stamped' lines (a bench-hotplug.sh run with stamped output)")
    # kind -> mode -> milestone -> (median, n)
    table = {}
    counts = {}
    for mode, lines in modes.items():
        by_kind = {}
        for kind, start, events in steps(timeline(lines)):
            by_kind.setdefault(kind, []).append(milestones(start, events))
        for kind, samples in by_kind.items():
            table.setdefault(kind, {})[mode] = medians(samples)
            counts.setdefault(kind, {})[mode] = len(samples)
    for kind, by_mode in table.items():
        for mode in modes:
            if mode not in by_mode:
                continue
            total = counts[kind][mode]
            print(f"\n{mode}, {kind} ({total} samples): median ms after the bench's command\n")
            print("| milestone | median ms |")
            print("|---|---|")
            rows = sorted(by_mode[mode].items(), key=lambda item: item[1][0])
            for name, (median, n) in rows:
                note = "" if n == total else f" ({n} of {total} samples)"
                print(f"| {name} | {median:.0f}{note} |")


if __name__ == "__main__":
    main()

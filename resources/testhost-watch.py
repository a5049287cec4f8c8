#!/usr/bin/env python3
"""Watches a running test host through QEMU's monitor and says where it hung.

Usage: testhost-watch.py MONITOR_SOCKET REPORT_AT_S FREEZE_S FROZE_FILE

Two jobs, both printing on stderr:

- A frozen test host ends early. QEMU 10.0's emulation of nested SVM now and then loses a CPU's
  interrupt request, and its local APIC then holds a vector in IRR that the CPU never takes
  (docs/performance.md, "The bench's test host sometimes froze"). testhost.sh's periodic timer
  tick raises the request again at the next tick; the watcher is there for a freeze that gets
  past it. A CPU that takes interrupts leaves a vector in IRR for microseconds, so one that
  stays pending across every sample for FREEZE_S seconds means the test host runs no more. So does a CPU that is not halted
  and whose registers have not changed for FREEZE_S seconds while its host thread did not run
  (a polling CPU's registers can look the same at every sample, but its thread runs). The watcher
  then prints the CPU state, writes FROZE_FILE and ends QEMU, instead of letting the run sit out
  its whole timeout.
- A run that nears its timeout (REPORT_AT_S seconds after the start) prints the same state, so
  that a test host that hung in any other way says where.

The watcher ends when QEMU closes the monitor.
"""

import os
import re
import signal
import socket
import sys
import time

SAMPLE_INTERVAL_S = 5
# Lines of `info registers` too long and too constant to help.
SKIPPED_PREFIXES = ("(qemu)", "FPR", "XMM", "YMM", "ZMM", "DR", "FCW")


class MonitorGone(Exception):
    """QEMU closed the monitor: the test host is over."""


class Monitor:
    """One connection to QEMU's human monitor."""

    def __init__(self, path, wait_s=120):
        end = time.time() + wait_s
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > end:
                    raise MonitorGone(f"no monitor at {path}")
                time.sleep(1)
        self.command("")

    def command(self, text, timeout_s=5):
        """Sends one command and returns its output (up to the next prompt)."""
        self.sock.settimeout(timeout_s)
        if text:
            self.sock.sendall(text.encode() + b"\n")
        out = b""
        while not out.endswith(b"(qemu) "):
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            except OSError as e:
                raise MonitorGone(str(e)) from e
            if not data:
                raise MonitorGone("monitor closed")
            out += data
        # The monitor echoes the command with terminal escapes on the prompt's line.
        lines = out.decode(errors="replace").replace("\r", "").split("\n")
        return "\n".join(l for l in lines if not l.startswith(SKIPPED_PREFIXES))


def vcpu_threads(monitor):
    """(cpu index, host thread id) of each test host CPU, from `info cpus`."""
    return [
        (int(m.group(1)), int(m.group(2)))
        for m in re.finditer(r"CPU #(\d+):.*?thread_id=(\d+)", monitor.command("info cpus"))
    ]


def pending_vectors(monitor, cpu):
    """The vectors in a CPU's local APIC IRR, as QEMU prints them ("" when none)."""
    m = re.search(r"^IRR\s+(.*)$", monitor.command(f"info lapic {cpu}"), re.M)
    value = m.group(1).strip() if m else ""
    return "" if value == "(none)" else value


def registers(monitor):
    """Each CPU's `info registers` text, by CPU index."""
    out = {}
    for block in re.split(r"^CPU#", monitor.command("info registers -a"), flags=re.M)[1:]:
        index, _, text = block.partition("\n")
        if index.strip().isdigit():
            out[int(index.strip())] = text
    return out


def thread_cpu_s(tid):
    """CPU time (s) the host thread has used, or None."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def thread_line(tid):
    """The host thread's state, CPU time and wait channel, from /proc."""
    try:
        with open(f"/proc/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{tid}/wchan") as f:
            wchan = f.read().strip() or "-"
    except (OSError, IndexError) as e:
        return f"host thread {tid}: {e}"
    cpu_s = thread_cpu_s(tid)
    cpu = "?" if cpu_s is None else f"{cpu_s:.2f}"
    return f"host thread {tid}: state {state}, {cpu} s of CPU, waiting in {wchan}"


def report(monitor, title):
    """The test host's CPU state, twice a second apart (spinning or stopped, in which code)."""
    out = [f"--- testhost.sh: {title} (QEMU monitor)"]
    for _ in range(2):
        threads = vcpu_threads(monitor)
        out.append(monitor.command("info cpus"))
        out.append(monitor.command("info registers -a"))
        out.append(monitor.command("x/6i $pc"))
        for cpu, tid in threads:
            out.append(monitor.command(f"info lapic {cpu}"))
            out.append(thread_line(tid))
        time.sleep(1)
    out.append("--- end of test host state")
    print("\n".join(out), file=sys.stderr, flush=True)


def end_qemu(monitor):
    """Ends QEMU: `quit` first; SIGKILL if its CPU thread does not let it quit."""
    pid = None
    threads = vcpu_threads(monitor)
    if threads:
        try:
            with open(f"/proc/{threads[0][1]}/status") as f:
                pid = int(re.search(r"^Tgid:\s+(\d+)", f.read(), re.M).group(1))
        except (OSError, AttributeError):
            pid = None
    try:
        monitor.command("quit", timeout_s=10)
    except MonitorGone:
        return
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def frozen_by_interrupts(monitor, cpu, now, pending_since, freeze_s):
    """Why CPU is frozen if an interrupt has stayed pending in its IRR for freeze_s, else None."""
    vectors = pending_vectors(monitor, cpu)
    if not vectors:
        pending_since.pop(cpu, None)
        return None
    first, seen = pending_since.get(cpu, (now, None))
    if seen != vectors:
        first = now
    pending_since[cpu] = (first, vectors)
    if now - first < freeze_s:
        return None
    return (
        f"its CPU {cpu} has had interrupt vector {vectors} pending for {now - first:.0f} s "
        "and took no interrupt"
    )


def frozen_in_place(cpu, tid, regs, now, still_since, freeze_s):
    """Why CPU is frozen if it is not halted, has not moved and its thread has not run, else None."""
    if regs is None or "HLT=0" not in regs:
        still_since.pop(cpu, None)
        return None
    cpu_s = thread_cpu_s(tid)
    first, seen, first_cpu_s = still_since.get(cpu, (now, None, cpu_s))
    if seen != regs:
        first, first_cpu_s = now, cpu_s
    still_since[cpu] = (first, regs, first_cpu_s)
    if now - first < freeze_s or cpu_s is None or first_cpu_s is None:
        return None
    if cpu_s - first_cpu_s > 0.5:
        return None
    return (
        f"its CPU {cpu}, not halted, has not moved for {now - first:.0f} s and its host thread "
        f"ran {cpu_s - first_cpu_s:.2f} s of it"
    )


def watch(monitor, start, report_at_s, freeze_s, froze_file):
    """Samples every CPU until QEMU ends, it freezes or the report time comes."""
    pending_since = {}
    still_since = {}
    while True:
        now = time.time()
        if now - start >= report_at_s:
            report(monitor, "test host state before the timeout")
            return
        regs = registers(monitor)
        for cpu, tid in vcpu_threads(monitor):
            why = frozen_by_interrupts(monitor, cpu, now, pending_since, freeze_s)
            why = why or frozen_in_place(cpu, tid, regs.get(cpu), now, still_since, freeze_s)
            if why:
                title = (
                    f"the test host froze: {why} (QEMU's nested SVM emulation; "
                    f"{now - start:.0f} s into the run)"
                )
                report(monitor, title)
                with open(froze_file, "w") as f:
                    f.write(title + "\n")
                end_qemu(monitor)
                return
        time.sleep(SAMPLE_INTERVAL_S)


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__.split("\n\n")[1])
    path, report_at_s, freeze_s, froze_file = sys.argv[1:]
    start = time.time()
    try:
        monitor = Monitor(path)
        watch(monitor, start, float(report_at_s), float(freeze_s), froze_file)
    except MonitorGone:
        pass


if __name__ == "__main__":
    main()

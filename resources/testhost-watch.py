#!/usr/bin/env python3
"""Watches a running test host through its heartbeat and QEMU's monitor; says where it hung.

Usage: testhost-watch.py MONITOR_SOCKET HEARTBEAT_FILE REPORT_AT_S FREEZE_S FROZE_FILE

Two jobs, both printing on stderr:

- A frozen test host ends early. The test host's /init writes its uptime to its second serial
  port once a second (`sleep 1`, so only while its timer interrupts come and its scheduler
  runs), which QEMU appends to HEARTBEAT_FILE. A heartbeat that stops for FREEZE_S seconds (or
  never starts within FIRST_BEAT_S) means the test host runs no more: QEMU 10.0's emulation of
  nested SVM has lost a CPU's interrupt request in a way the periodic tick did not heal
  (docs/performance.md, "The bench's test host sometimes froze"), or its kernel hangs. The
  watcher then prints the CPU state, writes FROZE_FILE and ends QEMU, instead of letting the run
  sit out its whole timeout. A test host that is only busy keeps beating: its scheduler runs the
  heartbeat within a tick or two, however loaded it is. (A vector seen pending in the local
  APIC at every sample is no sign of a freeze: with a 250 Hz tick and a CPU that spends long
  stretches with interrupts off, a sample often finds one.)
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

SAMPLE_INTERVAL_S = 2
# The test host boots in about 7 s; its first heartbeat may take this long on a loaded machine.
FIRST_BEAT_S = 90
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


def heartbeat_size(path):
    """Size of the heartbeat file, 0 before it exists."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def last_heartbeat(path):
    """The last complete line of the heartbeat file (the test host's uptime), or "?"."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.stat(path).st_size - 256))
            tail = f.read().decode(errors="replace").replace("\r", "")
    except OSError:
        return "?"
    lines = [l.strip() for l in tail.split("\n")[:-1] if l.strip()]
    return lines[-1] if lines else "?"


def pending_summary(monitor):
    """Each CPU's pending interrupt vectors, for the freeze report's title."""
    parts = []
    for cpu, _ in vcpu_threads(monitor):
        parts.append(f"CPU {cpu}: {pending_vectors(monitor, cpu) or 'none'} pending")
    return ", ".join(parts)


def watch(monitor, heartbeat_path, start, report_at_s, freeze_s, froze_file):
    """Follows the heartbeat until QEMU ends, the test host freezes or the report time comes."""
    size = 0
    last_beat = None
    while True:
        now = time.time()
        if now - start >= report_at_s:
            report(monitor, "test host state before the timeout")
            return
        new_size = heartbeat_size(heartbeat_path)
        if new_size != size:
            size, last_beat = new_size, now
        if last_beat is None:
            stalled = now - start >= max(freeze_s, FIRST_BEAT_S)
            why = f"no heartbeat came in the first {now - start:.0f} s"
        else:
            stalled = now - last_beat >= freeze_s
            why = (
                f"its heartbeat stopped {now - last_beat:.0f} s ago "
                f"(the last said test host uptime {last_heartbeat(heartbeat_path)} s)"
            )
        if stalled:
            title = (
                f"the test host froze: {why}; {pending_summary(monitor)} "
                f"({now - start:.0f} s into the run)"
            )
            report(monitor, title)
            with open(froze_file, "w") as f:
                f.write(title + "\n")
            end_qemu(monitor)
            return
        time.sleep(SAMPLE_INTERVAL_S)


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__.split("\n\n")[1])
    path, heartbeat_path, report_at_s, freeze_s, froze_file = sys.argv[1:]
    start = time.time()
    try:
        monitor = Monitor(path)
        watch(monitor, heartbeat_path, start, float(report_at_s), float(freeze_s), froze_file)
    except MonitorGone:
        pass


if __name__ == "__main__":
    main()

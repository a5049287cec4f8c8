/* uwake: what wakes the guest monitor (resources/guest/init, scenario_monitor) when a device
 * comes or goes, without a process per event.
 *
 * Listens to the kernel's uevents (NETLINK_KOBJECT_UEVENT) and, for a PCI device that came, went
 * or changed driver, a disk or a network interface that came or went, writes one line
 * "SUBSYSTEM:ACTION NAME" to its standard output (the monitor's wake FIFO). With -k it also writes
 * "rvmm uwake SUBSYSTEM:ACTION NAME" to /dev/kmsg: the guest kernel's timestamp of the moment the
 * event reached user space, for the timing breakdown of resources/bench-hotplug.sh.
 *
 * busybox's `uevent PROG` runs PROG for every uevent and waits for it: about ten shells per NVMe
 * add or removal, one after the other, delayed the monitor's view of a disk by 80-400 ms. */
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int is(const char *a, const char *b) { return strcmp(a, b) == 0; }

/* Whether the monitor looks at an event of SUBSYSTEM with ACTION (DEVTYPE for block devices). */
static int wanted(const char *subsystem, const char *action, const char *devtype) {
    int add_remove = is(action, "add") || is(action, "remove");
    if (is(subsystem, "pci"))
        return add_remove || is(action, "bind") || is(action, "unbind");
    if (is(subsystem, "net"))
        return add_remove;
    if (is(subsystem, "block"))
        return add_remove && is(devtype, "disk");
    return 0;
}

int main(int argc, char **argv) {
    int kmsg = -1;
    if (argc > 1 && is(argv[1], "-k"))
        kmsg = open("/dev/kmsg", O_WRONLY);
    int fd = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_KOBJECT_UEVENT);
    if (fd < 0) {
        perror("uwake: socket");
        return 1;
    }
    /* A burst of events must not overflow the socket while the monitor's shell is busy. */
    int size = 1 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size));
    struct sockaddr_nl addr = {.nl_family = AF_NETLINK, .nl_groups = 1};
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        perror("uwake: bind");
        return 1;
    }
    static char buf[16384];
    for (;;) {
        ssize_t len = recv(fd, buf, sizeof(buf) - 1, 0);
        if (len < 0 && errno == ENOBUFS) {
            /* Events were lost: wake the monitor anyway, its look at /sys sees everything. */
            if (write(1, "lost:events -\n", 14) < 0 && errno == EPIPE)
                return 0;
            continue;
        }
        if (len <= 0)
            continue;
        buf[len] = 0;
        const char *action = "", *subsystem = "", *devtype = "", *name = "", *devpath = "";
        for (char *s = buf; s < buf + len; s += strlen(s) + 1) {
            if (!strncmp(s, "ACTION=", 7))
                action = s + 7;
            else if (!strncmp(s, "SUBSYSTEM=", 10))
                subsystem = s + 10;
            else if (!strncmp(s, "DEVTYPE=", 8))
                devtype = s + 8;
            else if (!strncmp(s, "DEVNAME=", 8) || !strncmp(s, "INTERFACE=", 10))
                name = strchr(s, '=') + 1;
            else if (!strncmp(s, "DEVPATH=", 8))
                devpath = s + 8;
        }
        if (!wanted(subsystem, action, devtype))
            continue;
        if (!*name) {
            const char *slash = strrchr(devpath, '/');
            name = slash ? slash + 1 : devpath;
        }
        char line[256];
        int n = snprintf(line, sizeof(line), "%s:%s %s\n", subsystem, action, name);
        if (n < 0)
            continue;
        if (n > (int)sizeof(line) - 1)
            n = sizeof(line) - 1;
        if (kmsg >= 0) {
            char k[300];
            int m = snprintf(k, sizeof(k), "rvmm uwake %s", line);
            if (m > 0 && write(kmsg, k, m < (int)sizeof(k) ? m : (int)sizeof(k) - 1) < 0) {
                /* The kernel log is a nicety: go on without it. */
            }
        }
        if (write(1, line, n) < 0 && errno == EPIPE)
            return 0;
    }
}

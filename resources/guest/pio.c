/*
 * pio: one 32-bit I/O port access from the test guest (busybox has none), for the scenarios that
 * drive a device's I/O BAR (resources/guest/init, scenario e1000). Built static by
 * resources/build-guest-initramfs.sh as /bin/pio.
 *
 * Usage: pio PORT            prints the 32-bit value read from PORT as 0x%08x
 *        pio PORT VALUE      writes VALUE (32 bits) to PORT
 * PORT and VALUE take C notation (0x.. for hex). Exit status 0, or 1 with a message on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>

static int parse(const char *text, unsigned long max, unsigned long *out)
{
	char *end;

	errno = 0;
	*out = strtoul(text, &end, 0);
	return errno == 0 && end != text && *end == '\0' && *out <= max ? 0 : -1;
}

int main(int argc, char **argv)
{
	unsigned long port, value;

	if (argc < 2 || argc > 3 || parse(argv[1], 0xfffc, &port) != 0 || (port & 3) != 0) {
		fprintf(stderr, "usage: pio PORT [VALUE] (PORT 4-byte aligned, below 0x10000)\n");
		return 1;
	}
	if (argc == 3 && parse(argv[2], 0xffffffffUL, &value) != 0) {
		fprintf(stderr, "pio: VALUE %s is not a 32-bit number\n", argv[2]);
		return 1;
	}
	if (ioperm(port, 4, 1) != 0) {
		fprintf(stderr, "pio: ioperm(%#lx): %s\n", port, strerror(errno));
		return 1;
	}
	if (argc == 3)
		outl((unsigned int)value, port);
	else
		printf("0x%08x\n", inl(port));
	return 0;
}

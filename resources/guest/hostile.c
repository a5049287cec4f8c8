/*
 * hostile: a guest program that writes garbage to every PCI configuration register it can reach,
 * to prove that rvmm survives a hostile guest (tests/tests/hostile.rs, guest scenario `hostile`
 * in resources/guest/init). Built static by resources/build-guest-initramfs.sh as /bin/hostile.
 *
 * Usage: hostile [-s SEED] [-r ROUNDS] [PHASE...]
 *   PHASE: discover nvme ports pio ecam platform (default: all, in that order)
 *   SEED:  seed of the garbage (default: from the clock); ROUNDS: garbage writes per register
 *          in the full passes (default 2)
 *
 * Phases:
 *   discover  finds every function through ECAM (all buses, devices, functions)
 *   nvme      the first NVMe (class 0108xx): memory decode on, then garbage in its MSI-X table
 *             and PBA (through /dev/mem at its BAR), its MSI-X and MSI capabilities, its BAR and
 *             ROM registers (sizing, RAM, ECAM, LAPIC and high addresses) and every register of
 *             its config space through ECAM and 0xCF8/0xCFC
 *   ports     every root port: Slot Control/Status, MSI (also MSIs that reach no CPU: absent
 *             APIC IDs in every delivery mode, a broadcast), bridge windows, bus numbers, PCIe
 *             control registers, then every register of its config space
 *   pio       every function on every bus through 0xCF8/0xCFC (ioperm): a probe and a garbage write
 *             each; every register of every function that answers; odd widths and offsets on
 *             the address and data ports
 *   ecam      every function on every bus through ECAM (/dev/mem at 0xE0000000, 256 MiB): the same,
 *             plus 8-byte and unaligned accesses
 *   platform  the serial port's registers (settings restored after), the i8042, the CMOS and the
 *             ACPI PM block, every width; never the values that reset or power off the VM
 *
 * The guest must stay alive to report: MSI data written to a register the program knows is one
 * (root ports' and the NVMe's MSI, MSI-X table entries) gets a fixed-delivery vector in
 * 0x30..0x7f, so that rvmm's hot-plug interrupts cannot INIT, SMI or NMI a vCPU or hit an
 * exception vector. Everything else is unfiltered garbage.
 *
 * Output: "GUEST hostile_<key> <value...>" lines on stdout (the guest console):
 *   hostile_seed, hostile_found <bdf> <vendor:device> class=<class>, hostile_phase <name> begin,
 *   hostile_phase <name> done writes=<n> reads=<n> ms=<n>, hostile_check <name> ok|failed ...,
 *   hostile_error <what>, hostile_done.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define ECAM_BASE 0xe0000000ULL
#define ECAM_SIZE 0x10000000ULL
#define MAX_FUNCS 512
#define PCI_CAP_ID_MSI 0x05
#define PCI_CAP_ID_EXP 0x10
#define PCI_CAP_ID_MSIX 0x11

struct func {
	int bus, dev, fn;
	uint16_t vendor, device;
	uint32_t class;
	int header_type;
	int msi;      /* offset of the MSI capability, 0 if none */
	int msi_data; /* offset of its data register */
	int msix;     /* offset of the MSI-X capability */
	int pcie;     /* offset of the PCI Express capability */
};

static volatile uint8_t *ecam;
static struct func funcs[MAX_FUNCS];
static int nfuncs;
static uint64_t rng;
static uint64_t writes, reads;
static int rounds = 2;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static void mark(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void mark(const char *fmt, ...)
{
	va_list ap;
	fputs("GUEST ", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
	fflush(stdout);
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* --- raw accesses ------------------------------------------------------------------------- */

static volatile uint8_t *ecam_at(int bus, int dev, int fn, int off)
{
	return ecam + (((uint64_t)bus << 20) | ((uint64_t)dev << 15) | ((uint64_t)fn << 12) | (uint64_t)off);
}

static uint64_t mmio_read(volatile uint8_t *p, int width)
{
	reads++;
	switch (width) {
	case 1: return *(volatile uint8_t *)p;
	case 2: return *(volatile uint16_t *)p;
	case 4: return *(volatile uint32_t *)p;
	default: return *(volatile uint64_t *)p;
	}
}

static void mmio_write(volatile uint8_t *p, int width, uint64_t v)
{
	writes++;
	switch (width) {
	case 1: *(volatile uint8_t *)p = (uint8_t)v; break;
	case 2: *(volatile uint16_t *)p = (uint16_t)v; break;
	case 4: *(volatile uint32_t *)p = (uint32_t)v; break;
	default: *(volatile uint64_t *)p = v; break;
	}
}

static uint32_t ecam_read32(int bus, int dev, int fn, int off)
{
	return (uint32_t)mmio_read(ecam_at(bus, dev, fn, off & ~3), 4);
}

static uint32_t cf8_address(int bus, int dev, int fn, int off, int enable)
{
	return ((uint32_t)!!enable << 31) | ((uint32_t)bus << 16) | ((uint32_t)dev << 11) |
	       ((uint32_t)fn << 8) | ((uint32_t)off & 0xfc);
}

static uint64_t pio_read(int bus, int dev, int fn, int off, int width)
{
	outl(cf8_address(bus, dev, fn, off, 1), 0xcf8);
	writes++;
	reads++;
	switch (width) {
	case 1: return inb(0xcfc + (off & 3));
	case 2: return inw(0xcfc + (off & 3));
	default: return inl(0xcfc + (off & 3));
	}
}

static void pio_write(int bus, int dev, int fn, int off, int width, uint64_t v)
{
	outl(cf8_address(bus, dev, fn, off, 1), 0xcf8);
	writes += 2;
	switch (width) {
	case 1: outb((uint8_t)v, 0xcfc + (off & 3)); break;
	case 2: outw((uint16_t)v, 0xcfc + (off & 3)); break;
	default: outl((uint32_t)v, 0xcfc + (off & 3)); break;
	}
}

/* --- functions ---------------------------------------------------------------------------- */

static int find_cap(int bus, int dev, int fn, int id)
{
	int at = ecam_read32(bus, dev, fn, 0x34) & 0xfc, n = 0;
	while (at && n++ < 48) {
		uint32_t header = ecam_read32(bus, dev, fn, at);
		if ((int)(header & 0xff) == id)
			return at;
		at = (header >> 8) & 0xfc;
	}
	return 0;
}

static void describe(struct func *f)
{
	f->msi = find_cap(f->bus, f->dev, f->fn, PCI_CAP_ID_MSI);
	f->msix = find_cap(f->bus, f->dev, f->fn, PCI_CAP_ID_MSIX);
	f->pcie = find_cap(f->bus, f->dev, f->fn, PCI_CAP_ID_EXP);
	f->msi_data = 0;
	if (f->msi) {
		uint32_t control = ecam_read32(f->bus, f->dev, f->fn, f->msi) >> 16;
		f->msi_data = f->msi + ((control & 0x80) ? 0x0c : 0x08);
	}
}

/* Makes a write of `width` bytes of `v` at `off` harmless where it lands on MSI data. */
static uint64_t sanitize(const struct func *f, int off, int width, uint64_t v)
{
	for (int i = 0; i < width; i++) {
		int at = off + i;
		uint64_t byte = (v >> (8 * i)) & 0xff, fixed = byte;
		if (f && f->msi_data && at == f->msi_data)
			fixed = 0x30 + byte % 0x50;
		else if (f && f->msi_data && at == f->msi_data + 1)
			fixed = byte & ~0x07ULL;
		v = (v & ~(0xffULL << (8 * i))) | (fixed << (8 * i));
	}
	return v;
}

static int width_of(uint64_t r)
{
	static const int widths[] = {1, 2, 4, 4};
	return widths[r & 3];
}

/* Garbage at one register byte offset through ECAM or 0xCF8/0xCFC. */
static void garbage_at(const struct func *f, int off, int width, int via_pio)
{
	uint64_t v;
	switch (rnd() % 4) {
	case 0: v = ~0ULL; break;
	case 1: v = 0; break;
	default: v = rnd(); break;
	}
	v = sanitize(f, off, width, v);
	if (via_pio && off < 0x100)
		pio_write(f->bus, f->dev, f->fn, off, width, v);
	else
		mmio_write(ecam_at(f->bus, f->dev, f->fn, off), width, v);
}

/* Every register of function `f`: `rounds` garbage writes of each width per dword, each followed
 * by a read, half through 0xCF8/0xCFC (the first 256 bytes) and half through ECAM. */
static void garbage_all(const struct func *f, int limit)
{
	for (int round = 0; round < rounds; round++) {
		for (int reg = 0; reg < limit; reg += 4) {
			uint64_t r = rnd();
			int width = width_of(r);
			int off = reg + (int)((r >> 8) % (unsigned)(4 / width)) * width;
			garbage_at(f, off, width, (r >> 16) & 1);
			if ((r >> 17) & 1)
				pio_read(f->bus, f->dev, f->fn, off & 0xff, width);
			else
				mmio_read(ecam_at(f->bus, f->dev, f->fn, off), width);
		}
	}
}

/* --- phases ------------------------------------------------------------------------------- */

static void phase_discover(void)
{
	nfuncs = 0;
	for (int bus = 0; bus < 256; bus++) {
		for (int dev = 0; dev < 32; dev++) {
			for (int fn = 0; fn < 8; fn++) {
				uint32_t id = ecam_read32(bus, dev, fn, 0);
				if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
					if (fn == 0)
						break;
					continue;
				}
				uint32_t hdr = ecam_read32(bus, dev, fn, 0x0c) >> 16;
				if (nfuncs < MAX_FUNCS) {
					struct func *f = &funcs[nfuncs++];
					memset(f, 0, sizeof(*f));
					f->bus = bus;
					f->dev = dev;
					f->fn = fn;
					f->vendor = id & 0xffff;
					f->device = id >> 16;
					f->class = ecam_read32(bus, dev, fn, 8) >> 8;
					f->header_type = hdr & 0x7f;
					describe(f);
					mark("hostile_found %04x:%02x:%02x.%x %04x:%04x class=%06x", 0, bus, dev,
					     fn, f->vendor, f->device, f->class);
				}
				if (fn == 0 && !(hdr & 0x80))
					break;
			}
		}
	}
	mark("hostile_functions %d", nfuncs);
}

static struct func *find_nvme(void)
{
	for (int i = 0; i < nfuncs; i++)
		if (funcs[i].class >> 8 == 0x0108)
			return &funcs[i];
	return NULL;
}

/* The guest-physical address of BAR `bar` of `f` (memory BARs only), 0 if unusable. */
static uint64_t bar_address(const struct func *f, int bar)
{
	uint32_t lo = ecam_read32(f->bus, f->dev, f->fn, 0x10 + 4 * bar);
	if (lo & 1)
		return 0;
	uint64_t addr = lo & ~0xfULL;
	if ((lo & 0x6) == 0x4 && bar < 5)
		addr |= (uint64_t)ecam_read32(f->bus, f->dev, f->fn, 0x14 + 4 * bar) << 32;
	return addr;
}

/* Garbage in the MSI-X table and PBA, mapped from /dev/mem. Returns mismatches of the aligned
 * dword writes read back from the table (the table is rvmm's emulation). */
static long msix_garbage(const struct func *f, int memfd)
{
	uint32_t control = ecam_read32(f->bus, f->dev, f->fn, f->msix) >> 16;
	uint32_t table = ecam_read32(f->bus, f->dev, f->fn, f->msix + 4);
	uint32_t pba = ecam_read32(f->bus, f->dev, f->fn, f->msix + 8);
	int vectors = (control & 0x7ff) + 1;
	uint64_t table_gpa = bar_address(f, table & 7), pba_gpa = bar_address(f, pba & 7);
	long mismatches = 0;
	if (!table_gpa || !pba_gpa) {
		mark("hostile_error msix_bar_unassigned table_bar=%u pba_bar=%u", table & 7, pba & 7);
		return -1;
	}
	table_gpa += table & ~7U;
	pba_gpa += pba & ~7U;
	uint64_t page = table_gpa & ~0xfffULL, pba_page = pba_gpa & ~0xfffULL;
	/* One mapping covering the table's and the PBA's pages (the whole trapped range). */
	uint64_t first = page < pba_page ? page : pba_page;
	uint64_t last = (table_gpa + 16ULL * vectors) > (pba_gpa + 8) ? table_gpa + 16ULL * vectors
								      : pba_gpa + 8;
	size_t len = ((last - first) + 0xfff) & ~0xfffULL;
	volatile uint8_t *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, (off_t)first);
	if (map == MAP_FAILED) {
		mark("hostile_error mmap_msix gpa=%#llx len=%#zx errno=%d", (unsigned long long)first, len,
		     errno);
		return -1;
	}
	volatile uint8_t *tab = map + (table_gpa - first);
	mark("hostile_msix vectors=%d table=%#llx pba=%#llx", vectors, (unsigned long long)table_gpa,
	     (unsigned long long)pba_gpa);
	/* MSI-X on, function mask on and off, as a driver would; then garbage control values. */
	mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msix + 2), 2, 0xc000);
	for (int round = 0; round < rounds * 2; round++) {
		for (int v = 0; v < vectors; v++) {
			for (int dw = 0; dw < 4; dw++) {
				uint32_t value = (uint32_t)rnd();
				int at = v * 16 + dw * 4;
				if (dw == 2)
					value = (uint32_t)sanitize(&(struct func){.msi_data = 8}, 8, 4, value);
				if (dw == 3 && round == rounds * 2 - 1)
					value &= ~1U; /* leave some vectors unmasked: routes and irqfds */
				mmio_write(tab + at, 4, value);
				uint32_t back = (uint32_t)mmio_read(tab + at, 4);
				uint32_t want = dw == 0 ? value & ~3U : dw == 3 ? value & 1 : value;
				if (back != want)
					mismatches++;
			}
			/* Odd widths and offsets inside the entry: ignored by the emulation. */
			uint64_t r = rnd();
			int off = v * 16 + (int)(r % 16);
			int width = (int[]){1, 2, 8, 4}[(r >> 8) & 3];
			if (width == 8)
				off &= ~7;
			if ((off % 16) / 4 == 2 || ((off + width - 1) % 16) / 4 == 2)
				r = sanitize(&(struct func){.msi_data = 8}, off % 16, width, r);
			mmio_write(tab + off, width, r);
			mmio_read(tab + off, width);
		}
		/* Past the table, in the PBA, and in the rest of the trapped pages. */
		/* Each access is 4 bytes: it must end inside the mapping (one that crosses its end
		 * faults the program, not rvmm). */
		for (size_t off = 0; off + 4 <= len; off += 4 + rnd() % 60) {
			uint64_t gpa = first + off;
			if (gpa >= table_gpa && gpa < table_gpa + 16ULL * vectors)
				continue;
			mmio_write(map + off, 4, rnd());
			mmio_read(map + off, 4);
		}
		uint16_t ctrl = (uint16_t)rnd();
		mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msix + 2), 2, ctrl);
		mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msix + 2), 2, (ctrl | 0x8000) & ~0x4000);
	}
	for (int i = 0; i < 64; i++)
		mmio_read(map + (pba_gpa - first) + 8 * (i % ((vectors + 63) / 64)), 8);
	munmap((void *)map, len);
	return mismatches;
}

static void phase_nvme(int memfd)
{
	struct func *f = find_nvme();
	if (!f) {
		mark("hostile_error no_nvme");
		return;
	}
	mark("hostile_nvme %04x:%02x:%02x.%x msi=%#x msix=%#x pcie=%#x", 0, f->bus, f->dev, f->fn,
	     f->msi, f->msix, f->pcie);
	/* Memory decode and bus master on: rvmm places the BARs (and traps the MSI-X pages). */
	uint32_t command = ecam_read32(f->bus, f->dev, f->fn, 4) & 0xffff;
	mmio_write(ecam_at(f->bus, f->dev, f->fn, 4), 2, command | 0x6);
	if (f->msix) {
		long mismatches = msix_garbage(f, memfd);
		if (mismatches >= 0)
			mark("hostile_check msix_readback %s mismatches=%ld", mismatches ? "failed" : "ok",
			     mismatches);
	}
	if (f->msi) {
		for (int i = 0; i < 64 * rounds; i++) {
			uint64_t r = rnd();
			int width = width_of(r);
			int off = f->msi + (int)((r >> 8) % 0x18);
			off -= off % width;
			garbage_at(f, off, width, (r >> 20) & 1);
		}
	}
	/* BARs and ROM: sizing, then addresses over RAM, the ECAM, the LAPIC, the MMIO hole and
	 * above 4 GiB, with decode toggling. */
	static const uint32_t addresses[] = {0xffffffff, 0x00000000, 0x00001000, 0x000a0000,
					     0x00100000, 0x1f000000, 0xe0000000, 0xefff0000,
					     0xfec00000, 0xfee00000, 0xfffff000, 0xc0000000};
	for (int round = 0; round < rounds; round++) {
		for (unsigned a = 0; a < sizeof(addresses) / sizeof(addresses[0]); a++) {
			for (int reg = 0x10; reg <= 0x30; reg += 4) {
				uint32_t v = (rnd() & 1) ? addresses[a] : (uint32_t)rnd();
				if (reg == 0x30)
					v |= 1;
				if (reg == 0x14 || reg == 0x1c || reg == 0x24)
					v = (rnd() & 3) ? 0 : (uint32_t)rnd();
				if (rnd() & 1)
					mmio_write(ecam_at(f->bus, f->dev, f->fn, reg), 4, v);
				else
					pio_write(f->bus, f->dev, f->fn, reg, 4, v);
				mmio_read(ecam_at(f->bus, f->dev, f->fn, reg), 4);
			}
			mmio_write(ecam_at(f->bus, f->dev, f->fn, 4), 2, (rnd() & 1) ? 0x0007 : 0x0000);
		}
	}
	garbage_all(f, 0x1000);
	mark("hostile_check nvme_reachable %s id=%08x", ecam_read32(f->bus, f->dev, f->fn, 0) == 0xffffffff ? "no" : "yes",
	     ecam_read32(f->bus, f->dev, f->fn, 0));
}

/* MSI messages that reach no CPU, sent by root port `f`: its MSI aimed at APIC IDs no vCPU has
 * (0x20..0xfe, physical destination mode) in every delivery mode (fixed, lowest priority, SMI,
 * NMI, INIT, ExtINT), and a broadcast with fixed delivery of a harmless vector; each is sent by a
 * Command Completed event (a Slot Control write with notifications on). The address always
 * changes first and the data last, and the data ends harmless, so that no INIT, NMI or SMI can
 * reach a vCPU through a later address. */
static void msi_nowhere(const struct func *f)
{
	static const uint32_t modes[] = {0, 1, 2, 4, 5, 7};
	int sltctl = f->pcie + 0x18, sltsta = f->pcie + 0x1a;
	int is64 = f->msi_data == f->msi + 0x0c;
	int sent = 0;
	if (!f->msi)
		return;
	uint16_t control = (uint16_t)(ecam_read32(f->bus, f->dev, f->fn, f->msi) >> 16);
	/* Enabled, one vector; unmasked where per-vector masking exists. */
	mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msi + 2), 2, (control & ~0x70U) | 1);
	if (control & 0x100)
		mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msi + (is64 ? 0x10 : 0x0c)), 4, 0);
	for (unsigned m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
		for (int k = 0; k < 4 * rounds; k++) {
			int broadcast = modes[m] == 0 && k == 0;
			uint32_t dest = broadcast ? 0xff : 0x20 + (uint32_t)(rnd() % 0xdf);
			uint32_t vector = 0x30 + (uint32_t)(rnd() % 0x50);
			mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msi + 4), 4, 0xfee00000U | dest << 12);
			if (is64)
				mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msi + 8), 4, 0);
			mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msi_data), 2, modes[m] << 8 | vector);
			mmio_write(ecam_at(f->bus, f->dev, f->fn, sltsta), 2, 0xffff);
			mmio_write(ecam_at(f->bus, f->dev, f->fn, sltctl), 2,
				   0x0030 | ((k & 1) ? 0x0100 : 0x0200));
			sent++;
		}
	}
	mmio_write(ecam_at(f->bus, f->dev, f->fn, f->msi_data), 2, 0x0040);
	mark("hostile_msi_nowhere %02x:%02x.%x sent=%d", f->bus, f->dev, f->fn, sent);
}

static void phase_ports(void)
{
	int ports = 0;
	for (int i = 0; i < nfuncs; i++) {
		struct func *f = &funcs[i];
		if (f->bus != 0 || f->header_type != 1 || !f->pcie)
			continue;
		ports++;
		int sltctl = f->pcie + 0x18, sltsta = f->pcie + 0x1a;
		/* Slot Control: each power / indicator / enable combination and random values, each
		 * followed by a Slot Status clear; dwords over both; status garbage. */
		for (int i2 = 0; i2 < 256 * rounds; i2++) {
			uint16_t control = (uint16_t)rnd();
			if (i2 < 64)
				control = (uint16_t)((i2 & 0x3f) << 6 | 0x3f);
			mmio_write(ecam_at(f->bus, f->dev, f->fn, sltctl), 2, control);
			mmio_write(ecam_at(f->bus, f->dev, f->fn, sltsta), 2, rnd() & 1 ? 0xffff : rnd());
			if ((i2 & 7) == 0)
				mmio_write(ecam_at(f->bus, f->dev, f->fn, sltctl), 4, rnd());
			if ((i2 & 15) == 0)
				pio_write(f->bus, f->dev, f->fn, sltctl, 2, rnd());
		}
		/* MSI: enable, masks, addresses, (safe) data. */
		for (int i2 = 0; f->msi && i2 < 64 * rounds; i2++) {
			uint64_t r = rnd();
			int width = width_of(r);
			int off = f->msi + (int)((r >> 8) % 0x18);
			off -= off % width;
			garbage_at(f, off, width, (r >> 20) & 1);
			mmio_write(ecam_at(f->bus, f->dev, f->fn, sltctl), 2, rnd());
		}
		msi_nowhere(f);
		/* Bus numbers and bridge windows, including overlaps with other ports and bus 0. */
		static const uint32_t buses[] = {0x00000000, 0x00ffffff, 0x00010100, 0x00020201,
						 0x00ff0100, 0x00000101, 0x00080300};
		for (int i2 = 0; i2 < 32 * rounds; i2++) {
			uint32_t b = (i2 & 1) ? buses[(i2 / 2) % 7] : (uint32_t)rnd();
			mmio_write(ecam_at(f->bus, f->dev, f->fn, 0x18), 4, b);
			for (int reg = 0x1c; reg <= 0x30; reg += 4)
				garbage_at(f, reg, 4, rnd() & 1);
		}
		/* PCI Express control registers: device, link (retrain, disable), root. */
		static const int exp_regs[] = {0x08, 0x10, 0x1c, 0x20, 0x28, 0x30};
		for (int i2 = 0; i2 < 32 * rounds; i2++)
			for (unsigned k = 0; k < sizeof(exp_regs) / sizeof(exp_regs[0]); k++)
				garbage_at(f, f->pcie + exp_regs[k], width_of(rnd()) == 1 ? 2 : 4, rnd() & 1);
		garbage_all(f, 0x1000);
	}
	mark("hostile_ports %d", ports);
}

static const struct func *known(int bus, int dev, int fn)
{
	for (int i = 0; i < nfuncs; i++)
		if (funcs[i].bus == bus && funcs[i].dev == dev && funcs[i].fn == fn)
			return &funcs[i];
	return NULL;
}

static void phase_pio(void)
{
	long address_mismatches = 0, answered = 0;
	for (int bus = 0; bus < 256; bus++) {
		for (int dev = 0; dev < 32; dev++) {
			for (int fn = 0; fn < 8; fn++) {
				uint32_t address = cf8_address(bus, dev, fn, (int)(rnd() & 0xfc), 1);
				/* The address must read back. The guest kernel uses 0xCF8 too (for the
				 * first 256 bytes of config space, from its other vCPU): only a mismatch
				 * that persists over three tries counts. */
				int tries = 0;
				do {
					outl(address, 0xcf8);
					writes++;
					reads++;
				} while (inl(0xcf8) != address && ++tries < 3);
				if (tries == 3)
					address_mismatches++;
				uint32_t id = (uint32_t)pio_read(bus, dev, fn, 0, 4);
				const struct func *f = known(bus, dev, fn);
				int off = (int)(rnd() % 0x100);
				int width = width_of(rnd());
				off -= off % width;
				if (id != 0xffffffff && !f) {
					/* Answers now (renumbered buses) but was not found before: garbage
					 * without knowing its MSI. */
					answered++;
				}
				pio_write(bus, dev, fn, off, width,
					  sanitize(f, off, width, rnd()));
			}
		}
	}
	/* Odd accesses to the address and data ports. */
	for (int i = 0; i < 256 * rounds; i++) {
		uint64_t r = rnd();
		int port = 0xcf8 + (int)(r % 8);
		int width = width_of(r >> 8);
		writes++;
		reads++;
		switch (width) {
		case 1: outb((uint8_t)(r >> 16), port); inb(port); break;
		case 2: outw((uint16_t)(r >> 16), port); inw(port); break;
		default: outl((uint32_t)(r >> 16) & 0x7fffffff, port); inl(port); break;
		}
	}
	for (int i = 0; i < nfuncs; i++) {
		const struct func *f = &funcs[i];
		for (int round = 0; round < rounds; round++)
			for (int off = 0; off < 0x100; off += 4) {
				uint64_t r = rnd();
				int width = width_of(r);
				int o = off + (int)((r >> 8) % (unsigned)(4 / width)) * width;
				pio_write(f->bus, f->dev, f->fn, o, width, sanitize(f, o, width, r >> 16));
				pio_read(f->bus, f->dev, f->fn, o, width);
			}
	}
	mark("hostile_check cf8_readback %s mismatches=%ld", address_mismatches ? "failed" : "ok",
	     address_mismatches);
	mark("hostile_pio_new_functions %ld", answered);
}

static void phase_ecam(void)
{
	for (int bus = 0; bus < 256; bus++) {
		for (int dev = 0; dev < 32; dev++) {
			for (int fn = 0; fn < 8; fn++) {
				volatile uint8_t *cfg = ecam_at(bus, dev, fn, 0);
				mmio_read(cfg, 4);
				const struct func *f = known(bus, dev, fn);
				uint64_t r = rnd();
				int width = width_of(r);
				int off = (int)((r >> 8) % 0x1000);
				off -= off % width;
				mmio_write(cfg + off, width, sanitize(f, off, width, rnd()));
			}
		}
	}
	/* 8-byte, unaligned and dword-crossing accesses (rvmm ignores them; reads give zero). */
	for (int i = 0; i < 128 * rounds; i++) {
		uint64_t r = rnd();
		const struct func *f = nfuncs ? &funcs[r % (unsigned)nfuncs] : NULL;
		int bus = f ? f->bus : 0, dev = f ? f->dev : 0, fn = f ? f->fn : 0;
		int width = (int[]){8, 2, 4, 8}[(r >> 16) & 3];
		int off = (int)((r >> 20) % (0x1000 - 8));
		if (width == 8)
			off &= ~7;
		else
			off |= 3; /* crosses the dword */
		mmio_read(ecam_at(bus, dev, fn, off), width);
		if (f && f->msi_data && off <= f->msi_data + 1 && off + width > f->msi_data)
			continue;
		mmio_write(ecam_at(bus, dev, fn, off), width, rnd());
	}
	for (int i = 0; i < nfuncs; i++)
		garbage_all(&funcs[i], 0x1000);
}

/* One garbage access of any width at `port`, with `value` (already made harmless). */
static void port_garbage(int port, uint64_t r, uint32_t value)
{
	writes++;
	reads++;
	switch (width_of(r)) {
	case 1: outb((uint8_t)value, port); inb(port); break;
	case 2: outw((uint16_t)value, port); inw(port); break;
	default: outl(value, port); inl(port); break;
	}
}

/* The legacy platform devices: the serial port's registers (the console's settings saved and
 * restored around it, nothing written to its transmit register), the i8042, the CMOS/RTC and the
 * ACPI PM block (0x600-0x602) and what lies just past it, with every access width. Left out:
 * the values that reset or power off the VM (i8042 command 0xfe, SLP_EN in sleep control, the
 * reset value 1 in the reset register), which would end the run rather than attack it. */
static void phase_platform(void)
{
	/* The console's output out of the kernel's buffers first: a stalled transmitter would keep
	 * it there. */
	fflush(stdout);
	tcdrain(STDOUT_FILENO);
	uint8_t lcr = inb(0x3fb), ier = inb(0x3f9), mcr = inb(0x3fc);
	outb(lcr | 0x80, 0x3fb);
	uint8_t dll = inb(0x3f8), dlm = inb(0x3f9);
	outb(lcr, 0x3fb);
	for (int i = 0; i < 256 * rounds; i++) {
		uint64_t r = rnd();
		int port = 0x3f9 + (int)(r % 7);
		/* Only byte accesses: a wider one would reach the next port, 0x3f8 included. */
		writes++;
		reads++;
		outb((uint8_t)(r >> 8), port);
		inb(port);
		inb(0x3f8); /* the receive buffer, whatever the divisor latch says */
	}
	outb(lcr | 0x80, 0x3fb);
	outb(dll, 0x3f8);
	outb(dlm, 0x3f9);
	outb(lcr, 0x3fb);
	outb(0xc7, 0x3fa);
	outb(mcr, 0x3fc);
	outb(ier, 0x3f9);
	for (int i = 0; i < 256 * rounds; i++) {
		uint64_t r = rnd();
		uint32_t v = (uint32_t)(r >> 16);
		switch (r % 6) {
		case 0:
		case 1: {
			/* i8042 data or command; no byte of a command write may be the reset. */
			int port = (r % 6) ? 0x64 : 0x60;
			if (port == 0x64)
				for (int b = 0; b < 4; b++)
					if (((v >> (8 * b)) & 0xff) == 0xfe)
						v ^= 1U << (8 * b);
			port_garbage(port, r >> 8, v);
			break;
		}
		case 2:
		case 3:
			port_garbage(0x70 + (int)(r % 2), r >> 8, v);
			break;
		default: {
			/* ACPI PM: sleep control without SLP_EN, sleep status, reset without its value,
			 * the port past the block; any byte of a wide access lands on one of them. */
			int port = 0x600 + (int)((r >> 4) % 4);
			for (int b = 0; b < 4; b++) {
				int at = port + b;
				uint32_t byte = (v >> (8 * b)) & 0xff;
				if (at == 0x600)
					byte &= ~0x20U;
				else if (at == 0x602 && byte == 1)
					byte = 0;
				v = (v & ~(0xffU << (8 * b))) | byte << (8 * b);
			}
			port_garbage(port, r >> 8, v);
			break;
		}
		}
	}
}

static int run_phase(const char *name, int memfd)
{
	uint64_t start = now_ms(), w = writes, r = reads;
	mark("hostile_phase %s begin", name);
	if (!strcmp(name, "discover"))
		phase_discover();
	else if (!strcmp(name, "nvme"))
		phase_nvme(memfd);
	else if (!strcmp(name, "ports"))
		phase_ports();
	else if (!strcmp(name, "pio"))
		phase_pio();
	else if (!strcmp(name, "ecam"))
		phase_ecam();
	else if (!strcmp(name, "platform"))
		phase_platform();
	else {
		mark("hostile_error unknown_phase %s", name);
		return 1;
	}
	mark("hostile_phase %s done writes=%llu reads=%llu ms=%llu", name,
	     (unsigned long long)(writes - w), (unsigned long long)(reads - r),
	     (unsigned long long)(now_ms() - start));
	return 0;
}

int main(int argc, char **argv)
{
	static const char *all[] = {"discover", "nvme", "ports", "pio", "ecam", "platform"};
	int opt, status = 0;
	rng = (uint64_t)now_ms() * 0x9e3779b97f4a7c15ULL | 1;
	while ((opt = getopt(argc, argv, "s:r:")) != -1) {
		switch (opt) {
		case 's': rng = strtoull(optarg, NULL, 0) | 1; break;
		case 'r': rounds = atoi(optarg) > 0 ? atoi(optarg) : 1; break;
		default:
			fprintf(stderr, "usage: hostile [-s SEED] [-r ROUNDS] [PHASE...]\n");
			return 2;
		}
	}
	mark("hostile_seed %llu rounds=%d", (unsigned long long)rng, rounds);
	int memfd = open("/dev/mem", O_RDWR | O_SYNC);
	if (memfd < 0) {
		mark("hostile_error open_dev_mem errno=%d", errno);
		return 1;
	}
	void *map = mmap(NULL, ECAM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, (off_t)ECAM_BASE);
	if (map == MAP_FAILED) {
		mark("hostile_error mmap_ecam errno=%d (iomem=relaxed on the kernel command line?)", errno);
		return 1;
	}
	ecam = map;
	if (iopl(3) != 0) {
		mark("hostile_error iopl errno=%d", errno);
		return 1;
	}
	if (optind < argc) {
		if (strcmp(argv[optind], "discover"))
			run_phase("discover", memfd);
		for (int i = optind; i < argc; i++)
			status |= run_phase(argv[i], memfd);
	} else {
		for (unsigned i = 0; i < sizeof(all) / sizeof(all[0]); i++)
			status |= run_phase(all[i], memfd);
	}
	/* The host bridge must still be there and answer with its identity both ways. */
	uint32_t ecam_id = ecam_read32(0, 0, 0, 0);
	uint32_t pio_id = (uint32_t)pio_read(0, 0, 0, 0, 4);
	mark("hostile_check host_bridge %s ecam=%08x pio=%08x",
	     ecam_id == 0x00081b36 && pio_id == 0x00081b36 ? "ok" : "failed", ecam_id, pio_id);
	mark("hostile_done writes=%llu reads=%llu", (unsigned long long)writes, (unsigned long long)reads);
	return status;
}

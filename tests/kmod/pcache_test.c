// SPDX-License-Identifier: GPL-2.0
/*
 * Description: tests of lego_pcache.ko (kmod/) through /dev/lego_pcache, run
 * as root inside a qemu guest by tests/kmod/run_in_qemu.sh (the host cannot
 * load modules). Each test is a row of tests[] below: a name, what it guards,
 * and a function returning 0 or 1. Usage: pcache_test [-l] [-f substring].
 *
 * Covers: the INFO query; A/D bits after reads and writes, and their
 * clearing; eviction reporting dirty lines, keeping them, and the data of
 * evicted lines being gone (anonymous memory reads back zeros); a store
 * racing with eviction never being lost; DISCARD_DIRTY; MKCLEAN turning
 * userfaultfd-write-protected fills into writable clean lines whose later
 * stores, and writes through get_user_pages, EVICT reports, also racing
 * with fills and evictions (and its refusals: shared pages after fork(),
 * lines that are not uffd-wp); hostile arguments each failing with the
 * errno include/lego/pcache_abi.h promises; counters in sysfs and module
 * parameters.
 *
 * Every test area is MADV_NOHUGEPAGE: the guest's THP mode is "always" and
 * the module refuses lines mapped by huge pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include "lego/pcache_abi.h"

#define LINE 4096ul
#define NLINES 64

static int fd = -1;
/* -f given: some tests did not run, so counters they bump may be zero. */
static int filter_active;

#define CHECK(cond)                                                          \
	do {                                                                 \
		if (!(cond)) {                                               \
			fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__,       \
				__LINE__, #cond);                            \
			return 1;                                            \
		}                                                            \
	} while (0)

/* ioctl returning 0 or -errno, as the module does. */
static int xioctl(unsigned long cmd, void *arg)
{
	return ioctl(fd, cmd, arg) ? -errno : 0;
}

static char *map_area(size_t lines, int nohuge)
{
	char *p = mmap(NULL, lines * LINE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	if (nohuge && madvise(p, lines * LINE, MADV_NOHUGEPAGE)) {
		munmap(p, lines * LINE);
		return NULL;
	}
	return p;
}

static int ad(char *base, unsigned int n, uint32_t flags, uint64_t *acc,
	      uint64_t *dirty, uint64_t *present, struct lego_pcache_ad *out)
{
	uint64_t lines[NLINES];
	struct lego_pcache_ad a;
	unsigned int i;
	int ret;

	for (i = 0; i < n; i++)
		lines[i] = (uint64_t)(uintptr_t)(base + i * LINE);
	memset(&a, 0, sizeof(a));
	a.lines = (uintptr_t)lines;
	a.count = n;
	a.flags = flags;
	a.accessed = (uintptr_t)acc;
	a.dirty = (uintptr_t)dirty;
	a.present = (uintptr_t)present;
	ret = xioctl(LEGO_PCACHE_IOC_AD, &a);
	if (out)
		*out = a;
	return ret;
}

/* EVICT of n line addresses; the ioctl's arguments as it left them in *out. */
static int evict_lines(const uint64_t *lines, unsigned int n, uint32_t flags,
		       uint64_t *evicted, uint64_t *dirty,
		       struct lego_pcache_evict *out)
{
	struct lego_pcache_evict e;
	int ret;

	memset(&e, 0, sizeof(e));
	e.lines = (uintptr_t)lines;
	e.count = n;
	e.flags = flags;
	e.evicted = (uintptr_t)evicted;
	e.dirty = (uintptr_t)dirty;
	ret = xioctl(LEGO_PCACHE_IOC_EVICT, &e);
	if (out)
		*out = e;
	return ret;
}

static int evict(char *base, unsigned int first, unsigned int n,
		 uint32_t flags, uint64_t *evicted, uint64_t *dirty,
		 struct lego_pcache_evict *out)
{
	uint64_t lines[NLINES];
	unsigned int i;

	for (i = 0; i < n; i++)
		lines[i] = (uint64_t)(uintptr_t)(base + (first + i) * LINE);
	return evict_lines(lines, n, flags, evicted, dirty, out);
}

static void fill(char *base, unsigned int first, unsigned int n, char tag)
{
	unsigned int i;

	for (i = first; i < first + n; i++)
		memset(base + i * LINE, tag + (char)i, LINE);
}

static int all_zero(const char *p)
{
	size_t i;

	for (i = 0; i < LINE; i++)
		if (p[i])
			return 0;
	return 1;
}

/* ---- tests ---- */

static int test_info(void)
{
	struct lego_pcache_info info;

	memset(&info, 0xff, sizeof(info));
	CHECK(xioctl(LEGO_PCACHE_IOC_INFO, &info) == 0);
	CHECK(info.abi_version >> 16 == LEGO_PCACHE_ABI_MAJOR);
	CHECK(info.line_size == LEGO_PCACHE_LINE_SIZE);
	CHECK(info.max_lines == 512);
	CHECK(info.features & LEGO_PCACHE_FEAT_AD);
	CHECK(info.features & LEGO_PCACHE_FEAT_EVICT);
	CHECK(info.features & LEGO_PCACHE_FEAT_SYSFS_STATS);
	CHECK(info.features & LEGO_PCACHE_FEAT_MKCLEAN);
	CHECK((info.abi_version & 0xffff) >= 1);
	CHECK(info.reserved0 == 0 && info.reserved1 == 0);
	return 0;
}

static int test_ad_bits(void)
{
	uint64_t acc[1], dirty[1], present[1];
	struct lego_pcache_ad out;
	char *p = map_area(NLINES, 1);
	volatile char sink;
	unsigned int i;

	CHECK(p);
	/* Lines 0..47 resident (written), 48..63 never touched. */
	fill(p, 0, 48, 1);
	CHECK(ad(p, NLINES, LEGO_PCACHE_AD_FLAGS, acc, dirty, present, &out) ==
	      0);
	CHECK(out.nr_present == 48 && out.nr_dirty == 48 &&
	      out.nr_accessed == 48);
	/* Cleared: nothing accessed or dirty now. */
	CHECK(ad(p, NLINES, 0, acc, dirty, present, &out) == 0);
	CHECK(out.nr_present == 48 && out.nr_accessed == 0 &&
	      out.nr_dirty == 0);
	CHECK(acc[0] == 0 && dirty[0] == 0 && present[0] == 0xffffffffffffull);

	/* Read 0..15, write 16..31, leave 32..47 alone. */
	for (i = 0; i < 16; i++)
		sink = p[i * LINE + 7];
	(void)sink;
	for (i = 16; i < 32; i++)
		p[i * LINE + 9] = 42;
	CHECK(ad(p, NLINES, 0, acc, dirty, present, &out) == 0);
	CHECK(acc[0] == 0xffffffffull);  /* 0..31 */
	CHECK(dirty[0] == 0xffff0000ull); /* 16..31 */
	CHECK(out.nr_accessed == 32 && out.nr_dirty == 16);
	/* Test-only left them set; clear A only, D must survive. */
	CHECK(ad(p, NLINES, LEGO_PCACHE_AD_CLEAR_ACCESSED, acc, dirty, NULL,
		 &out) == 0);
	CHECK(acc[0] == 0xffffffffull && dirty[0] == 0xffff0000ull);
	CHECK(ad(p, NLINES, 0, acc, dirty, NULL, &out) == 0);
	CHECK(acc[0] == 0 && dirty[0] == 0xffff0000ull);
	/* Data untouched by all this. */
	CHECK(p[16 * LINE + 9] == 42 && p[3 * LINE] == 1 + 3);
	/* Any order and duplicates are fine for AD: line 20 twice. */
	{
		uint64_t lines[3] = { (uintptr_t)(p + 20 * LINE),
				      (uintptr_t)(p + 2 * LINE),
				      (uintptr_t)(p + 20 * LINE) };
		struct lego_pcache_ad a = { .lines = (uintptr_t)lines,
					    .dirty = (uintptr_t)dirty,
					    .count = 3,
					    .flags = LEGO_PCACHE_AD_CLEAR_DIRTY };

		CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == 0);
		CHECK(dirty[0] == 1); /* only the first occurrence */
	}
	munmap(p, NLINES * LINE);
	return 0;
}

static int test_evict_dirty_kept(void)
{
	uint64_t ev[1], dirty[1];
	struct lego_pcache_evict out;
	char *p = map_area(NLINES, 1);
	unsigned int i;

	CHECK(p);
	fill(p, 0, 32, 10);
	CHECK(ad(p, 32, LEGO_PCACHE_AD_CLEAR_DIRTY, NULL, NULL, NULL, NULL) ==
	      0);
	for (i = 0; i < 8; i++)
		p[i * LINE] = 99; /* dirty 0..7 */
	/* Evict 0..15 and 48..63 (never touched: absent). */
	CHECK(evict(p, 0, 16, 0, ev, dirty, &out) == 0);
	CHECK(dirty[0] == 0xff && ev[0] == 0xff00);
	CHECK(out.nr_dirty == 8 && out.nr_evicted == 8);
	CHECK(evict(p, 48, 16, 0, ev, dirty, &out) == 0);
	CHECK(ev[0] == 0xffff && dirty[0] == 0);
	/* Clean lines are gone: anonymous memory reads zeros again. */
	for (i = 8; i < 16; i++)
		CHECK(all_zero(p + i * LINE));
	/* Dirty lines kept with their data (the caller writes them back)... */
	for (i = 0; i < 8; i++)
		CHECK(p[i * LINE] == 99 && p[i * LINE + 1] == (char)(10 + i));
	/* ...and are clean now, so a second EVICT drops them. */
	CHECK(evict(p, 0, 8, 0, ev, dirty, &out) == 0);
	CHECK(ev[0] == 0xff && dirty[0] == 0);
	for (i = 0; i < 8; i++)
		CHECK(all_zero(p + i * LINE));
	/* A store after the first EVICT (to a kept, write-protected line)
	 * faults, re-dirties it, and is reported by the next EVICT. */
	fill(p, 16, 4, 20);
	CHECK(ad(p + 16 * LINE, 4, LEGO_PCACHE_AD_CLEAR_DIRTY, NULL, NULL,
		 NULL, NULL) == 0);
	p[17 * LINE] = 5;
	CHECK(evict(p, 16, 4, 0, ev, dirty, &out) == 0);
	CHECK(dirty[0] == 0x2 && ev[0] == 0xd);
	p[17 * LINE + 1] = 6; /* write-protected: faults, must be kept */
	CHECK(evict(p, 16, 4, 0, ev, dirty, &out) == 0);
	CHECK(dirty[0] == 0x2 && ev[0] == 0xd);
	CHECK(p[17 * LINE] == 5 && p[17 * LINE + 1] == 6 &&
	      p[17 * LINE + 2] == (char)(20 + 17));
	CHECK(evict(p, 16, 4, 0, ev, dirty, &out) == 0);
	CHECK(dirty[0] == 0 && ev[0] == 0xf && all_zero(p + 17 * LINE));
	munmap(p, NLINES * LINE);
	return 0;
}

static int test_evict_discard_dirty(void)
{
	uint64_t ev[1], dirty[1];
	struct lego_pcache_evict out;
	char *p = map_area(NLINES, 1);
	unsigned int i;

	CHECK(p);
	fill(p, 0, 16, 30);
	CHECK(ad(p, 16, LEGO_PCACHE_AD_CLEAR_DIRTY, NULL, NULL, NULL, NULL) ==
	      0);
	for (i = 4; i < 8; i++)
		p[i * LINE] = 1;
	CHECK(evict(p, 0, 16, LEGO_PCACHE_EVICT_DISCARD_DIRTY, ev, dirty,
		    &out) == 0);
	CHECK(ev[0] == 0xffff && dirty[0] == 0xf0);
	CHECK(out.nr_evicted == 16 && out.nr_dirty == 4);
	for (i = 0; i < 16; i++)
		CHECK(all_zero(p + i * LINE));
	munmap(p, NLINES * LINE);
	return 0;
}

/*
 * A writer stores an increasing sequence number into one line while the main
 * thread runs the runtime's eviction protocol on it: EVICT; if dirty, copy
 * the line to the "backend" and EVICT again. When the writer finds the line
 * evicted (it reads 0), the backend must hold the last number it stored: an
 * eviction that dropped a racing store would leave an older one there.
 */
static _Atomic uint64_t race_backend, race_stop, race_refills;
static _Atomic int race_bad;
static volatile uint64_t *race_line;

static void *race_writer(void *unused)
{
	uint64_t last = 0;

	(void)unused;
	while (!atomic_load(&race_stop)) {
		uint64_t v = *race_line;

		if (v != last) {
			if (v != 0 || atomic_load(&race_backend) != last) {
				fprintf(stderr,
					"  lost store: line %llu, last %llu, backend %llu\n",
					(unsigned long long)v,
					(unsigned long long)last,
					(unsigned long long)atomic_load(
						&race_backend));
				atomic_store(&race_bad, 1);
				break;
			}
			atomic_fetch_add(&race_refills, 1);
		}
		*race_line = ++last;
		/* Pause now and then so that some evictions find it clean. */
		for (volatile unsigned long k = (last * 7919) % 150000; k; k--)
			;
	}
	return NULL;
}

static int test_evict_races_store(void)
{
	char *p = map_area(1, 1);
	uint64_t ev[1], dirty[1];
	unsigned int i, nr_dirty = 0, nr_clean = 0;
	pthread_t t;

	CHECK(p);
	race_line = (volatile uint64_t *)p;
	CHECK(pthread_create(&t, NULL, race_writer, NULL) == 0);
	for (i = 0; i < 3000 && !atomic_load(&race_bad); i++) {
		CHECK(evict(p, 0, 1, 0, ev, dirty, NULL) == 0);
		if (dirty[0]) {
			/* Kept and write-protected: copy it out. */
			atomic_store(&race_backend, *race_line);
			nr_dirty++;
		} else {
			nr_clean++;
		}
	}
	atomic_store(&race_stop, 1);
	pthread_join(t, NULL);
	printf("  %u evictions: %u dirty (written back), %u clean, %llu refills seen by the writer\n",
	       i, nr_dirty, nr_clean,
	       (unsigned long long)atomic_load(&race_refills));
	CHECK(!atomic_load(&race_bad));
	CHECK(nr_dirty > 0 && nr_clean > 0);
	munmap(p, LINE);
	return 0;
}

/* ---- MKCLEAN: needs lines filled by userfaultfd with MODE_WP ---- */

/*
 * A userfaultfd region as lego's runtime sets one up: MISSING | WP,
 * UFFD_FEATURE_SIGBUS. The test serves faults itself in a SIGBUS handler
 * and counts them: a missing fault gets a zero line, a write-protect fault
 * is un-protected. MKCLEAN's point is that a store after it takes no fault.
 */
static int uffd = -1;
static _Atomic unsigned long uffd_wp_faults, uffd_missing_faults;
/* Set by mkclean_races_store: a missing line is fetched from its "backend"
 * (its first word is race_backend), as the runtime fetches from the memory
 * node, instead of read as zeros. */
static _Atomic int uffd_fetch_backend;

static void uffd_sigbus(int sig, siginfo_t *info, void *ctx)
{
	static char zeros[LINE] __attribute__((aligned(4096)));
	static char fetched[LINE] __attribute__((aligned(4096)));
	uintptr_t page = (uintptr_t)info->si_addr & ~(LINE - 1);
	struct uffdio_copy copy = { .dst = page, .src = (uintptr_t)zeros,
				    .len = LINE };
	struct uffdio_writeprotect wp = { .range = { .start = page,
						     .len = LINE } };

	(void)sig;
	(void)ctx;
	if (atomic_load(&uffd_fetch_backend)) {
		*(uint64_t *)fetched = atomic_load(&race_backend);
		copy.src = (uintptr_t)fetched;
	}
	if (ioctl(uffd, UFFDIO_COPY, &copy) == 0) {
		atomic_fetch_add(&uffd_missing_faults, 1);
		return;
	}
	if (errno != EEXIST || ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) != 0)
		abort();
	atomic_fetch_add(&uffd_wp_faults, 1);
}

static int uffd_setup(void)
{
	struct uffdio_api api = { .api = UFFD_API,
				  .features = UFFD_FEATURE_SIGBUS };
	struct sigaction sa;

	if (uffd >= 0)
		return 0;
	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api))
		return -1;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = uffd_sigbus;
	sa.sa_flags = SA_SIGINFO;
	sigfillset(&sa.sa_mask);
	return sigaction(SIGBUS, &sa, NULL);
}

/* An area registered MISSING | WP (nohuge), or NULL. */
static char *uffd_area(size_t lines)
{
	char *p = map_area(lines, 1);
	struct uffdio_register reg;

	if (!p || uffd_setup())
		return NULL;
	memset(&reg, 0, sizeof(reg));
	reg.range.start = (uintptr_t)p;
	reg.range.len = lines * LINE;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP;
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		return NULL;
	return p;
}

/* Fill line @i of @p with @tag bytes, as the runtime fills a load miss. */
static int uffd_fill(char *p, unsigned int i, char tag, int wp)
{
	static char src[LINE] __attribute__((aligned(4096)));
	struct uffdio_copy copy = { .dst = (uintptr_t)(p + i * LINE),
				    .src = (uintptr_t)src,
				    .len = LINE,
				    .mode = wp ? UFFDIO_COPY_MODE_WP : 0 };

	memset(src, tag, LINE);
	return ioctl(uffd, UFFDIO_COPY, &copy);
}

static int mkclean(char *base, const unsigned int *idx, unsigned int n,
		   uint64_t *done, struct lego_pcache_mkclean *out)
{
	uint64_t lines[NLINES];
	struct lego_pcache_mkclean m;
	unsigned int i;
	int ret;

	for (i = 0; i < n; i++)
		lines[i] = (uint64_t)(uintptr_t)(base + idx[i] * LINE);
	memset(&m, 0, sizeof(m));
	m.lines = (uintptr_t)lines;
	m.count = n;
	m.done = (uintptr_t)done;
	ret = xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m);
	if (out)
		*out = m;
	return ret;
}

/* /proc/self/pagemap bit 57: the PTE is uffd-wp write-protected. */
static int uffd_wp_bit(const void *addr)
{
	uint64_t entry = 0;
	int pm = open("/proc/self/pagemap", O_RDONLY);
	ssize_t got;

	if (pm < 0)
		return -1;
	got = pread(pm, &entry, sizeof(entry),
		    (off_t)((uintptr_t)addr / LINE * sizeof(entry)));
	close(pm);
	if (got != sizeof(entry))
		return -1;
	return (int)((entry >> 57) & 1);
}

/*
 * The runtime's write-light protocol: fill with MODE_WP, MKCLEAN, then
 * stores take no fault, set D, and EVICT keeps exactly the stored lines
 * (with their data) and drops the rest.
 */
static int test_mkclean_fill(void)
{
	unsigned int idx[NLINES], i;
	uint64_t done[1], acc[1], dirty[1], present[1], ev[1];
	struct lego_pcache_mkclean out;
	unsigned long wp0, miss0;
	char *p = uffd_area(NLINES);

	CHECK(p);
	/* 0..31 load-miss fills (uffd-wp); 32..39 store-miss fills
	 * (writable); 40..63 absent. */
	for (i = 0; i < 32; i++)
		CHECK(uffd_fill(p, i, (char)(i + 1), 1) == 0);
	for (i = 32; i < 40; i++)
		CHECK(uffd_fill(p, i, (char)(i + 1), 0) == 0);
	/* UFFDIO_COPY set D on every fill: this is why MKCLEAN exists. */
	CHECK(ad(p, 40, 0, acc, dirty, present, NULL) == 0);
	CHECK(present[0] == 0xffffffffffull && dirty[0] == 0xffffffffffull);
	CHECK(uffd_wp_bit(p) == 1);

	for (i = 0; i < NLINES; i++)
		idx[i] = i;
	CHECK(mkclean(p, idx, NLINES, done, &out) == 0);
	CHECK(done[0] == 0xffffffffull && out.nr_done == 32);
	/* Only the uffd-wp lines changed: clean now, no longer uffd-wp. */
	CHECK(ad(p, 40, 0, acc, dirty, present, NULL) == 0);
	CHECK(dirty[0] == 0xff00000000ull && present[0] == 0xffffffffffull);
	CHECK(uffd_wp_bit(p) == 0 && uffd_wp_bit(p + 5 * LINE) == 0);
	/* Again: nothing left to do (already writable). */
	CHECK(mkclean(p, idx, NLINES, done, &out) == 0);
	CHECK(done[0] == 0 && out.nr_done == 0);

	/* Stores to 0..7 take no fault and set D. */
	wp0 = atomic_load(&uffd_wp_faults);
	miss0 = atomic_load(&uffd_missing_faults);
	for (i = 0; i < 8; i++)
		p[i * LINE + 3] = 77;
	CHECK(atomic_load(&uffd_wp_faults) == wp0);
	CHECK(atomic_load(&uffd_missing_faults) == miss0);
	CHECK(ad(p, 32, 0, acc, dirty, present, NULL) == 0);
	CHECK(dirty[0] == 0xff);

	/* EVICT all 0..31: 0..7 kept (dirty), 8..31 dropped (clean). */
	CHECK(evict(p, 0, 32, 0, ev, dirty, NULL) == 0);
	CHECK(dirty[0] == 0xff && ev[0] == 0xffffff00ull);
	for (i = 0; i < 8; i++)
		CHECK(p[i * LINE + 3] == 77 && p[i * LINE] == (char)(i + 1));
	/* A store after EVICT kept the line faults in the kernel (not in
	 * userfaultfd: the line is no longer uffd-wp) and is reported. */
	p[2 * LINE + 4] = 55;
	CHECK(atomic_load(&uffd_wp_faults) == wp0);
	CHECK(evict(p, 0, 8, 0, ev, dirty, NULL) == 0);
	CHECK(dirty[0] == 0x4 && ev[0] == 0xfb);
	CHECK(p[2 * LINE + 4] == 55 && p[2 * LINE + 3] == 77);
	CHECK(evict(p, 0, 8, 0, ev, dirty, NULL) == 0);
	CHECK(dirty[0] == 0 && ev[0] == 0xff);
	/* Evicted lines are absent: the next touch is a missing fault. */
	CHECK(p[9 * LINE] == 0);
	CHECK(atomic_load(&uffd_missing_faults) == miss0 + 1);
	munmap(p, NLINES * LINE);
	return 0;
}

/*
 * A store that raced with MKCLEAN (it faulted on the uffd-wp PTE first) is
 * un-protected by the fault handler and still sets D: whichever comes
 * first, EVICT reports the line dirty.
 */
static int test_mkclean_after_wp_fault(void)
{
	unsigned int idx[1] = { 0 };
	uint64_t done[1], ev[1], dirty[1];
	unsigned long wp0;
	char *p = uffd_area(1);

	CHECK(p);
	CHECK(uffd_fill(p, 0, 9, 1) == 0);
	wp0 = atomic_load(&uffd_wp_faults);
	p[1] = 1; /* faults: the handler un-protects (writable, D stays set) */
	CHECK(atomic_load(&uffd_wp_faults) == wp0 + 1);
	CHECK(mkclean(p, idx, 1, done, NULL) == 0);
	CHECK(done[0] == 0); /* already writable: left alone, D kept */
	CHECK(evict(p, 0, 1, 0, ev, dirty, NULL) == 0);
	CHECK(dirty[0] == 1 && ev[0] == 0 && p[1] == 1 && p[2] == 9);
	munmap(p, LINE);
	return 0;
}

/*
 * Writes that bypass the page tables (get_user_pages: process_vm_writev,
 * ptrace, O_DIRECT reads) leave D clear; they mark the page dirty instead.
 * After MKCLEAN such a write must still make EVICT report the line dirty,
 * or the runtime would drop it. Before MKCLEAN the uffd-wp PTE made them
 * fault; now the page's dirty flag is what EVICT has to see.
 */
static int test_mkclean_gup_write(void)
{
	unsigned int idx[2] = { 0, 1 };
	uint64_t done[1], ev[1], dirty[1], acc[1], ad_dirty[1];
	char *p = uffd_area(2), buf[16] = "written by gup";
	struct iovec local = { .iov_base = buf, .iov_len = sizeof(buf) };
	struct iovec remote;

	CHECK(p);
	CHECK(uffd_fill(p, 0, 4, 1) == 0);
	CHECK(uffd_fill(p, 1, 5, 1) == 0);
	CHECK(mkclean(p, idx, 2, done, NULL) == 0);
	CHECK(done[0] == 3);
	remote.iov_base = p + 100;
	remote.iov_len = sizeof(buf);
	CHECK(process_vm_writev(getpid(), &local, 1, &remote, 1, 0) ==
	      (ssize_t)sizeof(buf));
	/* AD sees only the PTE: D is clear, as for line 1. */
	CHECK(ad(p, 2, 0, acc, ad_dirty, NULL, NULL) == 0);
	CHECK(ad_dirty[0] == 0);
	/* EVICT keeps line 0 (the page is dirty), drops line 1. */
	CHECK(evict(p, 0, 2, 0, ev, dirty, NULL) == 0);
	CHECK(dirty[0] == 1 && ev[0] == 2);
	CHECK(memcmp(p + 100, buf, sizeof(buf)) == 0 && p[0] == 4);
	/* Written back now: the next EVICT drops it. */
	CHECK(evict(p, 0, 1, 0, ev, dirty, NULL) == 0);
	CHECK(dirty[0] == 0 && ev[0] == 1);
	munmap(p, 2 * LINE);
	return 0;
}

/*
 * After fork() the parent's pages are shared copy-on-write with the child:
 * MKCLEAN must not make them writable (the child would see the parent's
 * stores). It leaves them uffd-wp and counts them in mkclean_shared.
 */
static int test_mkclean_shared_after_fork(void)
{
	unsigned int idx[1] = { 0 };
	uint64_t done[1];
	int go[2], res[2];
	char *p = uffd_area(1), r = 0;
	pid_t pid;
	int status;

	CHECK(p);
	CHECK(uffd_fill(p, 0, 21, 1) == 0);
	CHECK(pipe(go) == 0 && pipe(res) == 0);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		char c;

		/* The child's VMA is not registered (no EVENT_FORK). */
		if (read(go[0], &c, 1) != 1)
			_exit(2);
		c = p[5];
		_exit(write(res[1], &c, 1) == 1 ? 0 : 3);
	}
	CHECK(mkclean(p, idx, 1, done, NULL) == 0);
	CHECK(done[0] == 0);
	CHECK(uffd_wp_bit(p) == 1);
	/* The parent's store goes through userfaultfd and copies the page. */
	p[5] = 99;
	CHECK(write(go[1], "x", 1) == 1);
	CHECK(read(res[0], &r, 1) == 1);
	CHECK(waitpid(pid, &status, 0) == pid && WIFEXITED(status) &&
	      WEXITSTATUS(status) == 0);
	CHECK(r == 21 && p[5] == 99);
	close(go[0]);
	close(go[1]);
	close(res[0]);
	close(res[1]);
	munmap(p, LINE);
	return 0;
}

/*
 * The race the runtime lives with: a writer stores increasing numbers into a
 * line while the main thread refills it as a load miss (UFFDIO_COPY_MODE_WP
 * from the "backend", then MKCLEAN) and runs the eviction protocol on it
 * (EVICT; if dirty, copy it to the backend; EVICT again next round). The
 * writer's stores race the fill (write-protect faults, un-protected by the
 * SIGBUS handler, which also fetches the line from the backend when the
 * writer misses it), MKCLEAN and EVICT. Every value the writer reads must be
 * the last it stored: a store lost by an eviction would bring back an older
 * backend value (race_writer checks this).
 */
static int test_mkclean_races_store(void)
{
	static char src[LINE] __attribute__((aligned(4096)));
	char *p = uffd_area(1);
	unsigned int i, nr_dirty = 0, nr_clean = 0, nr_done = 0, nr_fills = 0;
	unsigned int idx[1] = { 0 };
	uint64_t ev[1], dirty[1], done[1];
	struct uffdio_copy copy;
	pthread_t t;

	CHECK(p);
	atomic_store(&race_backend, 0);
	atomic_store(&race_stop, 0);
	atomic_store(&race_refills, 0);
	atomic_store(&race_bad, 0);
	atomic_store(&uffd_fetch_backend, 1);
	race_line = (volatile uint64_t *)p;
	CHECK(pthread_create(&t, NULL, race_writer, NULL) == 0);
	for (i = 0; i < 2000 && !atomic_load(&race_bad); i++) {
		/* A load miss, fetched from the backend and write-protected
		 * (EEXIST: the writer's own miss filled it first, or EVICT
		 * kept it last round). */
		*(uint64_t *)src = atomic_load(&race_backend);
		memset(&copy, 0, sizeof(copy));
		copy.dst = (uintptr_t)p;
		copy.src = (uintptr_t)src;
		copy.len = LINE;
		copy.mode = UFFDIO_COPY_MODE_WP;
		if (ioctl(uffd, UFFDIO_COPY, &copy) == 0)
			nr_fills++;
		else
			CHECK(errno == EEXIST);
		CHECK(mkclean(p, idx, 1, done, NULL) == 0);
		nr_done += done[0] & 1;
		for (volatile unsigned long k = (i * 7919) % 20000; k; k--)
			;
		CHECK(evict(p, 0, 1, 0, ev, dirty, NULL) == 0);
		if (dirty[0]) {
			/* Kept, clean and read-only: copy it out. */
			atomic_store(&race_backend, *race_line);
			nr_dirty++;
		} else {
			nr_clean++;
		}
	}
	atomic_store(&race_stop, 1);
	pthread_join(t, NULL);
	atomic_store(&uffd_fetch_backend, 0);
	printf("  %u rounds: %u fills, %u MKCLEANed, %u dirty, %u clean, %lu wp faults\n",
	       i, nr_fills, nr_done, nr_dirty, nr_clean,
	       atomic_load(&uffd_wp_faults));
	CHECK(!atomic_load(&race_bad));
	CHECK(atomic_load(&race_refills) == 0);
	CHECK(nr_done > 0 && nr_dirty > 0 && nr_clean > 0);
	munmap(p, LINE);
	return 0;
}

/* MKCLEAN's argument checks, on top of those test_hostile covers. */
static int test_mkclean_hostile(void)
{
	const unsigned long kaddr = 0xffffffff81000000ul;
	char *p = uffd_area(4), *plain = map_area(1, 1), *ro, *shared;
	struct lego_pcache_mkclean m;
	uint64_t lines[2], bm[2];
	struct uffdio_register reg;

	CHECK(p && plain);
	CHECK(uffd_fill(p, 0, 1, 1) == 0);
	plain[0] = 1;
#define MK_INIT()                                             \
	do {                                                  \
		memset(&m, 0, sizeof(m));                     \
		lines[0] = (uintptr_t)p;                      \
		m.lines = (uintptr_t)lines;                   \
		m.count = 1;                                  \
	} while (0)
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, NULL) == -EFAULT);
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, (void *)kaddr) == -EFAULT);
	CHECK(xioctl(_IOWR(LEGO_PCACHE_IOC_MAGIC, 0x43, uint64_t), &m) ==
	      -ENOTTY);
	MK_INIT();
	m.flags = 1;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	MK_INIT();
	m.reserved0 = 1;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	MK_INIT();
	m.reserved[1] = 1;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	MK_INIT();
	m.count = 0;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	MK_INIT();
	m.count = 513;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -E2BIG);
	MK_INIT();
	m.lines = 0;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EFAULT);
	MK_INIT();
	m.lines = (uintptr_t)lines + 4;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	MK_INIT();
	m.done = (uintptr_t)bm + 4;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	MK_INIT();
	m.done = kaddr;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EFAULT);
	MK_INIT();
	lines[0] = (uintptr_t)p + 8;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	MK_INIT();
	lines[0] = kaddr;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -ENOMEM);
	MK_INIT();
	lines[0] = 0x1000;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -ENOMEM);
	/* Not registered for uffd-wp. */
	MK_INIT();
	lines[0] = (uintptr_t)plain;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	/* A good line and a bad one: the batch fails, nothing changes. */
	MK_INIT();
	lines[1] = (uintptr_t)plain;
	m.count = 2;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	CHECK(uffd_wp_bit(p) == 1);
	/* Registered for uffd-wp, but read-only (mprotect): never made
	 * writable, whatever the PTE says. */
	CHECK(uffd_fill(p, 1, 2, 1) == 0);
	CHECK(mprotect(p + LINE, LINE, PROT_READ) == 0);
	MK_INIT();
	lines[0] = (uintptr_t)p + LINE;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	CHECK(uffd_wp_bit(p + LINE) == 1);
	/* Shared anonymous memory registered for uffd-wp (6.1 allows shmem
	 * WP): refused like every shared VMA. */
	shared = mmap(NULL, LINE, PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(shared != MAP_FAILED);
	madvise(shared, LINE, MADV_NOHUGEPAGE);
	memset(&reg, 0, sizeof(reg));
	reg.range.start = (uintptr_t)shared;
	reg.range.len = LINE;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	CHECK(ioctl(uffd, UFFDIO_REGISTER, &reg) == 0);
	MK_INIT();
	lines[0] = (uintptr_t)shared;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EINVAL);
	/* A read-only result bitmap. */
	ro = mmap(NULL, LINE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(ro != MAP_FAILED);
	MK_INIT();
	m.done = (uintptr_t)ro;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == -EFAULT);
	CHECK(uffd_wp_bit(p) == 1); /* every failed call changed nothing */
	/* And a good call still works. */
	MK_INIT();
	m.done = (uintptr_t)bm;
	CHECK(xioctl(LEGO_PCACHE_IOC_MKCLEAN, &m) == 0);
	CHECK(m.nr_done == 1 && bm[0] == 1 && uffd_wp_bit(p) == 0);
	munmap(ro, LINE);
	munmap(shared, LINE);
	munmap(plain, LINE);
	munmap(p, 4 * LINE);
	return 0;
}

static long read_long(const char *path)
{
	char buf[64] = "";
	FILE *f = fopen(path, "r");

	if (!f)
		return -1;
	if (!fgets(buf, sizeof(buf), f))
		buf[0] = 0;
	fclose(f);
	return strtol(buf, NULL, 10);
}

/* Each hostile argument fails with the errno pcache_abi.h documents. */
static int test_hostile(void)
{
	const unsigned long kaddr = 0xffffffff81000000ul;
	/* Below vm.mmap_min_addr: never in a VMA of ours. */
	const unsigned long nowhere = 0x1000ul;
	char *p = map_area(NLINES, 1), *hole, *huge, *shared, *file, *locked,
	     *ro;
	uint64_t lines[NLINES + 1], bm[64];
	struct lego_pcache_ad a;
	struct lego_pcache_evict e;
	int tfd;

	CHECK(p);
	fill(p, 0, NLINES, 3);
#define AD_INIT()                                             \
	do {                                                  \
		memset(&a, 0, sizeof(a));                     \
		lines[0] = (uintptr_t)p;                      \
		a.lines = (uintptr_t)lines;                   \
		a.count = 1;                                  \
	} while (0)
#define EV_INIT()                                             \
	do {                                                  \
		memset(&e, 0, sizeof(e));                     \
		lines[0] = (uintptr_t)p;                      \
		e.lines = (uintptr_t)lines;                   \
		e.count = 1;                                  \
	} while (0)

	/* Bad argument struct pointers. */
	CHECK(xioctl(LEGO_PCACHE_IOC_INFO, NULL) == -EFAULT);
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, NULL) == -EFAULT);
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, NULL) == -EFAULT);
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, (void *)kaddr) == -EFAULT);
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, (void *)kaddr) == -EFAULT);
	CHECK(xioctl(LEGO_PCACHE_IOC_INFO, (void *)kaddr) == -EFAULT);
	/* Unknown ioctls, and a known number with the wrong struct size. */
	CHECK(xioctl(_IO(LEGO_PCACHE_IOC_MAGIC, 0x4f), &a) == -ENOTTY);
	CHECK(xioctl(_IOWR(LEGO_PCACHE_IOC_MAGIC, 0x41, uint64_t), &a) ==
	      -ENOTTY);

	/* The lines array. */
	AD_INIT();
	a.lines = 0;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EFAULT);
	AD_INIT();
	a.lines = (uintptr_t)lines + 1;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
	AD_INIT();
	a.lines = kaddr;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EFAULT);
	hole = map_area(1, 1);
	CHECK(hole);
	munmap(hole, LINE);
	AD_INIT();
	a.lines = (uintptr_t)hole;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EFAULT);
	/* Checked now: a later mmap may well reuse the hole. */
	AD_INIT();
	lines[0] = (uintptr_t)hole;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -ENOMEM);
	EV_INIT();
	lines[0] = (uintptr_t)hole;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -ENOMEM);
	/* Counts. */
	AD_INIT();
	a.count = 0;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
	AD_INIT();
	a.count = 513;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -E2BIG);
	AD_INIT();
	a.count = 0xffffffffu;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -E2BIG);
	EV_INIT();
	e.count = 0x80000000u;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -E2BIG);
	/* count larger than the array actually mapped: the tail is a hole. */
	AD_INIT();
	a.lines = (uintptr_t)(p + NLINES * LINE - 8);
	a.count = 2;
	p[NLINES * LINE - 8] = 0;
	{
		/* EFAULT if the page after p is unmapped, else a bad line. */
		int r = xioctl(LEGO_PCACHE_IOC_AD, &a);

		CHECK(r == -EFAULT || r == -ENOMEM || r == -EINVAL);
	}
	/* Flags and reserved fields. */
	AD_INIT();
	a.flags = 1u << 7;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
	AD_INIT();
	a.reserved[2] = 1;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
	EV_INIT();
	e.flags = 1u << 31;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);
	EV_INIT();
	e.reserved0 = 1;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);
	EV_INIT();
	e.reserved[3] = 1;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);

	/* Result bitmaps: unaligned, kernel, read-only. */
	AD_INIT();
	a.dirty = (uintptr_t)bm + 4;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
	AD_INIT();
	a.accessed = kaddr;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EFAULT);
	ro = mmap(NULL, LINE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(ro != MAP_FAILED);
	EV_INIT();
	e.dirty = (uintptr_t)ro;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EFAULT);
	CHECK(p[1] == 3); /* a failed call changed nothing */

	/* Line addresses. */
	AD_INIT();
	lines[0] = (uintptr_t)p + 8;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
	AD_INIT();
	lines[0] = nowhere;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -ENOMEM);
	AD_INIT();
	lines[0] = 0;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -ENOMEM);
	AD_INIT();
	lines[0] = kaddr;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -ENOMEM);
	EV_INIT();
	lines[0] = kaddr;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -ENOMEM);
	AD_INIT();
	lines[0] = 0x0000800000000000ull; /* first non-canonical */
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -ENOMEM);
	AD_INIT();
	lines[0] = 0xfffffffffffff000ull;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -ENOMEM);
	/* One bad line in a batch fails the batch before anything changes. */
	EV_INIT();
	lines[0] = (uintptr_t)p;
	lines[1] = kaddr; /* ascending, so the address is what fails */
	e.count = 2;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -ENOMEM);
	CHECK(p[1] == 3);
	/* EVICT wants strictly ascending lines. */
	EV_INIT();
	lines[1] = (uintptr_t)p;
	e.count = 2;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);
	EV_INIT();
	lines[0] = (uintptr_t)p + LINE;
	lines[1] = (uintptr_t)p;
	e.count = 2;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);
	CHECK(p[1] == 3 && p[LINE + 1] == 4);

	/* VMAs that are not private anonymous NOHUGEPAGE memory. */
	shared = mmap(NULL, LINE, PROT_READ | PROT_WRITE,
		      MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	CHECK(shared != MAP_FAILED);
	shared[0] = 1;
	madvise(shared, LINE, MADV_NOHUGEPAGE);
	AD_INIT();
	lines[0] = (uintptr_t)shared;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
	EV_INIT();
	lines[0] = (uintptr_t)shared;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);
	CHECK(shared[0] == 1);

	tfd = open("/proc/self/exe", O_RDONLY);
	CHECK(tfd >= 0);
	file = mmap(NULL, LINE, PROT_READ | PROT_WRITE, MAP_PRIVATE, tfd, 0);
	CHECK(file != MAP_FAILED);
	file[100] = 1; /* a private COW copy: still a file VMA */
	madvise(file, LINE, MADV_NOHUGEPAGE);
	AD_INIT();
	lines[0] = (uintptr_t)file;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
	EV_INIT();
	lines[0] = (uintptr_t)file;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);
	close(tfd);

	locked = map_area(1, 1);
	CHECK(locked && mlock(locked, LINE) == 0);
	EV_INIT();
	lines[0] = (uintptr_t)locked;
	CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);
	AD_INIT(); /* AD is fine on locked memory */
	lines[0] = (uintptr_t)locked;
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == 0);

	/* Without MADV_NOHUGEPAGE. */
	{
		char *h = map_area(1, 0);

		CHECK(h);
		h[0] = 1;
		AD_INIT();
		lines[0] = (uintptr_t)h;
		CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
		munmap(h, LINE);
	}
	/* A huge page made before MADV_NOHUGEPAGE (THP is "always"). */
	huge = mmap(NULL, 4ul << 20, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(huge != MAP_FAILED);
	{
		char *h2 = (char *)(((uintptr_t)huge + (2ul << 20) - 1) &
				    ~((2ul << 20) - 1));

		memset(h2, 1, 2ul << 20);
		CHECK(madvise(huge, 4ul << 20, MADV_NOHUGEPAGE) == 0);
		AD_INIT();
		lines[0] = (uintptr_t)h2 + 5 * LINE;
		CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == -EINVAL);
		EV_INIT();
		lines[0] = (uintptr_t)h2 + 5 * LINE;
		CHECK(xioctl(LEGO_PCACHE_IOC_EVICT, &e) == -EINVAL);
		CHECK(h2[5 * LINE] == 1);
	}

	/* A valid call still works after all that. */
	AD_INIT();
	CHECK(xioctl(LEGO_PCACHE_IOC_AD, &a) == 0);
	munmap(huge, 4ul << 20);
	munmap(locked, LINE);
	munmap(file, LINE);
	munmap(shared, LINE);
	munmap(ro, LINE);
	munmap(p, NLINES * LINE);
	return 0;
}

static int test_sysfs(void)
{
	const char *d = "/sys/class/misc/lego_pcache/stats/";
	char path[256];

	snprintf(path, sizeof(path), "%sad_calls", d);
	CHECK(read_long(path) > 0);
	snprintf(path, sizeof(path), "%sevict_zapped", d);
	CHECK(read_long(path) > 0);
	snprintf(path, sizeof(path), "%serrors", d);
	CHECK(read_long(path) > 20);
	snprintf(path, sizeof(path), "%stlb_flushes", d);
	CHECK(read_long(path) > 0);
	if (!filter_active) {
		snprintf(path, sizeof(path), "%smkclean_done", d);
		CHECK(read_long(path) > 0);
		snprintf(path, sizeof(path), "%smkclean_shared", d);
		CHECK(read_long(path) > 0);
		snprintf(path, sizeof(path), "%sevict_page_dirty", d);
		CHECK(read_long(path) > 0);
	}
	CHECK(read_long("/sys/module/lego_pcache/parameters/max_lines") ==
	      512);
	return 0;
}

static double now_us(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

/*
 * -b: what dropping a batch of 32 scattered clean lines costs, through EVICT
 * (DISCARD_DIRTY, as the runtime drops clean victims) and through one
 * madvise(MADV_DONTNEED) per line (the runtime's way without the module on
 * 6.1). A measurement, not a test: it prints µs per batch.
 */
static int bench_drop(void)
{
	enum { BATCH = 32, STRIDE = 32, REPS = 200 };
	char *base = map_area(BATCH * STRIDE, 1);
	uint64_t lines[BATCH], evicted[1], dirty[1];
	double t_evict = 0, t_madvise = 0, t0;
	unsigned int r, i;

	if (!base)
		return 1;
	for (i = 0; i < BATCH; i++)
		lines[i] = (uint64_t)(uintptr_t)(base + (size_t)i * STRIDE * LINE);
	for (r = 0; r < REPS; r++) {
		for (i = 0; i < BATCH; i++)
			base[(size_t)i * STRIDE * LINE] = 1;
		t0 = now_us();
		if (evict_lines(lines, BATCH, LEGO_PCACHE_EVICT_DISCARD_DIRTY,
				evicted, dirty, NULL))
			return 1;
		t_evict += now_us() - t0;
		for (i = 0; i < BATCH; i++)
			base[(size_t)i * STRIDE * LINE] = 1;
		t0 = now_us();
		for (i = 0; i < BATCH; i++)
			if (madvise((void *)(uintptr_t)lines[i], LINE, MADV_DONTNEED))
				return 1;
		t_madvise += now_us() - t0;
	}
	printf("bench_drop: %d scattered lines: EVICT %.1f us, %d madvise %.1f us per batch\n",
	       BATCH, t_evict / REPS, BATCH, t_madvise / REPS);
	munmap(base, BATCH * STRIDE * LINE);
	return 0;
}

static const struct {
	const char *name;
	const char *guards;
	int (*fn)(void);
} tests[] = {
	{ "info", "the version/feature query", test_info },
	{ "ad_bits", "A/D after reads and writes; clearing; order/dups",
	  test_ad_bits },
	{ "evict_dirty_kept", "dirty lines reported and kept, clean ones gone",
	  test_evict_dirty_kept },
	{ "evict_discard_dirty", "DISCARD_DIRTY drops dirty data too",
	  test_evict_discard_dirty },
	{ "evict_races_store", "a store racing with EVICT is never lost",
	  test_evict_races_store },
	{ "hostile", "bad arguments fail with the documented errno",
	  test_hostile },
	{ "mkclean_fill", "MKCLEAN: stores after it fault-free, set D, kept by EVICT",
	  test_mkclean_fill },
	{ "mkclean_after_wp_fault", "MKCLEAN after a racing wp fault keeps D",
	  test_mkclean_after_wp_fault },
	{ "mkclean_gup_write", "a write through get_user_pages after MKCLEAN is reported dirty",
	  test_mkclean_gup_write },
	{ "mkclean_shared_after_fork", "MKCLEAN leaves COW-shared pages uffd-wp",
	  test_mkclean_shared_after_fork },
	{ "mkclean_races_store", "a store racing fill, MKCLEAN and EVICT is never lost",
	  test_mkclean_races_store },
	{ "mkclean_hostile", "MKCLEAN's bad arguments fail with the documented errno",
	  test_mkclean_hostile },
	{ "sysfs", "counters and parameters are readable (runs last)",
	  test_sysfs },
};

int main(int argc, char **argv)
{
	const char *filter = NULL;
	unsigned int i, failed = 0, ran = 0;
	int opt, bench = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "lbf:")) != -1) {
		switch (opt) {
		case 'b':
			bench = 1;
			break;
		case 'l':
			for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++)
				printf("%s\t%s\n", tests[i].name,
				       tests[i].guards);
			return 0;
		case 'f':
			filter = optarg;
			filter_active = 1;
			break;
		default:
			fprintf(stderr, "usage: %s [-l] [-b] [-f substring]\n",
				argv[0]);
			return 2;
		}
	}
	fd = open(LEGO_PCACHE_DEVICE, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		perror("open " LEGO_PCACHE_DEVICE);
		return 1;
	}
	if (bench)
		return bench_drop();
	for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		int r;

		if (filter && !strstr(tests[i].name, filter))
			continue;
		r = tests[i].fn();
		ran++;
		failed += r != 0;
		printf("%s %s (%s)\n", r ? "FAIL" : "ok  ", tests[i].name,
		       tests[i].guards);
	}
	printf("pcache_test: %u run, %u failed\n", ran, failed);
	return failed ? 1 : 0;
}

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
 * racing with eviction never being lost; DISCARD_DIRTY; hostile arguments
 * each failing with the errno include/lego/pcache_abi.h promises; counters
 * in sysfs and module parameters.
 *
 * Every test area is MADV_NOHUGEPAGE: the guest's THP mode is "always" and
 * the module refuses lines mapped by huge pages.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "lego/pcache_abi.h"

#define LINE 4096ul
#define NLINES 64

static int fd = -1;

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

static int evict(char *base, unsigned int first, unsigned int n,
		 uint32_t flags, uint64_t *evicted, uint64_t *dirty,
		 struct lego_pcache_evict *out)
{
	uint64_t lines[NLINES];
	struct lego_pcache_evict e;
	unsigned int i;
	int ret;

	for (i = 0; i < n; i++)
		lines[i] = (uint64_t)(uintptr_t)(base + (first + i) * LINE);
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
	CHECK(read_long("/sys/module/lego_pcache/parameters/max_lines") ==
	      512);
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
	{ "sysfs", "counters and parameters are readable (runs last)",
	  test_sysfs },
};

int main(int argc, char **argv)
{
	const char *filter = NULL;
	unsigned int i, failed = 0, ran = 0;
	int opt;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "lf:")) != -1) {
		switch (opt) {
		case 'l':
			for (i = 0; i < sizeof(tests) / sizeof(tests[0]); i++)
				printf("%s\t%s\n", tests[i].name,
				       tests[i].guards);
			return 0;
		case 'f':
			filter = optarg;
			break;
		default:
			fprintf(stderr, "usage: %s [-l] [-f substring]\n",
				argv[0]);
			return 2;
		}
	}
	fd = open(LEGO_PCACHE_DEVICE, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		perror("open " LEGO_PCACHE_DEVICE);
		return 1;
	}
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

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lego_pcache: internal declarations shared by the module's files.
 *
 * One file per mechanism:
 *   main.c    module parameters, the misc device, ioctl dispatch, INFO.
 *   batch.c   copying a batch in, validating it against the caller's VMAs,
 *             and every batch ioctl's end (results out, batch freed, errors
 *             counted).
 *   ad.c      LEGO_PCACHE_IOC_AD: test-and-clear of accessed/dirty bits.
 *   evict.c   LEGO_PCACHE_IOC_EVICT: eviction that cannot lose a racing store.
 *   mkclean.c LEGO_PCACHE_IOC_MKCLEAN: uffd-write-protected lines become
 *             writable and clean (dirty tracking by the D bit).
 *   stats.c   per-CPU counters, summed on read, shown in sysfs.
 *   pte_x86.h the architecture seam: PTE bit operations and the TLB flush.
 *
 * Lock order (outermost first): the caller's mmap lock (read for AD and
 * MKCLEAN, write for EVICT), then one PTE lock at a time (taken by follow_pte). Nothing here
 * takes a lock of its own. No user memory is touched while the mmap lock is
 * held: a fault on it would need the same mmap lock.
 */
#ifndef LEGO_PCACHE_INTERNAL_H
#define LEGO_PCACHE_INTERNAL_H

#include <linux/mm_types.h>
#include <linux/percpu.h>
#include <linux/types.h>

#include "lego/pcache_abi.h"

/* Module parameter max_lines, clamped to [1, LEGO_PCACHE_MAX_LINES_LIMIT]. */
extern unsigned int lego_max_lines;

/*
 * A batch of lines copied from the caller, with kernel-side result bitmaps
 * and a byte of scratch per line. Built by lego_batch_get() before the mmap
 * lock is taken, because copying from user memory may fault.
 *
 * Memory: a batch of up to LEGO_BATCH_INLINE lines lives in the struct (on
 * the ioctl's stack) and costs no allocation, which matters for MKCLEAN, called
 * once per miss with one line; a larger one takes one kmalloc for everything.
 */
#define LEGO_BATCH_MAX_OUT 3
#define LEGO_BATCH_INLINE 16
struct lego_batch {
	u64 *lines;                            /* count addresses, kernel copy */
	u32 count;
	u32 words;                             /* u64 words per bitmap */
	u64 *out[LEGO_BATCH_MAX_OUT];          /* kernel bitmaps, or NULL */
	u64 __user *uout[LEGO_BATCH_MAX_OUT];  /* caller's bitmaps, or NULL */
	u8 *scratch;                           /* count bytes, zeroed */
	void *block;                           /* the allocation, or NULL */
	u64 inline_lines[LEGO_BATCH_INLINE];
	u64 inline_out[LEGO_BATCH_MAX_OUT];    /* one word each */
	u8 inline_scratch[LEGO_BATCH_INLINE];
};

/* What a batch's lines are checked for (each VMA kind has its own rules). */
enum lego_vma_use {
	LEGO_VMA_AD,      /* private anonymous, MADV_NOHUGEPAGE */
	LEGO_VMA_EVICT,   /* ... and not mlocked */
	LEGO_VMA_MKCLEAN, /* ... and VM_WRITE, registered for uffd-wp */
};

int lego_batch_get(struct lego_batch *b, u64 ulines, u32 count,
		   const u64 *uout, int nout);
int lego_batch_check_vmas(struct mm_struct *mm, const struct lego_batch *b,
			  enum lego_vma_use use);
long lego_batch_finish(struct lego_batch *b, void __user *uarg,
		       const void *arg, size_t size, long ret);

static inline void lego_bitmap_set(u64 *map, u32 i)
{
	if (map)
		map[i / 64] |= 1ull << (i % 64);
}

long lego_ioctl_ad(struct lego_pcache_ad __user *uarg);
long lego_ioctl_evict(struct lego_pcache_evict __user *uarg);
long lego_ioctl_mkclean(struct lego_pcache_mkclean __user *uarg);

/*
 * Counters. Each counts events since the module was loaded; each is kept per
 * CPU (incremented with preemption-safe this_cpu ops) and summed on read.
 * The sysfs file names are the field names.
 */
struct lego_pcache_stats {
	u64 ad_calls;              /* AD calls that succeeded */
	u64 ad_lines;              /* lines examined by AD */
	u64 ad_accessed;           /* lines AD found accessed */
	u64 ad_dirty;              /* lines AD found dirty */
	u64 evict_calls;           /* EVICT calls that succeeded */
	u64 evict_lines;           /* lines examined by EVICT */
	u64 evict_zapped;          /* resident lines EVICT unmapped */
	u64 evict_absent;          /* lines EVICT found not resident */
	u64 evict_dirty_kept;      /* dirty lines EVICT cleaned and kept */
	u64 evict_dirty_discarded; /* dirty lines dropped (DISCARD_DIRTY) */
	u64 evict_swapped_kept;    /* swap/migration entries kept as dirty */
	u64 evict_page_dirty;      /* lines with D clear reported dirty because
				    * their page was written around the PTE */
	u64 mkclean_calls;         /* MKCLEAN calls that succeeded */
	u64 mkclean_lines;         /* lines examined by MKCLEAN */
	u64 mkclean_done;          /* lines MKCLEAN made writable and clean */
	u64 mkclean_shared;        /* uffd-wp lines refused: page not exclusive
				    * (shared with a fork child) or not anon */
	u64 zap_calls;             /* zap_page_range calls (one per run) */
	u64 tlb_flushes;           /* all-CPU TLB flushes issued */
	u64 errors;                /* ioctls that failed with an errno */
	u64 result_faults;         /* calls whose results could not be written
				    * after they took effect (EFAULT) */
};

DECLARE_PER_CPU(struct lego_pcache_stats, lego_pcache_stats);

#define lego_stat_add(field, n) this_cpu_add(lego_pcache_stats.field, (n))
#define lego_stat_inc(field) this_cpu_inc(lego_pcache_stats.field)

extern const struct attribute_group *lego_pcache_groups[];

#endif /* LEGO_PCACHE_INTERNAL_H */

// SPDX-License-Identifier: GPL-2.0
/*
 * lego_pcache: LEGO_PCACHE_IOC_EVICT, batched eviction that reports which
 * lines were dirty and cannot lose a store that races with it.
 *
 * The hazard: zap_page_range() frees an anonymous page whatever its D bit
 * says (only file pages get set_page_dirty). If we looked at D and then
 * zapped, a store landing between the two would be freed with the page and
 * never written back. Something must make "D is clear" stay true until the
 * zap, and zap_page_range takes the PTE lock itself, so we cannot simply hold
 * the PTE lock across both.
 *
 * The argument, in four steps, all under mmap_write_lock:
 *
 *  1. For each resident line, under its PTE lock, clear the writable bit
 *     (ptep_set_wrprotect: a locked bit operation, so it cannot lose an A/D
 *     bit the CPU sets concurrently).
 *  2. Flush the mm's TLB entries on every CPU (pte_x86.h: lego_flush_tlb_mm).
 *     Now no CPU holds a writable translation of
 *     any line of the batch, and the PTEs are read-only, so no store can
 *     reach these pages without a page fault. (x86 re-checks the PTE when it
 *     sets D through a cached clean translation, which would make this flush
 *     unnecessary; we pay one flush per batch rather than rely on it.)
 *  3. A page fault needs the mmap lock, which we hold for writing: every
 *     store to the batch now waits. So D, read under the PTE lock, is final:
 *     a line with D clear has not been stored to since D was last cleared,
 *     and nothing can store to it until we drop the lock. Likewise no
 *     userfaultfd ioctl (UFFDIO_COPY takes the mmap read lock) can map a new
 *     page into a line we found empty.
 *     - dirty lines (default): clear D (moving it to PG_dirty for reclaim
 *       when the page is in the swap cache, as AD does) and leave them mapped
 *       read-only. A page marked dirty by a writer that bypassed the PTE
 *       (get_user_pages) counts as dirty too, and its mark is cleared when
 *       the line is kept (pte_x86.h: lego_page_test_dirty). The caller writes them back
 *       and evicts them again; a store made in between faults once (after we
 *       drop the lock), and do_wp_page makes the PTE writable and dirty, so
 *       the next EVICT reports it dirty: the store is not lost, the caller
 *       just has one more write-back to do.
 *     - clean lines (and dirty ones with DISCARD_DIRTY): to be zapped.
 *  4. zap_page_range() each run of adjacent lines to zap. It does its own
 *     PTE clearing and TLB flush (bumping the mm's tlb_gen) before the pages
 *     are freed; the lines are read-only and clean and faults wait, so what
 *     it frees is exactly what we judged clean.
 *
 * What the mmap lock does not stop: reclaim and migration change PTEs under
 * the PTE lock alone (present -> swap or migration entry, and back for
 * migration). A line found holding a swap or migration entry is reported
 * dirty and kept: the D bit went to the swap copy and we cannot see it.
 * Swapping the region defeats dirty tracking; lego's region is not meant to
 * be swapped (the ExCache is its swap).
 *
 * Cost of the write lock: page faults of the whole process wait for one batch
 * (two PTE-lock passes, one broadcast flush, the zaps). The runtime's evictor
 * is the only caller and evicts in batches, so this is rare and bounded.
 */
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/slab.h>
#include <linux/uaccess.h>

#include "lego_pcache.h"
#include "pte_x86.h"

enum { EV_OUT_EVICTED, EV_OUT_DIRTY };

/* Per-line state between the passes. */
enum lego_ev_state {
	EV_ABSENT,  /* PTE none: nothing mapped */
	EV_PRESENT, /* present: write-protected in pass 1 */
	EV_KEEP,    /* keep mapped (dirty, or swap/migration entry) */
	EV_ZAP,     /* zap in pass 4 */
};

/* zap_page_range() each maximal run of adjacent lines marked EV_ZAP. */
static void lego_evict_zap_runs(struct mm_struct *mm, const u64 *lines,
				const u8 *state, u32 count)
{
	u32 i = 0, j;

	while (i < count) {
		struct vm_area_struct *vma;
		unsigned long start = lines[i];

		if (state[i] != EV_ZAP) {
			i++;
			continue;
		}
		/* lego_batch_check_vmas() found every line's VMA. */
		vma = find_vma(mm, start);
		for (j = i + 1; j < count && state[j] == EV_ZAP &&
		     lines[j] == lines[j - 1] + PAGE_SIZE &&
		     lines[j] < vma->vm_end; j++)
			;
		zap_page_range(vma, start, (j - i) * PAGE_SIZE);
		lego_stat_inc(zap_calls);
		i = j;
	}
}

long lego_ioctl_evict(struct lego_pcache_evict __user *uarg)
{
	struct mm_struct *mm = current->mm;
	struct lego_pcache_evict arg;
	struct lego_batch b;
	u32 i, nr_evicted = 0, nr_dirty = 0, nr_present = 0;
	u32 nr_zap = 0, nr_absent = 0, nr_kept = 0, nr_swapped = 0;
	u32 nr_page_dirty = 0;
	bool discard;
	u8 *state = NULL;
	u64 uout[2];
	long ret;

	memset(&b, 0, sizeof(b));

	ret = -EFAULT;
	if (copy_from_user(&arg, uarg, sizeof(arg)))
		goto out;
	ret = -EINVAL;
	if (arg.flags & ~LEGO_PCACHE_EVICT_FLAGS)
		goto out;
	if (arg.reserved0 || arg.reserved[0] || arg.reserved[1] ||
	    arg.reserved[2] || arg.reserved[3])
		goto out;
	ret = -ESRCH;
	if (!mm)
		goto out;
	discard = arg.flags & LEGO_PCACHE_EVICT_DISCARD_DIRTY;

	uout[EV_OUT_EVICTED] = arg.evicted;
	uout[EV_OUT_DIRTY] = arg.dirty;
	ret = lego_batch_get(&b, arg.lines, arg.count, uout, 2);
	if (ret)
		goto out;
	/*
	 * Strictly ascending: a line listed twice would be judged twice, and
	 * its second occurrence would find the D bit the first one cleared and
	 * zap a dirty line the first one promised to keep.
	 */
	ret = -EINVAL;
	for (i = 1; i < b.count; i++)
		if (b.lines[i] <= b.lines[i - 1])
			goto out;
	state = b.scratch;

	ret = -EINTR;
	if (mmap_write_lock_killable(mm))
		goto out;
	ret = lego_batch_check_vmas(mm, &b, LEGO_VMA_EVICT);
	if (ret)
		goto out_unlock;

	/*
	 * Pass 1: write-protect every resident line. Not with DISCARD_DIRTY:
	 * every resident line is zapped whatever its D bit says, and the zap
	 * clears the PTE and flushes before the page is freed, so there is no
	 * verdict to protect and no need for our own broadcast flush (the
	 * costly part: an IPI to the CPUs running the process). D is then reported as the zap
	 * found it.
	 */
	for (i = 0; i < b.count; i++) {
		unsigned long addr = b.lines[i];
		spinlock_t *ptl;
		pte_t *ptep;

		if (!follow_pte(mm, addr, &ptep, &ptl)) {
			if (!discard)
				ptep_set_wrprotect(mm, addr, ptep);
			pte_unmap_unlock(ptep, ptl);
			state[i] = EV_PRESENT;
			nr_present++;
		} else if (lego_pte_slot_used(mm, addr)) {
			/* Swap or migration entry: see the header comment. */
			state[i] = EV_KEEP;
			nr_swapped++;
		} else {
			state[i] = EV_ABSENT;
		}
	}

	/* Pass 2: no writable translation of the batch survives this. */
	if (nr_present && !discard) {
		lego_flush_tlb_mm(mm);
		lego_stat_inc(tlb_flushes);
	}

	/* Pass 3: D is final now; decide per line. */
	for (i = 0; i < b.count; i++) {
		unsigned long addr = b.lines[i];
		spinlock_t *ptl;
		pte_t *ptep;
		struct page *page;
		bool dirty;

		if (state[i] == EV_ABSENT) {
			nr_absent++;
			nr_evicted++;
			lego_bitmap_set(b.out[EV_OUT_EVICTED], i);
			continue;
		}
		if (state[i] == EV_KEEP) {
			nr_dirty++;
			lego_bitmap_set(b.out[EV_OUT_DIRTY], i);
			continue;
		}
		if (follow_pte(mm, addr, &ptep, &ptl)) {
			/* Reclaim or migration took it meanwhile: keep it. */
			state[i] = EV_KEEP;
			nr_swapped++;
			nr_dirty++;
			lego_bitmap_set(b.out[EV_OUT_DIRTY], i);
			continue;
		}
		dirty = lego_pte_test_and_clear_dirty(ptep);
		page = lego_pte_page(ptep_get(ptep));
		if (page) {
			if (dirty)
				lego_page_move_dirty(page);
			/*
			 * Written around the PTE (get_user_pages): dirty too.
			 * A kept line's mark is cleared (pte_x86.h).
			 */
			if (lego_page_test_dirty(page, !discard) && !dirty) {
				dirty = true;
				nr_page_dirty++;
			}
		}
		pte_unmap_unlock(ptep, ptl);

		if (dirty) {
			nr_dirty++;
			lego_bitmap_set(b.out[EV_OUT_DIRTY], i);
		}
		if (dirty && !discard) {
			state[i] = EV_KEEP;
			nr_kept++;
			continue;
		}
		state[i] = EV_ZAP;
		nr_zap++;
		nr_evicted++;
		lego_bitmap_set(b.out[EV_OUT_EVICTED], i);
	}

	/* Pass 4. */
	if (nr_zap)
		lego_evict_zap_runs(mm, b.lines, state, b.count);
	mmap_write_unlock(mm);

	lego_stat_inc(evict_calls);
	lego_stat_add(evict_lines, b.count);
	lego_stat_add(evict_zapped, nr_zap);
	lego_stat_add(evict_absent, nr_absent);
	lego_stat_add(evict_dirty_kept, nr_kept);
	lego_stat_add(evict_swapped_kept, nr_swapped);
	lego_stat_add(evict_page_dirty, nr_page_dirty);
	if (discard)
		lego_stat_add(evict_dirty_discarded, nr_dirty - nr_swapped);

	arg.nr_evicted = nr_evicted;
	arg.nr_dirty = nr_dirty;
	ret = 0;
	goto out;

out_unlock:
	mmap_write_unlock(mm);
out:
	return lego_batch_finish(&b, uarg, &arg, sizeof(arg), ret);
}

// SPDX-License-Identifier: GPL-2.0
/*
 * lego_pcache: LEGO_PCACHE_IOC_AD, batched test-and-clear of the accessed and
 * dirty bits of the caller's lines.
 *
 * Runs under mmap_read_lock: page faults of the process proceed concurrently,
 * which is safe because every PTE change here is a locked bit operation made
 * under the PTE lock (see pte_x86.h), the same discipline as the kernel's own
 * ptep_test_and_clear_young.
 *
 * Why D moves to PG_dirty for swap-cache pages when cleared: the kernel's
 * reclaim learns that an anonymous page in the swap cache must be written
 * again from the PTE's D bit or the page's PG_dirty. Clearing D without
 * moving it would let reclaim drop a page whose swap copy is stale.
 * (zap_pte_range and try_to_unmap move D to the page the same way.) For other
 * anonymous pages PG_dirty is left to writers that bypass the PTE, which
 * EVICT reports (pte_x86.h: lego_page_move_dirty). AD reports D only.
 *
 * Why the TLB flush: a CPU that cached this translation with D set writes
 * through it without setting D in the PTE again. Until every such entry is
 * gone a store may leave no trace, so the call flushes before returning; a
 * store made after the call returns sets D again. A alone would not need it
 * for correctness (x86 Linux skips that flush), but without it a line the CPU
 * keeps using would look unaccessed, defeating the point of asking.
 */
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/sched/mm.h>
#include <linux/uaccess.h>

#include "lego_pcache.h"
#include "pte_x86.h"

enum { AD_OUT_ACCESSED, AD_OUT_DIRTY, AD_OUT_PRESENT };

long lego_ioctl_ad(struct lego_pcache_ad __user *uarg)
{
	struct mm_struct *mm = current->mm;
	struct lego_pcache_ad arg;
	struct lego_batch b;
	u32 i, nr_accessed = 0, nr_dirty = 0, nr_present = 0;
	bool cleared = false;
	u64 uout[3];
	long ret;

	memset(&b, 0, sizeof(b));

	ret = -EFAULT;
	if (copy_from_user(&arg, uarg, sizeof(arg)))
		goto out;
	ret = -EINVAL;
	if (arg.flags & ~LEGO_PCACHE_AD_FLAGS)
		goto out;
	if (arg.reserved[0] || arg.reserved[1] || arg.reserved[2])
		goto out;
	/* An ioctl always comes from a task with an mm; be explicit anyway. */
	ret = -ESRCH;
	if (!mm)
		goto out;

	uout[AD_OUT_ACCESSED] = arg.accessed;
	uout[AD_OUT_DIRTY] = arg.dirty;
	uout[AD_OUT_PRESENT] = arg.present;
	ret = lego_batch_get(&b, arg.lines, arg.count, uout, 3);
	if (ret)
		goto out;

	ret = -EINTR;
	if (mmap_read_lock_killable(mm))
		goto out;
	ret = lego_batch_check_vmas(mm, &b, LEGO_VMA_AD);
	if (ret)
		goto out_unlock;

	for (i = 0; i < b.count; i++) {
		unsigned long addr = b.lines[i];
		spinlock_t *ptl;
		pte_t *ptep;
		bool young, dirty;

		/* Not present (none, swap, migration): nothing to report. */
		if (follow_pte(mm, addr, &ptep, &ptl))
			continue;
		if (arg.flags & LEGO_PCACHE_AD_CLEAR_ACCESSED)
			young = lego_pte_test_and_clear_young(ptep);
		else
			young = pte_young(ptep_get(ptep));
		if (arg.flags & LEGO_PCACHE_AD_CLEAR_DIRTY) {
			dirty = lego_pte_test_and_clear_dirty(ptep);
			if (dirty) {
				struct page *page = lego_pte_page(ptep_get(ptep));

				if (page)
					lego_page_move_dirty(page);
			}
		} else {
			dirty = pte_dirty(ptep_get(ptep));
		}
		pte_unmap_unlock(ptep, ptl);

		nr_present++;
		lego_bitmap_set(b.out[AD_OUT_PRESENT], i);
		if (young) {
			nr_accessed++;
			lego_bitmap_set(b.out[AD_OUT_ACCESSED], i);
		}
		if (dirty) {
			nr_dirty++;
			lego_bitmap_set(b.out[AD_OUT_DIRTY], i);
		}
		if ((young && (arg.flags & LEGO_PCACHE_AD_CLEAR_ACCESSED)) ||
		    (dirty && (arg.flags & LEGO_PCACHE_AD_CLEAR_DIRTY)))
			cleared = true;
	}

	/*
	 * Flush before returning (and before dropping the mmap lock, which
	 * costs nothing extra): the caller may copy the lines it was told are
	 * dirty as soon as we return.
	 */
	if (cleared) {
		lego_flush_tlb_mm(mm);
		lego_stat_inc(tlb_flushes);
	}
	mmap_read_unlock(mm);

	lego_stat_inc(ad_calls);
	lego_stat_add(ad_lines, b.count);
	lego_stat_add(ad_accessed, nr_accessed);
	lego_stat_add(ad_dirty, nr_dirty);

	arg.nr_accessed = nr_accessed;
	arg.nr_dirty = nr_dirty;
	arg.nr_present = nr_present;
	ret = 0;
	goto out;

out_unlock:
	mmap_read_unlock(mm);
out:
	return lego_batch_finish(&b, uarg, &arg, sizeof(arg), ret);
}

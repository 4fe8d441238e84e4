// SPDX-License-Identifier: GPL-2.0
/*
 * lego_pcache: LEGO_PCACHE_IOC_MKCLEAN, which turns freshly filled
 * userfaultfd-write-protected lines into writable, clean lines, so that the
 * PTE's dirty bit, not a write-protect fault, tells the caller which lines
 * were stored to.
 *
 * Why: the runtime maps a load miss with UFFDIO_COPY_MODE_WP and learns of
 * its first store from the write-protect fault; a fault and an ioctl per
 * first store, and on Linux 6.1 UFFDIO_COPY sets D on every fill, so D alone
 * cannot tell. After MKCLEAN a store costs nothing and sets D, and EVICT
 * (evict.c) reports it.
 *
 * What is changed, for a PTE that is present, uffd-wp and read-only: the
 * uffd-wp bit and D are cleared and RW is set, in one locked
 * compare-and-exchange under the PTE lock (pte_x86.h), with the caller's
 * mmap lock held for reading. That is the kernel's own un-protect
 * (UFFDIO_WRITEPROTECT, mode 0, on an exclusive anonymous page: change_pte_range
 * clears uffd-wp and, via can_change_pte_writable, sets RW) plus clearing D,
 * and it holds the same locks as that path and as the write-fault path
 * (do_wp_page), so every software writer of the PTE is excluded.
 *
 * Why it is sound:
 *  - No TLB flush. Every TLB entry cached for the old PTE is read-only. A
 *    store through one faults; the fault handler finds the PTE writable and
 *    sets D (handle_pte_fault's "spurious" path, which x86 does not flush
 *    either); a store that walks the new PTE sets D atomically. So no store
 *    after this call can leave D clear, and a read-only to writable upgrade
 *    without a flush is what the kernel itself does (wp_page_reuse,
 *    ptep_set_access_flags on x86).
 *  - Nothing is lost by clearing D: the PTE was read-only since the fill, so
 *    D was set by UFFDIO_COPY itself (mfill_atomic_install_pte's
 *    pte_mkdirty), not by a store. The line's data came from the memory node
 *    (or is zeros the node can reproduce): it is clean with respect to the
 *    caller's backing store.
 *  - Reclaim: for an anonymous page not in the swap cache PG_dirty carries no
 *    information for the kernel (add_to_swap dirties the folio before the
 *    first swap-out). For one in the swap cache, D would tell reclaim the
 *    swap copy is stale, so D moves to PG_dirty as AD and EVICT do
 *    (pte_x86.h: lego_page_move_dirty); lego's region is not meant to be
 *    swapped anyway.
 *  - Writes that bypass the PTE (get_user_pages with FOLL_WRITE:
 *    process_vm_writev, ptrace, O_DIRECT reads) used to fault on the uffd-wp
 *    PTE and so reach the runtime; after MKCLEAN they do not, and set no D.
 *    They mark the page dirty instead (at pin and at unpin), and EVICT
 *    reports a line whose page is dirty (pte_x86.h: lego_page_test_dirty).
 *    Pages pinned for DMA across an eviction stay unsupported, as before.
 *  - fork(): only a page this process maps exclusively (PageAnonExclusive)
 *    may become writable; a page shared with a child after fork() must stay
 *    read-only so that the next store copies it (COW). A shared page is left
 *    uffd-wp and counted in mkclean_shared. fork() takes the mmap lock for
 *    writing, so the check stays true until we drop ours.
 *  - Soft-dirty: when the VMA's soft-dirty tracking waits for a write fault
 *    (VM_SOFTDIRTY clear and the PTE not soft-dirty), the line is left alone
 *    as can_change_pte_writable would.
 *  - A write-protect fault that raced (a store made before this call) is
 *    still pending with userfaultfd; its handler's un-protect is harmless on
 *    a writable PTE, and the faulting thread retries its store, which sets D.
 *  - NUMA-hinting (PROT_NONE) PTEs, the zero page and non-anonymous pages are
 *    left alone.
 */
#include <linux/mm.h>
#include <linux/mmap_lock.h>
#include <linux/page-flags.h>
#include <linux/sched/mm.h>
#include <linux/uaccess.h>
#include <linux/userfaultfd_k.h>

#include "lego_pcache.h"
#include "pte_x86.h"

enum { MK_OUT_DONE };

enum lego_mk_result {
	MK_DONE,   /* made writable and clean */
	MK_SKIP,   /* not a present, uffd-wp, read-only PTE: left alone */
	MK_SHARED, /* uffd-wp, but its page is not ours alone: left alone */
};

/*
 * One line, under the PTE lock (follow_pte). Caller holds the mmap lock for
 * reading and has checked @vma with lego_batch_check_vmas(LEGO_VMA_MKCLEAN).
 */
static enum lego_mk_result lego_mkclean_line(struct vm_area_struct *vma,
					     unsigned long addr)
{
	enum lego_mk_result res = MK_SKIP;
	struct page *page;
	spinlock_t *ptl;
	pte_t *ptep, pte;

	if (follow_pte(vma->vm_mm, addr, &ptep, &ptl))
		return MK_SKIP; /* none, swap or migration entry */
	pte = ptep_get(ptep);
	if (!pte_uffd_wp(pte) || pte_write(pte) || pte_protnone(pte))
		goto out;
	if (IS_ENABLED(CONFIG_MEM_SOFT_DIRTY) &&
	    !(vma->vm_flags & VM_SOFTDIRTY) && !pte_soft_dirty(pte))
		goto out;
	page = lego_pte_page(pte);
	if (!page)
		goto out;
	res = MK_SHARED;
	if (!PageAnon(page) || !PageAnonExclusive(page))
		goto out;
	res = MK_SKIP;
	if (!lego_pte_mkclean_writable(ptep, pte))
		goto out;
	if (pte_dirty(pte))
		lego_page_move_dirty(page);
	res = MK_DONE;
out:
	pte_unmap_unlock(ptep, ptl);
	return res;
}

long lego_ioctl_mkclean(struct lego_pcache_mkclean __user *uarg)
{
	struct mm_struct *mm = current->mm;
	struct vm_area_struct *vma = NULL;
	struct lego_pcache_mkclean arg;
	struct lego_batch b;
	u32 i, nr_done = 0, nr_shared = 0;
	u64 uout[1];
	long ret;

	memset(&b, 0, sizeof(b));

	ret = -EFAULT;
	if (copy_from_user(&arg, uarg, sizeof(arg)))
		goto out;
	ret = -EINVAL;
	if (arg.flags || arg.reserved0 || arg.reserved[0] || arg.reserved[1] ||
	    arg.reserved[2])
		goto out;
	ret = -ESRCH;
	if (!mm)
		goto out;

	uout[MK_OUT_DONE] = arg.done;
	ret = lego_batch_get(&b, arg.lines, arg.count, uout, 1);
	if (ret)
		goto out;

	ret = -EINTR;
	if (mmap_read_lock_killable(mm))
		goto out;
	ret = lego_batch_check_vmas(mm, &b, LEGO_VMA_MKCLEAN);
	if (ret)
		goto out_unlock;

	for (i = 0; i < b.count; i++) {
		unsigned long addr = b.lines[i];

		/* lego_batch_check_vmas() found every line's VMA. */
		if (!vma || addr < vma->vm_start || addr >= vma->vm_end)
			vma = find_vma(mm, addr);
		switch (lego_mkclean_line(vma, addr)) {
		case MK_DONE:
			nr_done++;
			lego_bitmap_set(b.out[MK_OUT_DONE], i);
			break;
		case MK_SHARED:
			nr_shared++;
			break;
		case MK_SKIP:
			break;
		}
	}
	/* No TLB flush: see the header comment. */
	mmap_read_unlock(mm);

	lego_stat_inc(mkclean_calls);
	lego_stat_add(mkclean_lines, b.count);
	lego_stat_add(mkclean_done, nr_done);
	lego_stat_add(mkclean_shared, nr_shared);

	arg.nr_done = nr_done;
	ret = 0;
	goto out;

out_unlock:
	mmap_read_unlock(mm);
out:
	return lego_batch_finish(&b, uarg, &arg, sizeof(arg), ret);
}

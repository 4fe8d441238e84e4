/* SPDX-License-Identifier: GPL-2.0 */
/*
 * lego_pcache: the architecture and kernel-version seam. Everything that
 * touches PTE bits or flushes TLBs directly is here, so that a port (another
 * architecture, a kernel where follow_pte or zap_page_range changed) edits
 * this file and the two call sites of follow_pte/zap_page_range only.
 *
 * Written against Debian 12's 6.1 kernel. What it may call is bounded by what
 * 6.1 exports to modules: ptep_test_and_clear_young, flush_tlb_mm_range and
 * vm_normal_page are NOT exported, so their few lines are redone here
 * (and flush_tlb_mm_range's protocol in lego_flush_tlb_mm).
 */
#ifndef LEGO_PCACHE_PTE_X86_H
#define LEGO_PCACHE_PTE_X86_H

#include <linux/mm.h>
#include <linux/pagemap.h>
#include <linux/pgtable.h>
#include <linux/smp.h>
#include <linux/version.h>
#include <asm/tlbflush.h>

#if !defined(CONFIG_X86_64)
#error "lego_pcache: only x86_64 PTEs are supported (see pte_x86.h)"
#endif

#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 1, 0) || \
	LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
/*
 * 6.3 replaced zap_page_range with zap_page_range_single/zap_vma_pages and
 * later kernels change follow_pte's signature: review this file before
 * widening the range.
 */
#error "lego_pcache: written for Linux 6.1/6.2 (see pte_x86.h)"
#endif

/*
 * Atomically test and clear one PTE bit. The CPU sets A and D with locked
 * read-modify-writes, so a locked bit operation cannot lose a bit the
 * hardware sets concurrently; this is what x86's own (unexported)
 * ptep_test_and_clear_young does. Caller holds the PTE lock, which excludes
 * every software writer of the PTE.
 */
static inline bool lego_pte_test_and_clear(pte_t *ptep, int bit)
{
	return test_and_clear_bit(bit, (unsigned long *)&ptep->pte);
}

static inline bool lego_pte_test_and_clear_young(pte_t *ptep)
{
	return lego_pte_test_and_clear(ptep, _PAGE_BIT_ACCESSED);
}

static inline bool lego_pte_test_and_clear_dirty(pte_t *ptep)
{
	return lego_pte_test_and_clear(ptep, _PAGE_BIT_DIRTY);
}

/*
 * MKCLEAN's PTE update: clear uffd-wp and D and set RW, as one locked
 * compare-and-exchange, from @expect (the value the caller checked under the
 * PTE lock). The lock excludes every software writer; the CPU may still set A
 * concurrently (and nothing else: the PTE is read-only, so no store can set
 * D), so a failed exchange is retried as long as only A/D differ. Returns
 * false, changing nothing, if anything else changed (it cannot, under the
 * lock; checked anyway). x86 page tables are written directly here, as the
 * kernel's own ptep_set_wrprotect and ptep_test_and_clear_young do (no
 * paravirt hook: Xen PV guests are out of scope, see pcache_abi.h).
 */
static inline bool lego_pte_mkclean_writable(pte_t *ptep, pte_t expect)
{
	const pteval_t ad = _PAGE_ACCESSED | _PAGE_DIRTY;
	pteval_t old = pte_val(expect), new, cur;

	for (;;) {
		new = (old & ~(_PAGE_UFFD_WP | _PAGE_DIRTY)) | _PAGE_RW;
		cur = cmpxchg(&ptep->pte, old, new);
		if (cur == old)
			return true;
		if ((cur ^ old) & ~ad)
			return false;
		old = cur;
	}
}

/*
 * The page behind a present PTE of a private anonymous VMA, or NULL for the
 * shared zero page (mapped read-only by read faults; never dirty, never to be
 * marked dirty). Such a VMA has no VM_PFNMAP/VM_MIXEDMAP (checked by
 * lego_batch_check_vmas), so every other present PTE maps a normal page:
 * this is vm_normal_page() reduced to the cases that can occur here.
 */
static inline struct page *lego_pte_page(pte_t pte)
{
	unsigned long pfn = pte_pfn(pte);

	if (is_zero_pfn(pfn) || !pfn_valid(pfn))
		return NULL;
	return pfn_to_page(pfn);
}

/*
 * The page's dirty flag (PG_dirty), next to the PTE's D bit.
 *
 * Writers that bypass the page tables leave D clear: get_user_pages with
 * FOLL_WRITE (process_vm_writev, ptrace, O_DIRECT reads, io_uring fixed
 * buffers) marks the page dirty instead, at pin and again at unpin. EVICT
 * must count that as dirty, or it would drop such a write.
 *
 * For an anonymous page outside the swap cache the kernel never reads
 * PG_dirty (add_to_swap dirties the folio before its first swap-out), so we
 * keep it meaning "written around the PTE since EVICT last kept the line":
 * clearing D does not move it there, and EVICT clears it when it keeps the
 * line (under the page lock, which add_to_swap holds, so that a page going
 * into the swap cache meanwhile keeps its flag). For a swap-cache page D is
 * moved to PG_dirty as zap_pte_range does (reclaim must write it again), and
 * never cleared by us: such a line is simply always reported dirty.
 */
static inline bool lego_page_flag_is_ours(struct page *page)
{
	return PageAnon(page) && !PageSwapCache(page);
}

/* D was just cleared under the PTE lock: tell reclaim if it needs to know. */
static inline void lego_page_move_dirty(struct page *page)
{
	if (!lego_page_flag_is_ours(page))
		set_page_dirty(page);
}

/*
 * Whether a writer marked @page dirty; with @clear, clear the flag when it is
 * ours and the page lock is free (otherwise it stays set: the line is
 * reported dirty once more, never lost). Caller holds the PTE lock.
 */
static inline bool lego_page_test_dirty(struct page *page, bool clear)
{
	if (!PageDirty(page))
		return false;
	if (clear && trylock_page(page)) {
		if (lego_page_flag_is_ours(page))
			ClearPageDirty(page);
		unlock_page(page);
	}
	return true;
}

static inline void lego_flush_tlb_local(void *unused)
{
	__flush_tlb_all();
}

/*
 * Flush every TLB entry of @mm, wherever it may be cached, including
 * translations kept under PCIDs that are not loaded right now.
 *
 * flush_tlb_mm_range does this but is not exported, so we follow the protocol
 * it and the kernel's deferred reclaim flush (arch_tlbbatch_add_mm +
 * arch_tlbbatch_flush) use, with exported and inline pieces only:
 *  1. bump mm->context.tlb_gen (inc_mm_tlb_gen): a CPU that switches to @mm from now on (or returns to
 *     it from lazy TLB mode) finds its copy of the generation stale and
 *     flushes the mm's PCID in switch_mm_irqs_off. It is a full barrier, so
 *     our PTE changes are visible before we read mm_cpumask.
 *  2. CPUs in mm_cpumask(@mm) (running it, or holding it lazily) flush now;
 *     __flush_tlb_all() drops every PCID of the CPU, more than needed but
 *     exported. switch_mm sets a CPU's bit before it loads the mm, so a CPU
 *     not in the mask has not loaded it since step 1.
 * Cost: an IPI only to CPUs that run @mm, as flush_tlb_mm_range. (An earlier
 * version IPIed every online CPU: under qemu TCG, and on idle real CPUs, the
 * wake-up of a CPU that never ran the process dominated eviction.)
 */
static inline void lego_flush_tlb_mm(struct mm_struct *mm)
{
	/* inc_mm_tlb_gen(), which asm/tlbflush.h hides from modules. */
	atomic64_inc_return(&mm->context.tlb_gen);
	on_each_cpu_mask(mm_cpumask(mm), lego_flush_tlb_local, NULL, 1);
}

/*
 * Whether the PTE slot of @addr holds anything (present page, swap or
 * migration entry). follow_pte() answers only for present PTEs; eviction
 * must tell "nothing mapped" from "mapped but not present" (see evict.c).
 * Caller holds the mmap lock for writing, which keeps page tables from being
 * freed and none entries from being filled (both need the mmap lock).
 */
static inline bool lego_pte_slot_used(struct mm_struct *mm, unsigned long addr)
{
	pgd_t *pgd;
	p4d_t *p4d;
	pud_t *pud;
	pmd_t *pmd, pmdval;
	pte_t *ptep;
	spinlock_t *ptl;
	bool used;

	pgd = pgd_offset(mm, addr);
	if (pgd_none(*pgd) || unlikely(pgd_bad(*pgd)))
		return false;
	p4d = p4d_offset(pgd, addr);
	if (p4d_none(*p4d) || unlikely(p4d_bad(*p4d)))
		return false;
	pud = pud_offset(p4d, addr);
	if (pud_none(*pud) || unlikely(pud_bad(*pud)))
		return false;
	pmd = pmd_offset(pud, addr);
	pmdval = READ_ONCE(*pmd);
	if (pmd_none(pmdval))
		return false;
	/* A huge or migrating-huge PMD: something is there, not ours to parse. */
	if (unlikely(pmd_bad(pmdval)) || !pmd_present(pmdval))
		return true;
	ptep = pte_offset_map_lock(mm, pmd, addr, &ptl);
	used = !pte_none(ptep_get(ptep));
	pte_unmap_unlock(ptep, ptl);
	return used;
}

/*
 * Whether @addr is mapped by a huge PMD or PUD, which follow_pte() refuses
 * (and which our 4 KiB lines cannot describe). Caller holds the mmap lock.
 */
static inline bool lego_line_is_huge(struct mm_struct *mm, unsigned long addr)
{
	pgd_t *pgd;
	p4d_t *p4d;
	pud_t *pud;
	pmd_t pmdval;

	pgd = pgd_offset(mm, addr);
	if (pgd_none(*pgd) || unlikely(pgd_bad(*pgd)))
		return false;
	p4d = p4d_offset(pgd, addr);
	if (p4d_none(*p4d) || unlikely(p4d_bad(*p4d)))
		return false;
	pud = pud_offset(p4d, addr);
	if (pud_none(*pud))
		return false;
	if (pud_trans_huge(*pud) || pud_devmap(*pud))
		return true;
	if (unlikely(pud_bad(*pud)))
		return false;
	pmdval = READ_ONCE(*pmd_offset(pud, addr));
	return pmd_trans_huge(pmdval) || pmd_devmap(pmdval) ||
	       (!pmd_none(pmdval) && !pmd_present(pmdval));
}

#endif /* LEGO_PCACHE_PTE_X86_H */

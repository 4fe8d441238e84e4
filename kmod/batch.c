// SPDX-License-Identifier: GPL-2.0
/*
 * lego_pcache: a batch of lines from the caller. Copy-in and all argument
 * checks happen before any PTE is touched, so a call that fails with an
 * argument error has changed nothing.
 */
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/userfaultfd_k.h>

#include "lego_pcache.h"
#include "pte_x86.h"

static bool lego_uptr_ok(u64 uptr)
{
	/* Arrays of __u64: require natural alignment (0 is checked by callers). */
	return IS_ALIGNED(uptr, sizeof(u64));
}

/*
 * lego_batch_get - copy the caller's line array and prepare result bitmaps.
 * @b:     batch to fill; lego_batch_finish() frees it whatever this returns.
 * @ulines: user pointer to __u64[count].
 * @uout:  @nout user pointers to result bitmaps (0 = not wanted).
 *
 * The result bitmaps are zeroed in user memory here, before any lock is
 * taken: that faults them in and proves them writable, so that results of a
 * call that took effect are not lost to an EFAULT found afterwards (only a
 * thread that unmaps them concurrently can still cause that).
 */
int lego_batch_get(struct lego_batch *b, u64 ulines, u32 count,
		   const u64 *uout, int nout)
{
	size_t bytes, off;
	int ret, i;

	b->lines = NULL;
	b->count = 0;
	b->block = NULL;
	b->scratch = NULL;
	for (i = 0; i < LEGO_BATCH_MAX_OUT; i++) {
		b->out[i] = NULL;
		b->uout[i] = NULL;
	}

	ret = -EINVAL;
	if (!count)
		goto out;
	ret = -E2BIG;
	if (count > READ_ONCE(lego_max_lines))
		goto out;
	ret = -EFAULT;
	if (!ulines)
		goto out;
	ret = -EINVAL;
	if (!lego_uptr_ok(ulines))
		goto out;
	for (i = 0; i < nout; i++)
		if (!lego_uptr_ok(uout[i]))
			goto out;

	b->count = count;
	b->words = DIV_ROUND_UP(count, 64);
	bytes = b->words * sizeof(u64);
	if (count <= LEGO_BATCH_INLINE) {
		b->lines = b->inline_lines;
		b->scratch = b->inline_scratch;
		memset(b->inline_scratch, 0, sizeof(b->inline_scratch));
		for (i = 0; i < nout; i++)
			if (uout[i])
				b->out[i] = &b->inline_out[i];
	} else {
		/*
		 * One block: lines, then the wanted bitmaps, then the scratch
		 * bytes. count <= LEGO_PCACHE_MAX_LINES_LIMIT: under 64 KiB.
		 */
		ret = -ENOMEM;
		b->block = kmalloc(count * sizeof(u64) + nout * bytes + count,
				   GFP_KERNEL);
		if (!b->block)
			goto out;
		b->lines = b->block;
		off = count * sizeof(u64);
		for (i = 0; i < nout; i++) {
			if (!uout[i])
				continue;
			b->out[i] = (u64 *)((char *)b->block + off);
			off += bytes;
		}
		b->scratch = (u8 *)b->block + off;
		memset((char *)b->block + count * sizeof(u64), 0,
		       off - count * sizeof(u64) + count);
	}
	ret = -EFAULT;
	if (copy_from_user(b->lines, u64_to_user_ptr(ulines),
			   count * sizeof(u64)))
		goto out;

	for (i = 0; i < nout; i++) {
		if (!uout[i])
			continue;
		b->uout[i] = u64_to_user_ptr(uout[i]);
		if (b->out[i] == &b->inline_out[i])
			b->inline_out[i] = 0;
		ret = -EFAULT;
		if (clear_user(b->uout[i], bytes))
			goto out;
	}
	ret = 0;
out:
	return ret;
}

/*
 * Which VMAs a line may live in: private anonymous memory (no vm_ops, not
 * shared), with 4 KiB PTEs guaranteed by MADV_NOHUGEPAGE: with VM_NOHUGEPAGE
 * no fault installs a huge PMD, and khugepaged/MADV_COLLAPSE need the mmap
 * lock for writing, so a line checked here under the mmap lock stays mapped
 * by a PTE table until the lock is dropped. Eviction also refuses mlocked
 * VMAs, as madvise(MADV_DONTNEED) does: locked memory must not vanish.
 * MKCLEAN makes PTEs writable, so it wants VMAs the process may write
 * (VM_WRITE: never more than mprotect allows) that userfaultfd
 * write-protects (VM_UFFD_WP: where the uffd-wp bit it clears means
 * something).
 */
static int lego_vma_ok(struct vm_area_struct *vma, enum lego_vma_use use)
{
	const unsigned long refused = VM_SHARED | VM_MAYSHARE | VM_PFNMAP |
				      VM_IO | VM_MIXEDMAP | VM_HUGETLB;

	if (!vma_is_anonymous(vma) || (vma->vm_flags & refused))
		return -EINVAL;
	if (!(vma->vm_flags & VM_NOHUGEPAGE))
		return -EINVAL;
	if (use == LEGO_VMA_EVICT && (vma->vm_flags & VM_LOCKED))
		return -EINVAL;
	if (use == LEGO_VMA_MKCLEAN &&
	    (!(vma->vm_flags & VM_WRITE) || !userfaultfd_wp(vma)))
		return -EINVAL;
	return 0;
}

/*
 * lego_batch_check_vmas - check every line against the caller's VMAs.
 * Caller holds @mm's mmap lock (read or write) and keeps holding it while it
 * acts on the batch, so the answer stays true.
 */
int lego_batch_check_vmas(struct mm_struct *mm, const struct lego_batch *b,
			  enum lego_vma_use use)
{
	struct vm_area_struct *vma = NULL;
	u32 i;
	int ret;

	for (i = 0; i < b->count; i++) {
		unsigned long addr = b->lines[i];

		ret = -EINVAL;
		if (!PAGE_ALIGNED(addr))
			goto out;
		/* Kernel and non-canonical addresses are in no VMA of ours. */
		ret = -ENOMEM;
		if (addr >= TASK_SIZE)
			goto out;
		/* Batches are mostly sorted: reuse the last VMA when it fits. */
		if (!vma || addr < vma->vm_start || addr >= vma->vm_end) {
			vma = find_vma(mm, addr);
			if (!vma || addr < vma->vm_start)
				goto out;
			ret = lego_vma_ok(vma, use);
			if (ret)
				goto out;
		}
		ret = -EINVAL;
		if (lego_line_is_huge(mm, addr))
			goto out;
	}
	ret = 0;
out:
	return ret;
}

/* lego_batch_put - copy result bitmaps to the caller. No lock may be held. */
static int lego_batch_put(const struct lego_batch *b)
{
	size_t bytes = b->words * sizeof(u64);
	int i;

	for (i = 0; i < LEGO_BATCH_MAX_OUT; i++) {
		if (b->out[i] && copy_to_user(b->uout[i], b->out[i], bytes)) {
			lego_stat_inc(result_faults);
			return -EFAULT;
		}
	}
	return 0;
}

/*
 * lego_batch_finish - the end of every batch ioctl, whether it failed or took
 * effect: copy the results back, free the batch, count a failure.
 * @b:    the batch (lego_batch_get()), freed here whatever @ret is.
 * @uarg: the caller's argument struct; @arg, @size: the kernel copy to write
 *        back over it, its nr_* results filled in.
 * @ret:  0 if the call took effect, or the -errno it failed with (then
 *        nothing is copied back).
 * No lock may be held. Returns the ioctl's result: @ret, or -EFAULT when a
 * call that took effect could not write its results (counted as
 * result_faults: lego_batch_get() zeroed the bitmaps to make that rare).
 */
long lego_batch_finish(struct lego_batch *b, void __user *uarg,
		       const void *arg, size_t size, long ret)
{
	if (ret)
		goto out;
	ret = lego_batch_put(b);
	if (ret)
		goto out;
	ret = -EFAULT;
	if (copy_to_user(uarg, arg, size)) {
		lego_stat_inc(result_faults);
		goto out;
	}
	ret = 0;
out:
	kfree(b->block);
	b->block = NULL;
	b->lines = NULL;
	if (ret)
		lego_stat_inc(errors);
	return ret;
}

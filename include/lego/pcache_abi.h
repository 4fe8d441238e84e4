/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR MIT */
/*
 * lego_pcache: the ioctl ABI between lego's processor-node runtime and the
 * lego_pcache.ko kernel module (kmod/), shared verbatim by both sides.
 *
 * Purpose: the runtime keeps a process's anonymous memory in a userfaultfd
 * region ("ExCache", include/lego/excache.h). Stock Linux gives user space no
 * way to read or clear the hardware accessed/dirty bits of its own PTEs, nor
 * to evict a line and learn atomically whether it was written. The module adds
 * exactly that, for batches of 4 KiB lines of the CALLING process:
 *
 *   LEGO_PCACHE_IOC_INFO   ABI version, limits and feature bits.
 *   LEGO_PCACHE_IOC_AD     test (and optionally clear) the accessed and dirty
 *                          bits of up to max_lines lines; one TLB flush per call.
 *   LEGO_PCACHE_IOC_EVICT  evict up to max_lines lines; dirty lines are reported
 *                          and, unless LEGO_PCACHE_EVICT_DISCARD_DIRTY, kept
 *                          (cleaned and write-protected) so that the caller can
 *                          write them back and evict them again. A store that
 *                          races with the eviction is never lost: see the
 *                          argument at the top of kmod/evict.c.
 *   LEGO_PCACHE_IOC_MKCLEAN (minor 1) turn up to max_lines freshly filled
 *                          lines from "userfaultfd-write-protected" into
 *                          "writable and clean": dirty tracking moves from
 *                          write-protect faults to the PTE's dirty bit, which
 *                          EVICT reports. See kmod/mkclean.c.
 *
 * Device: /dev/lego_pcache (a misc device, mode set by the module parameter
 * dev_mode, default 0600). Counters: /sys/class/misc/lego_pcache/stats/.
 *
 * Versioning (rules both sides keep, so that old and new peers either work
 * together or refuse clearly):
 *   - Every struct has a fixed size and layout (fixed-width fields, natural
 *     alignment, no implicit padding; checked by static_assert below). The size
 *     is part of the ioctl number, so a changed struct is a new ioctl number and
 *     an old module answers it with ENOTTY.
 *   - reserved fields must be zero and unknown flag bits must be zero, or the
 *     module fails the call with EINVAL: a later version may give them meaning.
 *   - abi_version's major half (bits 31..16) changes only on an incompatible
 *     change; the runtime must refuse a module whose major differs. The minor
 *     half grows with additions announced by a feature bit.
 *   - Byte order is the host's (this ABI never leaves the machine: the module
 *     and runtime run on one x86_64 host, which is little-endian).
 *
 * Errors: every ioctl returns 0 or fails with errno (the module returns
 * -errno). Common to all:
 *   EFAULT   the argument struct or the lines array cannot be read, or a result
 *            cannot be written (see "results" below).
 *   ENOTTY   unknown ioctl (also: a struct size this module does not know).
 *   EINVAL   unknown flags, non-zero reserved field, count == 0, a user pointer
 *            not 8-byte aligned, a line address not 4 KiB aligned, EVICT lines
 *            not strictly ascending, a line mapped by a huge page, or a line in
 *            a VMA that is not private anonymous memory with MADV_NOHUGEPAGE
 *            (file-backed, shared, hugetlb, PFN/IO mappings; for EVICT also
 *            mlocked VMAs, as madvise(MADV_DONTNEED) refuses them).
 *   E2BIG    count > max_lines (LEGO_PCACHE_IOC_INFO reports max_lines).
 *   ENOMEM   a line address is not in any VMA of the caller (this includes
 *            kernel addresses), as mincore(2) and madvise(2) report it.
 *   EINTR    a fatal signal arrived while waiting for the caller's mmap lock.
 * Argument errors are found before anything is changed: a failed call changed
 * no PTE. The exception is EFAULT while writing results after the work was
 * done (another thread unmapped the result buffers meanwhile): the module
 * faults the result buffers in before it starts, so only a caller racing with
 * itself sees this; the call took effect and the counters say so.
 *
 * Results: bitmaps are arrays of __u64 words, ceil(count / 64) of them; bit
 * (i % 64) of word (i / 64) describes lines[i]. A result pointer of 0 means
 * "not wanted". AD accepts lines in any order, duplicates included (a second
 * occurrence sees the state the first left); EVICT requires them strictly
 * ascending (EINVAL otherwise), which also lets it zap adjacent lines in one
 * call.
 *
 * Thread-safety: calls may be made concurrently from any thread of the process
 * on one fd; each call is atomic with respect to page faults of the lines it
 * names (AD holds the caller's mmap lock for reading, EVICT for writing).
 *
 * Limitations (stated once, here): x86_64 only; 4 KiB PTEs only (huge pages are
 * refused, hence MADV_NOHUGEPAGE); secondary MMUs (KVM, IOMMU SVA) are not
 * notified, so lines must not be mapped into a guest or a device; a page
 * pinned for DMA across an eviction may be written after EVICT looked at it,
 * which no ioctl can see (writes that finish before, and unpin, are seen:
 * see "Dirty" below).
 *
 * This header compiles as kernel C, user-space C (C11) and C++. The runtime's
 * client is runtime/excache/pcache_dev.h.
 */
#ifndef LEGO_PCACHE_ABI_H
#define LEGO_PCACHE_ABI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#ifdef __KERNEL__
#include <linux/build_bug.h>
#define LEGO_PCACHE_STATIC_ASSERT(expr) static_assert(expr, #expr)
#elif defined(__cplusplus)
#define LEGO_PCACHE_STATIC_ASSERT(expr) static_assert(expr, #expr)
#else
#define LEGO_PCACHE_STATIC_ASSERT(expr) _Static_assert(expr, #expr)
#endif

#define LEGO_PCACHE_DEVICE "/dev/lego_pcache"

/* Major 1, minor 1 (1: LEGO_PCACHE_IOC_MKCLEAN). */
#define LEGO_PCACHE_ABI_MAJOR 1
#define LEGO_PCACHE_ABI_MINOR 1
#define LEGO_PCACHE_ABI_VERSION ((LEGO_PCACHE_ABI_MAJOR << 16) | LEGO_PCACHE_ABI_MINOR)

/* The only line size: one base page. */
#define LEGO_PCACHE_LINE_SIZE 4096u
/* The largest max_lines a module may report (its parameter is clamped to it). */
#define LEGO_PCACHE_MAX_LINES_LIMIT 4096u

/* Feature bits reported by LEGO_PCACHE_IOC_INFO. */
#define LEGO_PCACHE_FEAT_AD (1ull << 0)          /* LEGO_PCACHE_IOC_AD */
#define LEGO_PCACHE_FEAT_EVICT (1ull << 1)       /* LEGO_PCACHE_IOC_EVICT */
#define LEGO_PCACHE_FEAT_SYSFS_STATS (1ull << 2) /* counters in sysfs */
#define LEGO_PCACHE_FEAT_MKCLEAN (1ull << 3)     /* LEGO_PCACHE_IOC_MKCLEAN (minor >= 1) */

struct lego_pcache_info {
  __u32 abi_version; /* out: LEGO_PCACHE_ABI_VERSION of the module */
  __u32 line_size;   /* out: LEGO_PCACHE_LINE_SIZE */
  __u32 max_lines;   /* out: largest count accepted by AD and EVICT */
  __u32 reserved0;   /* out: zero */
  __u64 features;    /* out: LEGO_PCACHE_FEAT_* */
  __u64 reserved1;   /* out: zero */
};
LEGO_PCACHE_STATIC_ASSERT(sizeof(struct lego_pcache_info) == 32);

/* Flags of LEGO_PCACHE_IOC_AD. */
#define LEGO_PCACHE_AD_CLEAR_ACCESSED (1u << 0) /* clear A after reading it */
#define LEGO_PCACHE_AD_CLEAR_DIRTY       \
  (1u << 1) /* clear D (page stays dirty \
             * for the kernel's reclaim) */
#define LEGO_PCACHE_AD_FLAGS (LEGO_PCACHE_AD_CLEAR_ACCESSED | LEGO_PCACHE_AD_CLEAR_DIRTY)

/*
 * LEGO_PCACHE_IOC_AD: for each line, reports whether it is resident (mapped by
 * a present PTE), accessed and dirty, and clears the bits the flags name. A
 * line that is not resident reports 0 in every bitmap. When a bit was cleared
 * the call flushes the TLB of every CPU (that may hold the mm) before it returns, so a store made
 * after the call returns sets D again: a caller that clears D and then copies
 * the line cannot miss a later store. Cost: one mmap_read_lock, one PTE lock
 * per line and, if anything was cleared, one TLB-flush IPI to the CPUs running the mm.
 */
struct lego_pcache_ad {
  __u64 lines;       /* in: user pointer to __u64[count] line addresses */
  __u64 accessed;    /* in: user pointer to the accessed bitmap, or 0 */
  __u64 dirty;       /* in: user pointer to the dirty bitmap, or 0 */
  __u64 present;     /* in: user pointer to the resident bitmap, or 0 */
  __u32 count;       /* in: 1..max_lines */
  __u32 flags;       /* in: LEGO_PCACHE_AD_* */
  __u32 nr_accessed; /* out: lines whose A bit was set */
  __u32 nr_dirty;    /* out: lines whose D bit was set */
  __u32 nr_present;  /* out: resident lines */
  __u32 reserved[3]; /* in: zero */
};
LEGO_PCACHE_STATIC_ASSERT(sizeof(struct lego_pcache_ad) == 64);

/* Flags of LEGO_PCACHE_IOC_EVICT. */
#define LEGO_PCACHE_EVICT_DISCARD_DIRTY \
  (1u << 0) /* evict dirty lines too,   \
             * dropping their data */
#define LEGO_PCACHE_EVICT_FLAGS LEGO_PCACHE_EVICT_DISCARD_DIRTY

/*
 * LEGO_PCACHE_IOC_EVICT: for each line,
 *   not resident           evicted=1 dirty=0 (nothing to do)
 *   resident, clean        evicted=1 dirty=0: unmapped, page freed; the next
 *                          touch faults (userfaultfd MISSING, or a zero page)
 *   resident, dirty        evicted=0 dirty=1: left mapped with its data, its D
 *                          bit cleared and write-protected. Write it back, then
 *                          evict it again: a store made meanwhile faults, makes
 *                          the line writable and dirty again, and the next
 *                          EVICT reports it dirty instead of dropping it.
 *   ... with DISCARD_DIRTY evicted=1 dirty=1: unmapped, data dropped.
 * "Dirty" means: stored to since the line was mapped, or since D was last
 * cleared by AD, EVICT or MKCLEAN; or (minor >= 1) written around the PTE by
 * the kernel for another process or a device (get_user_pages with
 * FOLL_WRITE: process_vm_writev, ptrace, O_DIRECT reads), which leaves D
 * clear but marks the page dirty; EVICT clears that mark when it keeps the
 * line. Cost: one mmap_write_lock (page faults of the
 * process wait for the call), two PTE-lock passes, one TLB-flush IPI to each
 * CPU running the process, and one zap_page_range (with its own flush) per run of contiguous
 * evictable lines (the batch is sorted, so neighbours are adjacent). With
 * DISCARD_DIRTY there is no verdict to protect, so no write-protect pass and
 * no broadcast flush: only the zaps (the dirty bitmap then reports D as the
 * call found it, which a concurrent store may change).
 */
struct lego_pcache_evict {
  __u64 lines;       /* in: user pointer to __u64[count] line addresses,
                      * strictly ascending (else EINVAL) */
  __u64 evicted;     /* in: user pointer to the evicted bitmap, or 0 */
  __u64 dirty;       /* in: user pointer to the dirty bitmap, or 0 */
  __u64 reserved0;   /* in: zero */
  __u32 count;       /* in: 1..max_lines */
  __u32 flags;       /* in: LEGO_PCACHE_EVICT_* */
  __u32 nr_evicted;  /* out: lines not resident after the call */
  __u32 nr_dirty;    /* out: lines that were dirty */
  __u32 reserved[4]; /* in: zero */
};
LEGO_PCACHE_STATIC_ASSERT(sizeof(struct lego_pcache_evict) == 64);

/*
 * LEGO_PCACHE_IOC_MKCLEAN: for each line whose PTE is present, userfaultfd-
 * write-protected (uffd-wp) and read-only, in a writable VMA registered for
 * userfaultfd write-protection, and whose page is an anonymous page this
 * process alone maps (not shared with a fork() child by copy-on-write):
 * clear the uffd-wp bit and the dirty bit and make the PTE writable, in one
 * atomic update under the PTE lock. done=1 for those lines.
 *
 * Meant for a line just filled with UFFDIO_COPY_MODE_WP: UFFDIO_COPY sets D
 * on every fill (Linux 6.1), so D says nothing about stores until it is
 * cleared. Afterwards a store needs no page fault and sets D, and EVICT
 * reports the line dirty; a line never stored to is reported clean and
 * dropped. The data of the line is unchanged (for a page in the swap cache
 * the cleared D moves to the page's dirty flag, for reclaim, as AD and EVICT
 * do). A write that bypasses the PTE (see "Dirty" above) marks the page
 * dirty instead of setting D; EVICT reports that too. No TLB flush is
 * needed (every cached translation of such a PTE is read-only; a store
 * through one faults and finds the PTE writable), so the cost is one
 * mmap_read_lock and one PTE lock per line.
 *
 * Every other line (not resident, already writable, not uffd-wp, a shared
 * page, the zero page, a NUMA-hinting PTE, soft-dirty tracking waiting for
 * its fault) is left exactly as it was with done=0: a caller keeps tracking
 * it with write-protect faults. Lines may come in any order, duplicates
 * included. Besides the common errors: EINVAL also for a line in a VMA
 * without VM_WRITE (PROT_WRITE) or not registered with
 * UFFDIO_REGISTER_MODE_WP.
 */
struct lego_pcache_mkclean {
  __u64 lines;       /* in: user pointer to __u64[count] line addresses */
  __u64 done;        /* in: user pointer to the done bitmap, or 0 */
  __u64 reserved0;   /* in: zero */
  __u32 count;       /* in: 1..max_lines */
  __u32 flags;       /* in: zero (no flags yet) */
  __u32 nr_done;     /* out: lines made writable and clean */
  __u32 reserved[3]; /* in: zero */
};
LEGO_PCACHE_STATIC_ASSERT(sizeof(struct lego_pcache_mkclean) == 48);

/*
 * 'L' 0x40-0x4f: unassigned in Documentation/userspace-api/ioctl/
 * ioctl-number.rst ('L' 00-2F and E0-FF are taken). The device node is ours
 * alone, so a clash could only confuse tracing tools, never a driver.
 */
#define LEGO_PCACHE_IOC_MAGIC 'L'
#define LEGO_PCACHE_IOC_INFO _IOR(LEGO_PCACHE_IOC_MAGIC, 0x40, struct lego_pcache_info)
#define LEGO_PCACHE_IOC_AD _IOWR(LEGO_PCACHE_IOC_MAGIC, 0x41, struct lego_pcache_ad)
#define LEGO_PCACHE_IOC_EVICT _IOWR(LEGO_PCACHE_IOC_MAGIC, 0x42, struct lego_pcache_evict)
#define LEGO_PCACHE_IOC_MKCLEAN _IOWR(LEGO_PCACHE_IOC_MAGIC, 0x43, struct lego_pcache_mkclean)

#endif /* LEGO_PCACHE_ABI_H */

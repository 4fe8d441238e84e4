// SPDX-License-Identifier: GPL-2.0
/*
 * lego_pcache: module entry, parameters, the /dev/lego_pcache misc device and
 * ioctl dispatch. The ABI is include/lego/pcache_abi.h; each ioctl's
 * mechanism lives in its own file (ad.c, evict.c, mkclean.c).
 */
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/uaccess.h>

#include "lego_pcache.h"

unsigned int lego_max_lines = 512;
module_param_named(max_lines, lego_max_lines, uint, 0444);
MODULE_PARM_DESC(max_lines,
		 "Largest batch (lines per ioctl) accepted, 1..4096 (default 512). Larger batches amortise the TLB flush and the mmap lock over more lines but hold the lock longer and need a bigger kernel buffer (8 bytes per line).");

static ushort dev_mode = 0600;
module_param(dev_mode, ushort, 0444);
MODULE_PARM_DESC(dev_mode,
		 "Permissions of /dev/lego_pcache (default 0600: root only). Every ioctl acts only on the caller's own memory, so 0666 is safe for the data; the cost is that any user may then trigger TLB-flush IPIs to the CPUs running its own process.");

/*
 * The ABI version this module reports. A test build may claim another major
 * (make LEGO_PCACHE_TEST_ABI_MAJOR=N) to prove that the runtime refuses a
 * module it does not know (tests/ops/guest_stages.sh, stage abi); nothing else
 * changes, so such a module must never be shipped.
 */
#ifdef LEGO_PCACHE_TEST_ABI_MAJOR
#define LEGO_REPORTED_ABI_MAJOR LEGO_PCACHE_TEST_ABI_MAJOR
#else
#define LEGO_REPORTED_ABI_MAJOR LEGO_PCACHE_ABI_MAJOR
#endif
#define LEGO_REPORTED_ABI_VERSION \
	((LEGO_REPORTED_ABI_MAJOR << 16) | LEGO_PCACHE_ABI_MINOR)

static long lego_ioctl_info(struct lego_pcache_info __user *uarg)
{
	struct lego_pcache_info info = {
		.abi_version = LEGO_REPORTED_ABI_VERSION,
		.line_size = LEGO_PCACHE_LINE_SIZE,
		.max_lines = lego_max_lines,
		.features = LEGO_PCACHE_FEAT_AD | LEGO_PCACHE_FEAT_EVICT |
			    LEGO_PCACHE_FEAT_SYSFS_STATS |
			    LEGO_PCACHE_FEAT_MKCLEAN,
	};

	if (copy_to_user(uarg, &info, sizeof(info)))
		return -EFAULT;
	return 0;
}

static long lego_pcache_ioctl(struct file *file, unsigned int cmd,
			      unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	switch (cmd) {
	case LEGO_PCACHE_IOC_INFO:
		return lego_ioctl_info(uarg);
	case LEGO_PCACHE_IOC_AD:
		return lego_ioctl_ad(uarg);
	case LEGO_PCACHE_IOC_EVICT:
		return lego_ioctl_evict(uarg);
	case LEGO_PCACHE_IOC_MKCLEAN:
		return lego_ioctl_mkclean(uarg);
	default:
		/* Also a known number with another struct size: an ABI mismatch. */
		return -ENOTTY;
	}
}

static const struct file_operations lego_pcache_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = lego_pcache_ioctl,
	/* Every field is fixed-width and pointers travel as __u64. */
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice lego_pcache_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "lego_pcache",
	.fops = &lego_pcache_fops,
	.groups = lego_pcache_groups,
};

static int __init lego_pcache_init(void)
{
	int ret;

	/* The ABI's sizes are part of the ioctl numbers; pin them here too. */
	BUILD_BUG_ON(sizeof(struct lego_pcache_info) != 32);
	BUILD_BUG_ON(sizeof(struct lego_pcache_ad) != 64);
	BUILD_BUG_ON(sizeof(struct lego_pcache_evict) != 64);
	BUILD_BUG_ON(sizeof(struct lego_pcache_mkclean) != 48);
	BUILD_BUG_ON(LEGO_PCACHE_LINE_SIZE != PAGE_SIZE);

	lego_max_lines = clamp(lego_max_lines, 1u, LEGO_PCACHE_MAX_LINES_LIMIT);
	lego_pcache_dev.mode = dev_mode & 0777;

	ret = misc_register(&lego_pcache_dev);
	if (ret) {
		pr_err("lego_pcache: misc_register failed: %d\n", ret);
		return ret;
	}
	pr_info("lego_pcache %s: ABI %u.%u, max_lines %u, /dev/%s\n",
		LEGO_PCACHE_VERSION, LEGO_REPORTED_ABI_MAJOR,
		LEGO_PCACHE_ABI_MINOR, lego_max_lines, lego_pcache_dev.name);
	return 0;
}

static void __exit lego_pcache_exit(void)
{
	misc_deregister(&lego_pcache_dev);
}

module_init(lego_pcache_init);
module_exit(lego_pcache_exit);

MODULE_LICENSE("GPL");
MODULE_AUTHOR("lego authors");
MODULE_DESCRIPTION("lego processor-node cache helper: batched accessed/dirty test-and-clear, race-free eviction and clean writable fills of the caller's 4 KiB lines");
MODULE_VERSION(LEGO_PCACHE_VERSION);

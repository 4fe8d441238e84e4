// SPDX-License-Identifier: GPL-2.0
/*
 * lego_pcache: counters. Kept per CPU so that the ioctl paths never share a
 * cache line for bookkeeping; summed when read from
 * /sys/class/misc/lego_pcache/stats/<name> (one decimal value per file, the
 * names and meanings of struct lego_pcache_stats in lego_pcache.h).
 * A sum read while ioctls run is not a snapshot across counters.
 */
#include <linux/device.h>
#include <linux/percpu.h>
#include <linux/sysfs.h>

#include "lego_pcache.h"

DEFINE_PER_CPU(struct lego_pcache_stats, lego_pcache_stats);

static u64 lego_stat_sum(size_t offset)
{
	u64 sum = 0;
	int cpu;

	for_each_possible_cpu(cpu)
		sum += *(u64 *)((char *)per_cpu_ptr(&lego_pcache_stats, cpu) +
				offset);
	return sum;
}

#define LEGO_STAT_ATTR(name)                                                  \
	static ssize_t name##_show(struct device *dev,                        \
				   struct device_attribute *attr, char *buf)  \
	{                                                                     \
		return sysfs_emit(buf, "%llu\n",                              \
				  lego_stat_sum(offsetof(                     \
					  struct lego_pcache_stats, name)));  \
	}                                                                     \
	static DEVICE_ATTR_RO(name)

LEGO_STAT_ATTR(ad_calls);
LEGO_STAT_ATTR(ad_lines);
LEGO_STAT_ATTR(ad_accessed);
LEGO_STAT_ATTR(ad_dirty);
LEGO_STAT_ATTR(evict_calls);
LEGO_STAT_ATTR(evict_lines);
LEGO_STAT_ATTR(evict_zapped);
LEGO_STAT_ATTR(evict_absent);
LEGO_STAT_ATTR(evict_dirty_kept);
LEGO_STAT_ATTR(evict_dirty_discarded);
LEGO_STAT_ATTR(evict_swapped_kept);
LEGO_STAT_ATTR(evict_page_dirty);
LEGO_STAT_ATTR(mkclean_calls);
LEGO_STAT_ATTR(mkclean_lines);
LEGO_STAT_ATTR(mkclean_done);
LEGO_STAT_ATTR(mkclean_shared);
LEGO_STAT_ATTR(zap_calls);
LEGO_STAT_ATTR(tlb_flushes);
LEGO_STAT_ATTR(errors);
LEGO_STAT_ATTR(result_faults);

static struct attribute *lego_stats_attrs[] = {
	&dev_attr_ad_calls.attr,
	&dev_attr_ad_lines.attr,
	&dev_attr_ad_accessed.attr,
	&dev_attr_ad_dirty.attr,
	&dev_attr_evict_calls.attr,
	&dev_attr_evict_lines.attr,
	&dev_attr_evict_zapped.attr,
	&dev_attr_evict_absent.attr,
	&dev_attr_evict_dirty_kept.attr,
	&dev_attr_evict_dirty_discarded.attr,
	&dev_attr_evict_swapped_kept.attr,
	&dev_attr_evict_page_dirty.attr,
	&dev_attr_mkclean_calls.attr,
	&dev_attr_mkclean_lines.attr,
	&dev_attr_mkclean_done.attr,
	&dev_attr_mkclean_shared.attr,
	&dev_attr_zap_calls.attr,
	&dev_attr_tlb_flushes.attr,
	&dev_attr_errors.attr,
	&dev_attr_result_faults.attr,
	NULL,
};

static const struct attribute_group lego_stats_group = {
	.name = "stats",
	.attrs = lego_stats_attrs,
};

const struct attribute_group *lego_pcache_groups[] = {
	&lego_stats_group,
	NULL,
};

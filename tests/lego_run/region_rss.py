# Prints the resident KiB of the largest anonymous mapping (the ExCache region) of PID, from
# /proc/PID/smaps; nothing if the process is gone.
import sys

best = None
try:
    with open("/proc/%s/smaps" % sys.argv[1]) as f:
        size = rss = 0
        for line in f:
            first = line.split()[0]
            if "-" in first and ":" not in first:
                if best is None or size > best[0]:
                    best = (size, rss) if size else best
                lo, hi = first.split("-")
                size, rss = int(hi, 16) - int(lo, 16), 0
            elif first == "Rss:":
                rss = int(line.split()[1])
        if best is None or size > best[0]:
            best = (size, rss)
except OSError:
    sys.exit(0)
if best and best[0] >= 16 << 30:
    print(best[1])

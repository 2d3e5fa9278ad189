"""``python peak_rss.py CMD...``: run CMD, then print ``PEAK_RSS_MB <n>`` on stderr, the peak resident memory of the
largest process of its tree that was waited for (CMD itself, for a launch: the workers report their own)."""

import resource
import subprocess
import sys

proc = subprocess.run(sys.argv[1:])
print(f"PEAK_RSS_MB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.1f}", file=sys.stderr)
sys.exit(proc.returncode)

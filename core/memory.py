"""Memory a long-lived process frees goes back to the system (glibc's malloc, set through the environment).

glibc serves large blocks from mmap only while they are above a threshold it raises after each free, so
after one big picture (a 76 MP 16-bit PNG decoded in an io thread) later big blocks come from the heap and
stay there: an io worker grew from 223 to 525 MiB in a soak. A fixed threshold keeps every block of 4 MiB
or more (Pillow's image blocks) in mmap, returned to the system when freed. It must be set before the
process starts, so the supervisor puts it in its children's environment (and the image sets it too).
"""

from __future__ import annotations

from collections.abc import Mapping

MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(4 * 1024 * 1024)}


def returning_memory(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with glibc told to return big freed blocks; a value the operator set is kept."""
    return {**MALLOC_SETTINGS, **env}

"""How a sweep's pairs are dispatched: in this process (the default, `patching.engine.patch_pairs`)
or to Ray actors on one machine or a cluster (`executors.ray`, with `--workers N`). Both write the
same results store, so a sweep may be resumed by either."""

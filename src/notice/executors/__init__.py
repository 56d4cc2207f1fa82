"""How a sweep's pairs are dispatched: in this process (the default, `patching.engine.patch_pairs`)
or to Ray actors on one machine or a cluster (`executors.ray`, with `--workers N`). Both write the
same results store, so a sweep may be resumed by either. Whole pipelines of several models run side by
side in processes of this machine (`executors.processes`, what `notice demo` does)."""

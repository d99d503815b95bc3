"""Speed without changing results: the frozen-prefix cache, precision per device, GPU placement of sweep jobs."""

"""The GPU run: ``prepare`` here, ``run`` on the GPU machine."""

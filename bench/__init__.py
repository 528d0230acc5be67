"""Side-by-side benchmarks of snapfw against virsh: ``python -m bench`` (see bench/README.md)."""

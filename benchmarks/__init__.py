"""Side-by-side performance runs (`python -m benchmarks.run`); never timed assertions in tests."""

"""Side-by-side performance runs (never timed assertions in tests)."""

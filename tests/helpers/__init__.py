"""Scripts and functions the tests run in other processes (fault injection, DDP workers)."""

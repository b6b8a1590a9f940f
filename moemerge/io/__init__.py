"""Reading checkpoints lazily and writing sharded model folders atomically."""

"""Named SQL blocks, loaded by consumer.store."""

"""Data: synthetic phantoms, dataset readers, the shard builder and the WebDataset loaders."""

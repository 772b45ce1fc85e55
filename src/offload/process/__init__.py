"""Starting, watching, killing and reaping worker processes."""

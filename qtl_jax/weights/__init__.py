"""Checkpoint reading, layout detection, declarative key maps and export."""

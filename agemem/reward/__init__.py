"""Judge, reward components and verl's compute_score."""

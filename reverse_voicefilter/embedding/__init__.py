"""Speaker-embedder training (GE2E) and verification scoring (EER)."""

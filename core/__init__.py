"""commhub core."""

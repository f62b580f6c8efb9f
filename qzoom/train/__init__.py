"""Q-Zoom training stages (spec §2, §5, §6)."""

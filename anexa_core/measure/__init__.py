"""Features beside the core that measure it: ``anexa bench`` (:mod:`.bench`) and loss plots (:mod:`.plots`)."""

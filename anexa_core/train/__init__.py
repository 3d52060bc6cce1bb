"""Training: :func:`.loop.train` reads prepare → fit → checkpoint. One optimizer step and the learning-rate
schedule are in :mod:`.step`, optimizer plugins are built in :mod:`.optim`, what a run folder holds
besides checkpoints in :mod:`.runs`, continuing a run in :mod:`.resume`, ``torchrun`` in
:mod:`.distributed`."""

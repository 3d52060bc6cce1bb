"""What goes to and from disk: atomic writes (:mod:`.files`), safetensors checkpoints (:mod:`.checkpoint`),
the one way every interface loads a model (:mod:`.load`), and other libraries' formats (:mod:`.export`)."""

"""Using a trained model: decoding with a KV cache (:mod:`.generation`), the sampler chain and stop strings
(:mod:`.sampling`), and scoring a text (:mod:`.evaluation`)."""

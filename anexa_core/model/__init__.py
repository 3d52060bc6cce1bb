"""The model: token embedding → a blocks plugin's stack (attention from an attention plugin) → the head
(:mod:`.gpt`), and the KV cache that decoding fills (:mod:`.cache`)."""

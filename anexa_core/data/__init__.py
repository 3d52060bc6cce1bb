"""Text in: corpora (files, folders, URLs, dataset plugins) read and normalised (:mod:`.corpus`), turned
into cached token ids (:mod:`.tokens`), and split into training and validation ids (:mod:`.prepare`)."""

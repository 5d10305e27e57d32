"""`classify-embeddings` (SPEC section 5; paper 002 section 6): bulk geometry of a token-embedding matrix.

- :mod:`.uncertainty`: sampling uncertainty of the sampled-pair statistics.
- :mod:`.run`: overlap statistics (sampled or ``--exact``), the class and bulk index, the embedding matrices.
"""

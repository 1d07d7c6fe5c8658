"""``deltatune bench``: step time, memory and merged inference of every method; the measuring tools it uses."""

"""Database package of the example application (the seed's ``db/`` layout)."""

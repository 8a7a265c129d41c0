"""The PostgreSQL boundary shared by the API and the persister.

``database.errors`` says what each asyncpg failure means (PostgreSQL is down, two
transactions clashed, the data was refused, or our bug); ``database.pool`` is the lazily
connecting pool both use. No other module catches asyncpg exceptions, and the API and the
persister import this package rather than each other.
"""

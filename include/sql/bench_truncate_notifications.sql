-- herald bench: an empty inbox (indexes kept) before the COPY floor.
TRUNCATE notifications RESTART IDENTITY
